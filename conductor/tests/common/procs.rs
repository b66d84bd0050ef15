//! A cluster of separate `tandem` processes started from one cluster file
//! with fixed loopback ports, so any node can be killed with SIGKILL and
//! restarted at the same address: the store master (persisted metadata),
//! storage nodes, prefill and decode workers, the conductor. Also the
//! checks a fault test ends with: every surviving node back to its idle
//! accounting, every stored block read back with its checksum verified.
#![allow(dead_code)]

use super::http::{free_ports, request};
use super::Proc;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_proto::kvstore as kpb;
use tandem_proto::worker as pb;
use tandem_proto::BlockKey;

/// A node's role: how it is started and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Master,
    Storage,
    Prefill,
    Decode,
    Conductor,
}

/// One node of the cluster file and its process, if running.
pub struct Node {
    pub name: String,
    pub role: Role,
    /// The address that accepts connections once the node serves.
    pub addr: SocketAddr,
    pub proc: Option<Proc>,
}

/// Sizes of a [`ProcCluster`].
#[derive(Debug, Clone)]
pub struct Shape {
    pub storage: usize,
    pub prefill: usize,
    pub decode: usize,
    /// Extra lines of the `[conductor]` table.
    pub conductor_extra: String,
    /// Extra lines of the `[kvstore.master]` table.
    pub master_extra: String,
}

/// Deterministic pseudo-random numbers (splitmix64) for seeded schedules.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.range(0, i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The seed from `var` when set (to replay a run), else a random one.
/// Printed either way.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Rng::new(t.as_nanos() as u64 ^ u64::from(std::process::id())).next_u64()
    });
    eprintln!("seed: {seed} (replay with {var}={seed})");
    seed
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// A cluster of `tandem` processes on fixed loopback ports.
pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: Vec<Node>,
    pub master_addr: String,
    pub http: SocketAddr,
}

impl ProcCluster {
    /// Writes the cluster file and starts every node (master, storage,
    /// prefill, decode, conductor), each once the ones before serve.
    pub fn start(shape: &Shape) -> ProcCluster {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 + 2 * shape.storage + shape.prefill + shape.decode;
        let mut ports = free_ports(n).into_iter();
        let mut next = || SocketAddr::from(([127, 0, 0, 1], ports.next().unwrap()));
        let d = dir.path();
        let (http, admin, master) = (next(), next(), next());
        let mut nodes = vec![Node { name: "master".into(), role: Role::Master, addr: master, proc: None }];
        let mut t = String::from("[model]\npath = \"smollm2\"\n\n");
        t += &format!(
            "[conductor]\nlisten = \"{http}\"\nadmin_listen = \"{admin}\"\nstatus_interval_ms = 100\n\
             node_timeout_ms = 1000\n{}\n\n",
            shape.conductor_extra
        );
        t += &format!(
            "[kvstore.master]\nlisten = \"{master}\"\nmetadata_dir = \"{}\"\nheartbeat_interval_ms = 100\n\
             node_timeout_ms = 1500\ntick_ms = 20\n{}\n\n",
            d.join("meta").display(),
            shape.master_extra
        );
        for i in 0..shape.storage {
            let (control, data) = (next(), next());
            t += &format!(
                "[[kvstore.storage]]\nname = \"store-{i}\"\nlisten = \"{control}\"\ndata_listen = \"{data}\"\n\
                 dram = \"128MiB\"\nsegment_size = \"64MiB\"\nshm_dir = \"{}\"\n\n",
                d.display()
            );
            nodes.push(Node { name: format!("store-{i}"), role: Role::Storage, addr: control, proc: None });
        }
        for i in 0..shape.prefill {
            let a = next();
            t += &format!(
                "[[prefill]]\nname = \"prefill-{i}\"\nlisten = \"{a}\"\nkv_memory = \"64MiB\"\nprofile = false\n\n"
            );
            nodes.push(Node { name: format!("prefill-{i}"), role: Role::Prefill, addr: a, proc: None });
        }
        for i in 0..shape.decode {
            let a = next();
            t += &format!(
                "[[decode]]\nname = \"decode-{i}\"\nlisten = \"{a}\"\nkv_memory = \"128MiB\"\nprofile = false\n\n"
            );
            nodes.push(Node { name: format!("decode-{i}"), role: Role::Decode, addr: a, proc: None });
        }
        // A store alone (no workers) runs without a conductor.
        if shape.prefill + shape.decode > 0 {
            nodes.push(Node { name: "conductor".into(), role: Role::Conductor, addr: http, proc: None });
        }
        let config = d.join("cluster.toml");
        std::fs::write(&config, t).unwrap();
        std::fs::create_dir_all(d.join("logs")).unwrap();
        let mut c = ProcCluster { dir, config, nodes, master_addr: master.to_string(), http };
        for i in 0..c.nodes.len() {
            c.start_node(i);
        }
        c.wait_ready(Duration::from_secs(60));
        c
    }

    pub fn index(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    /// Starts node `i` (appending to its log) and waits until it listens.
    pub fn start_node(&mut self, i: usize) {
        let (name, role, addr) = (self.nodes[i].name.clone(), self.nodes[i].role, self.nodes[i].addr);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        match role {
            Role::Master => cmd.args(["kvstore", "master"]),
            Role::Storage => cmd.args(["kvstore", "storage", "--node", &name]),
            Role::Prefill => cmd.args(["prefill", "--node", &name]),
            Role::Decode => cmd.args(["decode", "--node", &name]),
            Role::Conductor => cmd.args(["conductor", "--node", &name]),
        };
        cmd.arg("--config").arg(&self.config);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log(&name)).unwrap();
        cmd.env("TANDEM_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let child = cmd.spawn().expect("spawn tandem");
        let mut proc = Proc { child };
        let deadline = Instant::now() + Duration::from_secs(120);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("{name} exited ({status}) before it listened on {addr}:{}", self.tail(&name));
            }
            assert!(Instant::now() < deadline, "{name} did not listen on {addr}:{}", self.tail(&name));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.nodes[i].proc = Some(proc);
    }

    /// SIGKILLs node `i` (no-op when it is not running).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill9();
        }
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].proc.is_some()
    }

    /// The last lines of a node's log.
    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!("\n--- {name} ---\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
    }

    /// Waits for the conductor's `/ready` (a prefill and a decode node up)
    /// and for every running storage node to be registered.
    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let conductor = self.nodes.iter().any(|n| n.role == Role::Conductor);
            let ready = !conductor
                || (TcpStream::connect_timeout(&self.http, Duration::from_millis(200)).is_ok()
                    && request(self.http, "GET", "/ready", "").status == 200);
            let storage = self.nodes.iter().filter(|n| n.role == Role::Storage && n.proc.is_some()).count();
            let registered = block_on(async { self.store().stats().await }).map(|s| s.nodes.len()).unwrap_or(0);
            if ready && registered == storage {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster was not ready (conductor ready: {ready}, {registered}/{storage} storage nodes):{}",
                self.tail("conductor")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn store(&self) -> StoreClient {
        StoreClient::new(ClientConfig {
            master: self.master_addr.clone(),
            rpc_timeout_ms: 5_000,
            ..ClientConfig::default()
        })
        .unwrap()
    }

    /// What is not at its idle value on the running nodes (empty: all
    /// back to baseline): worker pages, queues and batches; the store's
    /// reservations and leases.
    pub fn accounting(&self) -> Vec<String> {
        let mut dirty = Vec::new();
        for n in self.nodes.iter().filter(|n| n.proc.is_some()) {
            let url = format!("http://{}", n.addr);
            let ch = tonic::transport::Endpoint::from_shared(url).unwrap().timeout(Duration::from_secs(5));
            match n.role {
                Role::Prefill => {
                    let s = block_on(async {
                        let mut c = pb::prefill_client::PrefillClient::new(ch.connect().await?);
                        Ok::<_, Box<dyn std::error::Error>>(c.status(pb::StatusRequest {}).await?.into_inner())
                    });
                    match s {
                        Ok(s) if s.queued_requests == 0 && s.kv_pages_free == s.kv_pages_total => {}
                        Ok(s) => dirty.push(format!(
                            "{}: {} queued, {}/{} pages free",
                            n.name, s.queued_requests, s.kv_pages_free, s.kv_pages_total
                        )),
                        Err(e) => dirty.push(format!("{}: status: {e}", n.name)),
                    }
                }
                Role::Decode => {
                    let s = block_on(async {
                        let mut c = pb::decode_client::DecodeClient::new(ch.connect().await?);
                        Ok::<_, Box<dyn std::error::Error>>(c.status(pb::StatusRequest {}).await?.into_inner())
                    });
                    match s {
                        Ok(s) if s.batch_size == 0 && s.waiting == 0 && s.kv_pages_free == s.kv_pages_total => {}
                        Ok(s) => dirty.push(format!(
                            "{}: batch {}, {} waiting, {}/{} pages free",
                            n.name, s.batch_size, s.waiting, s.kv_pages_free, s.kv_pages_total
                        )),
                        Err(e) => dirty.push(format!("{}: status: {e}", n.name)),
                    }
                }
                Role::Master => match block_on(async { self.store().stats().await }) {
                    Ok(s) if s.pending_puts == 0 && s.active_leases == 0 => {}
                    Ok(s) => dirty.push(format!("store: {} pending puts, {} leases", s.pending_puts, s.active_leases)),
                    Err(e) => dirty.push(format!("store stats: {e}")),
                },
                Role::Conductor => match metric(self.http, "tandem_in_flight_requests") {
                    Some(0.0) => {}
                    v => dirty.push(format!("conductor: {v:?} requests in flight")),
                },
                Role::Storage => {}
            }
        }
        dirty
    }

    /// Waits until [`ProcCluster::accounting`] is clean; panics with what
    /// is not after `limit`.
    pub fn assert_back_to_baseline(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let dirty = self.accounting();
            if dirty.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not back to baseline after {limit:?}: {dirty:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads back every block the master lists, verifying checksums (the
    /// client checks each read against its writer's checksum). Returns
    /// (listed, read, checksum mismatches).
    pub fn read_back_all_blocks(&self) -> (usize, usize, u64) {
        block_on(async {
            let store = self.store();
            let mut listed: Vec<kpb::KeyInfo> = Vec::new();
            let mut after = 0;
            loop {
                let req = kpb::ListKeysRequest { after, limit: 1000 };
                let page = store.master().list_keys(req).await.expect("list keys").into_inner().keys;
                let Some(last) = page.last() else { break };
                after = last.key;
                listed.extend(page);
            }
            let mut read = 0;
            for chunk in listed.chunks(64) {
                let keys: Vec<BlockKey> = chunk.iter().map(|k| BlockKey(k.key)).collect();
                let max = chunk.iter().map(|k| k.len as usize).max().unwrap_or(0);
                let got = store.get(&keys, max).await.expect("read back");
                for (info, g) in chunk.iter().zip(got) {
                    if let Some(bytes) = g {
                        assert_eq!(bytes.len() as u64, info.len, "block {:016x} read back short", info.key);
                        read += 1;
                    }
                }
            }
            (listed.len(), read, store.metrics().checksum_mismatches.load(Ordering::Relaxed))
        })
    }
}

/// A `/metrics` sample's value (`None` when absent or unreachable).
pub fn metric(http: SocketAddr, name_and_labels: &str) -> Option<f64> {
    TcpStream::connect_timeout(&http, Duration::from_millis(500)).ok()?;
    let m = request(http, "GET", "/metrics", "");
    m.body.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Resident set size (KiB) and open file descriptors of a process.
pub fn rss_kib_and_fds(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// How one streamed request ended, as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `[DONE]` after the whole answer.
    Completed { text: String, finish: String },
    /// A clear error: an HTTP error status with a message, or an error
    /// event in the stream.
    Error(String),
    /// The connection could not be made or broke (no `[DONE]`, no error).
    Transport(String),
    /// Nothing for longer than the client's timeout.
    Hung(String),
}

/// Opens a streaming completion and reads it to its end, with `timeout` as
/// the longest silence allowed. Never panics on the connection.
pub fn stream_completion(addr: SocketAddr, body: &serde_json::Value, timeout: Duration) -> Outcome {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return Outcome::Transport(format!("connect: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let body = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = s.write_all(head.as_bytes()) {
        return Outcome::Transport(format!("send: {e}"));
    }
    let broke = |e: std::io::Error, what: &str| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Outcome::Hung(format!("nothing for {timeout:?} ({what})"))
        }
        _ => Outcome::Transport(format!("{what}: {e}")),
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if let Err(e) = r.read_line(&mut line) {
        return broke(e, "status line");
    }
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if status == 0 {
        return Outcome::Transport(format!("no HTTP status line ({line:?})"));
    }
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Outcome::Transport("the connection closed in the headers".into()),
            Ok(_) if line.trim_end().is_empty() => break,
            Ok(_) => {}
            Err(e) => return broke(e, "headers"),
        }
    }
    if status != 200 {
        let mut rest = String::new();
        if let Err(e) = r.read_to_string(&mut rest) {
            return broke(e, "error body");
        }
        let v: serde_json::Value = serde_json::from_str(&rest).unwrap_or_default();
        return match v["error"]["message"].as_str() {
            Some(m) if !m.is_empty() => Outcome::Error(format!("HTTP {status}: {m}")),
            _ => Outcome::Transport(format!("HTTP {status} without an error message: {rest:?}")),
        };
    }
    let (mut text, mut finish) = (String::new(), String::new());
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Outcome::Transport(format!("the stream ended without [DONE] after {text:?}")),
            Ok(_) => {}
            Err(e) => return broke(e, "stream"),
        }
        let Some(d) = line.trim_end().strip_prefix("data: ") else { continue };
        if d == "[DONE]" {
            return Outcome::Completed { text, finish };
        }
        let v: serde_json::Value = match serde_json::from_str(d) {
            Ok(v) => v,
            Err(e) => return Outcome::Transport(format!("bad chunk {d:?}: {e}")),
        };
        if let Some(err) = v.get("error") {
            let m = err["message"].as_str().unwrap_or_default();
            return if m.is_empty() {
                Outcome::Transport(format!("an error event without a message: {d}"))
            } else {
                Outcome::Error(m.to_string())
            };
        }
        let c = &v["choices"][0];
        text += c["text"].as_str().unwrap_or_default();
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
}

/// The prompt ids the tests send, and the single-process engine's greedy
/// answers to them (the reference every completion must equal).
pub fn reference_texts(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<String> {
    use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
    let path = super::http::smollm2();
    let loaded = engine::load(Path::new(&path), tandem_kernels::Precision::Fast).unwrap();
    let options =
        EngineOptions { page_tokens: 16, kv_dtype: "f32".parse().unwrap(), num_pages: 2048, chunk_tokens: 512 };
    let mut e = Engine::new(loaded.model, options).unwrap();
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request { prompt: p.clone(), max_tokens, sampling: Default::default(), stop_ids: Vec::new() })
        .collect();
    let (gens, _) = e.generate(&reqs, |_, _| Flow::Continue).unwrap();
    let tok = engine::load_tokenizer(Path::new(&path)).unwrap().0;
    gens.iter().map(|g| tok.decode(&g.ids(), true).unwrap()).collect()
}

pub fn tokenize(text: &str) -> Vec<u32> {
    let path = super::http::smollm2();
    tandem_model::engine::load_tokenizer(Path::new(&path)).unwrap().0.encode(text, true).unwrap()
}

/// The child processes of `parent`, each named by its `--node` argument
/// (the store master, started without one, is "master").
pub fn children_of(parent: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // The fields after the command name (which may hold spaces): state, ppid, ...
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let name = args.windows(2).find(|w| w[0] == "--node").map(|w| w[1].clone());
        let name =
            name.unwrap_or_else(|| if args.iter().any(|a| a == "master") { "master".into() } else { args.join(" ") });
        out.push((name, pid));
    }
    out.sort();
    out
}
