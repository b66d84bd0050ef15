//! A loopback cluster for one run: a cluster file written for the
//! deployment and policy, `tandem up --config` as a child process, its
//! `/metrics` read before and after, and a clean stop.

use super::schema::Deployment;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What every run of an invocation shares.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The `tandem` binary that runs the cluster.
    pub tandem: PathBuf,
    /// `[model] path`: a known name, a .gguf file or a HF directory.
    pub model: String,
    pub compute: Compute,
    pub block_tokens: u32,
    pub kv_dtype: String,
    /// DRAM of the one storage node, e.g. "2GiB".
    pub store_dram: String,
    /// Eviction policy of the store (None: its default).
    pub eviction: Option<String>,
    /// "shm" (same host) or "tcp" for KV transfers.
    pub transport: String,
    /// KV pages of each worker, e.g. "512MiB".
    pub kv_memory: String,
    /// Prefill nodes read cached prefixes (false: the cache-off baseline).
    pub prefix_reads: bool,
    /// Token budget of one forward pass on every worker (None: the nodes'
    /// default).
    pub chunk_tokens: Option<u32>,
    /// Decode nodes store the blocks that fill while they decode.
    pub write_back: bool,
    pub slo_ttft_ms: f64,
    pub slo_tbt_ms: f64,
    /// Keep each run's cluster file and logs under this folder.
    pub keep: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Compute {
    Real,
    /// A cost model profile (e.g. "h100-llama3-8b") and the factor KV
    /// bytes are divided by.
    Modeled {
        profile: String,
        kv_scale: u32,
    },
}

impl Compute {
    pub fn name(&self) -> String {
        match self {
            Compute::Real => "real".into(),
            Compute::Modeled { profile, kv_scale } => format!("modeled:{profile} (KV bytes / {kv_scale})"),
        }
    }
}

/// A running cluster; stopped when dropped.
#[derive(Debug)]
pub struct Cluster {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _dir: Option<tempfile::TempDir>,
    pub dir: PathBuf,
}

/// Free loopback ports (bound, then released).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    ls.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// The cluster file of one run.
pub fn cluster_toml(s: &Setup, d: &Deployment, policy: &str, dir: &Path) -> anyhow::Result<String> {
    let workers = (if d.colocated { 0 } else { d.prefill } + d.decode) as usize;
    let mut ports = free_ports(5 + workers)?.into_iter();
    let mut p = || ports.next().unwrap_or(0);
    let q = |v: &str| toml_string(v);
    let mut t =
        format!("[model]\npath = {}\nkv_dtype = {}\nblock_tokens = {}\n", q(&s.model), q(&s.kv_dtype), s.block_tokens);
    if let Compute::Modeled { profile, kv_scale } = &s.compute {
        t += &format!("compute = \"modeled\"\nmodeled = {}\nkv_scale = {kv_scale}\n", q(profile));
    }
    let (mode, policy) =
        if policy == "colocated" || d.colocated { ("colocated", "least-loaded") } else { ("disaggregated", policy) };
    t += &format!(
        "\n[conductor]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nserved_model_name = \"bench\"\n\
         mode = \"{mode}\"\npolicy = {}\nstatus_interval_ms = 100\nmax_tokens_limit = 65536\n\n\
         [conductor.slo]\nttft_ms = {}\ntbt_ms = {}\n\n",
        p(),
        p(),
        q(policy),
        s.slo_ttft_ms,
        s.slo_tbt_ms,
    );
    t += &format!("[kvstore.master]\nlisten = \"127.0.0.1:{}\"\n", p());
    if let Some(e) = &s.eviction {
        t += &format!("policy = {}\n", q(e));
    }
    t += &format!(
        "\n[[kvstore.storage]]\nname = \"store-0\"\nlisten = \"127.0.0.1:{}\"\ndata_listen = \"127.0.0.1:{}\"\n\
         dram = {}\nshm_dir = {}\n\n[kvstore.client.transport]\nprefer = {}\n\n",
        p(),
        p(),
        q(&s.store_dram),
        q(&shm_dir(dir).display().to_string()),
        q(&s.transport),
    );
    let chunk = s.chunk_tokens.map_or(String::new(), |n| format!("chunk_tokens = {n}\n"));
    if !d.colocated {
        for i in 0..d.prefill {
            t += &format!(
                "[[prefill]]\nname = \"prefill-{i}\"\nlisten = \"127.0.0.1:{}\"\nkv_memory = {}\nprefix_reads = {}\n{chunk}\n",
                p(),
                q(&s.kv_memory),
                s.prefix_reads
            );
        }
    }
    for i in 0..d.decode {
        let local = if d.colocated && !s.prefix_reads { "local_cache = \"0B\"\n" } else { "" };
        t += &format!(
            "[[decode]]\nname = \"decode-{i}\"\nlisten = \"127.0.0.1:{}\"\nkv_memory = {}\nwrite_back = {}\n{local}{chunk}\n",
            p(),
            q(&s.kv_memory),
            s.write_back
        );
    }
    Ok(t)
}

/// Segment files go to /dev/shm when it exists (a tmpfs), else the run's
/// folder.
fn shm_dir(dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Cluster {
    /// Writes the cluster file and starts `tandem up` on it; returns once
    /// the API answers.
    pub fn start(s: &Setup, d: &Deployment, policy: &str, label: &str) -> anyhow::Result<Cluster> {
        let (tmp, dir) = match &s.keep {
            Some(root) => {
                let safe: String =
                    label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
                let dir = root.join(safe);
                std::fs::create_dir_all(&dir)?;
                (None, dir)
            }
            None => {
                let t = tempfile::tempdir()?;
                let dir = t.path().to_path_buf();
                (Some(t), dir)
            }
        };
        let config = dir.join("cluster.toml");
        std::fs::write(&config, cluster_toml(s, d, policy, &dir)?)?;
        let logs = dir.join("logs");
        let mut child = Command::new(&s.tandem)
            .args(["up", "--config"])
            .arg(&config)
            .arg("--logs")
            .arg(&logs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", s.tandem.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout from tandem up"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("http://").nth(1).filter(|_| line.starts_with("Tandem is up")) {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let mut cluster = Cluster { child, base: String::new(), _dir: tmp, dir: dir.clone() };
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(addr) => cluster.base = format!("http://{addr}"),
            Err(_) => {
                let status = cluster.child.try_wait().ok().flatten();
                anyhow::bail!(
                    "the cluster did not come up ({}); logs in {}",
                    status.map_or("still starting after 600 s".to_string(), |s| s.to_string()),
                    logs.display()
                );
            }
        }
        Ok(cluster)
    }

    /// Stops the cluster (SIGTERM, then SIGKILL after 30 s).
    pub fn stop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..300 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

/// `/metrics` samples: (name with labels, value).
pub async fn scrape(http: &reqwest::Client, base: &str) -> Vec<(String, f64)> {
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else { return Vec::new() };
    let text = r.text().await.unwrap_or_default();
    parse_metrics(&text)
}

pub fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The value of a label in a sample name: `label(r#"x{node="a"}"#, "node")`.
pub fn label<'a>(sample: &'a str, key: &str) -> Option<&'a str> {
    let start = sample.find(&format!("{key}=\""))? + key.len() + 2;
    let len = sample[start..].find('"')?;
    Some(&sample[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            tandem: "tandem".into(),
            model: "smollm2".into(),
            compute: Compute::Modeled { profile: "h100-llama3-8b".into(), kv_scale: 256 },
            block_tokens: 512,
            kv_dtype: "bf16".into(),
            store_dram: "1GiB".into(),
            eviction: Some("lru".into()),
            transport: "shm".into(),
            kv_memory: "256MiB".into(),
            prefix_reads: true,
            chunk_tokens: Some(8192),
            write_back: false,
            slo_ttft_ms: 5000.0,
            slo_tbt_ms: 100.0,
            keep: None,
        }
    }

    #[test]
    fn cluster_files_carry_the_deployment_and_policy() {
        let dir = tempfile::tempdir().unwrap();
        let d = Deployment { prefill: 2, decode: 1, colocated: false };
        let t = cluster_toml(&setup(), &d, "round-robin", dir.path()).unwrap();
        let v: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(v["model"]["compute"].as_str(), Some("modeled"));
        assert_eq!(v["conductor"]["policy"].as_str(), Some("round-robin"));
        assert_eq!(v["conductor"]["mode"].as_str(), Some("disaggregated"));
        assert_eq!(v["prefill"].as_array().unwrap().len(), 2);
        assert_eq!(v["decode"].as_array().unwrap().len(), 1);
        assert_eq!(v["kvstore"]["master"]["policy"].as_str(), Some("lru"));
        let c = Deployment { prefill: 0, decode: 2, colocated: true };
        let t = cluster_toml(&setup(), &c, "colocated", dir.path()).unwrap();
        let v: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(v["conductor"]["mode"].as_str(), Some("colocated"));
        assert!(v.get("prefill").is_none());
    }

    #[test]
    fn metrics_text_parses_and_labels_are_found() {
        let m = parse_metrics(
            "# HELP x\ntandem_compute_seconds{node=\"prefill-0\",role=\"prefill\"} 1.5\ntandem_in_flight_requests 0\nbad\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].1, 1.5);
        assert_eq!(label(&m[0].0, "node"), Some("prefill-0"));
        assert_eq!(label(&m[0].0, "role"), Some("prefill"));
        assert_eq!(label(&m[1].0, "node"), None);
    }
}
