//! A small HTTP/1.0 client for the conductor tests (HTTP/1.0 so streamed
//! bodies arrive close-delimited, not chunked), a cluster started with
//! `tandem up --config`, and cluster files with free loopback ports.
#![allow(dead_code)]

use super::Proc;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A response: status, headers (lower-case names), body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect to the conductor");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

fn head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Response {
    let mut r = BufReader::new(send(addr, method, path, body));
    let (status, headers) = head(&mut r);
    let mut body = String::new();
    r.read_to_string(&mut body).unwrap();
    Response { status, headers, body }
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, &body.to_string())
}

/// A streaming request: status, then each `data:` payload as it arrives.
pub struct Sse {
    pub status: u16,
    reader: BufReader<TcpStream>,
}

impl Sse {
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> Sse {
        let mut reader = BufReader::new(send(addr, "POST", path, &body.to_string()));
        let (status, _) = head(&mut reader);
        Sse { status, reader }
    }

    /// The next `data:` payload (`None` at the end of the stream).
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// Drops the connection (the client going away).
    pub fn close(self) {
        let _ = self.reader.into_inner().shutdown(std::net::Shutdown::Both);
    }
}

/// Free loopback ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// SmolLM2 from the model cache (`scripts/test.sh` fetches it first).
pub fn smollm2() -> String {
    tandem_model::fetch::resolve("smollm2", false).expect("SmolLM2 in the model cache").display().to_string()
}

/// A loopback cluster file: one store master and storage node, `prefill`
/// and `decode` workers, a conductor with `conductor_extra` lines.
pub fn cluster_file(dir: &Path, prefill: usize, decode: usize, conductor_extra: &str) -> PathBuf {
    let mut ports = free_ports(5 + prefill + decode).into_iter();
    let mut p = || ports.next().unwrap();
    let mut t = String::from("[model]\npath = \"smollm2\"\n\n");
    t += &format!(
        "[conductor]\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nstatus_interval_ms = 100\nnode_timeout_ms = 1000\n{conductor_extra}\n\n",
        p(),
        p()
    );
    t += &format!("[kvstore.master]\nlisten = \"127.0.0.1:{}\"\n\n", p());
    t += &format!(
        "[[kvstore.storage]]\nname = \"store-0\"\nlisten = \"127.0.0.1:{}\"\ndata_listen = \"127.0.0.1:{}\"\ndram = \"256MiB\"\nsegment_size = \"128MiB\"\n\n",
        p(),
        p()
    );
    for i in 0..prefill {
        t +=
            &format!("[[prefill]]\nname = \"prefill-{i}\"\nlisten = \"127.0.0.1:{}\"\nkv_memory = \"128MiB\"\n\n", p());
    }
    for i in 0..decode {
        t += &format!("[[decode]]\nname = \"decode-{i}\"\nlisten = \"127.0.0.1:{}\"\nkv_memory = \"256MiB\"\n\n", p());
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, t).unwrap();
    path
}

/// A cluster run by `tandem up --config`, stopped (SIGTERM, then SIGKILL)
/// when dropped.
pub struct Up {
    pub proc: Proc,
    pub http: SocketAddr,
    pub logs: PathBuf,
    pub config: PathBuf,
}

impl Up {
    pub fn start(config: &Path, logs: &Path) -> Up {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["up", "--config"]).arg(config).arg("--logs").arg(logs);
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn tandem up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("Tandem is up") {
                    let _ = tx.send(line);
                }
            }
        });
        let proc = Proc { child };
        let line = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(l) => l,
            Err(_) => panic!("tandem up did not come up; logs in {}: {}", logs.display(), dump_logs(logs)),
        };
        let http = line.split("http://").nth(1).and_then(|s| s.split('/').next()).unwrap().parse().unwrap();
        Up { proc, http, logs: logs.to_path_buf(), config: config.to_path_buf() }
    }

    /// The pid of one node's process, for kill -9.
    pub fn node_pid(&self, node: &str) -> u32 {
        let config = self.config.display().to_string();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let has = |a: &str, b: &str| args.windows(2).any(|w| w[0] == a && w[1] == b);
            if has("--node", node) && has("--config", &config) {
                return pid;
            }
        }
        panic!("no process for node {node}");
    }

    /// A `/metrics` sample's value.
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        let m = request(self.http, "GET", "/metrics", "");
        m.body.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.proc.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn dump_logs(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            out +=
                &format!("\n--- {} ---\n{}", e.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    out
}
