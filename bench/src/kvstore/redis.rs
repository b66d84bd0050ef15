//! Redis, the baseline of stage 3: a `redis-server` this bench starts and
//! stops itself, a minimal RESP client (one outstanding request per
//! connection, no pipelining — the same shape as the store's one-key calls),
//! and a cross-check with `redis-benchmark`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::sys::pid_cpu_secs;

/// Longest wait for a started server to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest reply header line accepted (`$<len>\r\n`, `+OK\r\n`, errors).
const MAX_LINE: usize = 4096;

/// A `redis-server` child process on a loopback port; killed on drop, so
/// an error anywhere in the bench does not leave it running.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub version: String,
}

impl RedisServer {
    /// Starts `redis-server` without persistence on a free loopback port,
    /// its working directory in `dir`, and waits until it answers.
    pub async fn start(dir: &Path) -> anyhow::Result<RedisServer> {
        let version = Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .map_err(|e| anyhow::anyhow!("redis-server is not runnable ({e}); install the redis-server package"))?;
        // A free port: bind port 0, note it, let it go (a tiny race with other
        // programs, reported as a start failure).
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        // Its log goes to a file: a pipe nobody drains could stall the server.
        let log_path = dir.join("redis-server.log");
        let log = std::fs::File::create(&log_path).context("creating the redis-server log")?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing the redis-server log")?)
            .stderr(log)
            .spawn()
            .context("spawning redis-server")?;
        let mut server = RedisServer { child, port, version };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                let err = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("redis-server exited at start ({status}): {}", err.trim());
            }
            if let Ok(mut conn) = RespConn::connect(port).await {
                if conn.ping().await.is_ok() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer PING within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl RedisServer {
    /// CPU seconds the server has used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        pid_cpu_secs(self.pid())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One RESP connection; every call sends one command and waits for its reply.
#[derive(Debug)]
pub struct RespConn {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    line: Vec<u8>,
}

impl RespConn {
    pub async fn connect(port: u16) -> anyhow::Result<RespConn> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(RespConn {
            reader: BufReader::with_capacity(64 << 10, r),
            writer: BufWriter::with_capacity(64 << 10, w),
            line: Vec::with_capacity(64),
        })
    }

    /// Sends one command of bulk-string arguments (not flushed).
    async fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.writer.write_all(format!("*{}\r\n", args.len()).as_bytes()).await?;
        for a in args {
            self.writer.write_all(format!("${}\r\n", a.len()).as_bytes()).await?;
            self.writer.write_all(a).await?;
            self.writer.write_all(b"\r\n").await?;
        }
        self.writer.flush().await?;
        Ok(())
    }

    /// Reads one reply line (without `\r\n`) into `self.line`.
    async fn reply_line(&mut self) -> anyhow::Result<()> {
        self.line.clear();
        let n = (&mut self.reader).take(MAX_LINE as u64).read_until(b'\n', &mut self.line).await?;
        if n == 0 {
            bail!("redis closed the connection");
        }
        if !self.line.ends_with(b"\r\n") {
            bail!("malformed or overlong reply line from redis");
        }
        self.line.truncate(self.line.len() - 2);
        if self.line.first() == Some(&b'-') {
            bail!("redis error: {}", String::from_utf8_lossy(&self.line[1..]));
        }
        Ok(())
    }

    /// The integer after a reply's type byte (`:3`, `$262144`).
    fn reply_int(&self) -> anyhow::Result<i64> {
        std::str::from_utf8(self.line.get(1..).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected redis reply {:?}", String::from_utf8_lossy(&self.line)))
    }

    pub async fn ping(&mut self) -> anyhow::Result<()> {
        self.command(&[b"PING"]).await?;
        self.reply_line().await
    }

    pub async fn set(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        self.command(&[b"SET", key, value]).await?;
        self.reply_line().await?;
        if self.line != b"+OK" {
            bail!("SET answered {:?}", String::from_utf8_lossy(&self.line));
        }
        Ok(())
    }

    /// Reads `key`'s value into the start of `buf`; `None` when absent.
    /// A value larger than `buf` is an error.
    pub async fn get_into(&mut self, key: &[u8], buf: &mut [u8]) -> anyhow::Result<Option<usize>> {
        self.command(&[b"GET", key]).await?;
        self.reply_line().await?;
        if self.line.first() != Some(&b'$') {
            bail!("GET answered {:?}", String::from_utf8_lossy(&self.line));
        }
        let len = self.reply_int()?;
        if len < 0 {
            return Ok(None);
        }
        let len = len as usize;
        if len > buf.len() {
            bail!("value of {len} bytes does not fit a buffer of {}", buf.len());
        }
        self.reader.read_exact(&mut buf[..len]).await?;
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf).await?;
        Ok(Some(len))
    }

    /// Deletes keys; how many existed.
    pub async fn del(&mut self, keys: &[Vec<u8>]) -> anyhow::Result<i64> {
        let mut args: Vec<&[u8]> = vec![b"DEL"];
        args.extend(keys.iter().map(Vec::as_slice));
        self.command(&args).await?;
        self.reply_line().await?;
        self.reply_int()
    }
}

/// One line of `redis-benchmark --csv`.
#[derive(Debug, Clone, Serialize)]
pub struct RedisBenchmarkLine {
    pub test: String,
    pub ops_per_s: f64,
    pub gbps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs `redis-benchmark -c clients -n requests -d value_bytes -t set,get
/// --csv` against the server (all requests on one key per test, no
/// pipelining). Blocking: call on the blocking pool.
pub fn redis_benchmark(
    port: u16,
    clients: usize,
    requests: usize,
    value_bytes: usize,
) -> anyhow::Result<Vec<RedisBenchmarkLine>> {
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", &clients.to_string()])
        .args(["-n", &requests.to_string(), "-d", &value_bytes.to_string(), "-t", "set,get", "--csv"])
        .stdin(Stdio::null())
        .output()
        .context("running redis-benchmark")?;
    if !out.status.success() {
        bail!("redis-benchmark failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_benchmark_csv(&String::from_utf8_lossy(&out.stdout), value_bytes)
}

/// Parses `redis-benchmark --csv` output (Redis 7: test, rps, avg, min,
/// p50, p95, p99, max; latencies in ms).
fn parse_benchmark_csv(text: &str, value_bytes: usize) -> anyhow::Result<Vec<RedisBenchmarkLine>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<String> = lines
        .next()
        .context("empty redis-benchmark output")?
        .split(',')
        .map(|f| f.trim_matches('"').to_owned())
        .collect();
    let col = |name: &str| {
        header.iter().position(|h| h == name).with_context(|| format!("redis-benchmark CSV has no {name:?} column"))
    };
    let (rps, p50, p99) = (col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?);
    let mut out = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        let num = |i: usize| -> anyhow::Result<f64> {
            fields.get(i).and_then(|f| f.parse().ok()).with_context(|| format!("bad redis-benchmark line {line:?}"))
        };
        let ops = num(rps)?;
        out.push(RedisBenchmarkLine {
            test: fields.first().unwrap_or(&"").to_string(),
            ops_per_s: ops,
            gbps: ops * value_bytes as f64 / 1e9,
            p50_us: num(p50)? * 1e3,
            p99_us: num(p99)? * 1e3,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_csv_parses() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"5000.00\",\"1.224\",\"0.160\",\"0.727\",\"4.383\",\"6.079\",\"7.215\"\n\
                    \"GET\",\"2828.85\",\"1.676\",\"0.112\",\"1.175\",\"5.087\",\"6.263\",\"6.727\"\n";
        let lines = parse_benchmark_csv(text, 1000).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].test, "SET");
        assert_eq!(lines[0].ops_per_s, 5000.0);
        assert!((lines[1].p99_us - 6263.0).abs() < 1e-6);
        assert!((lines[0].gbps - 0.005).abs() < 1e-12);
        assert!(parse_benchmark_csv("", 1).is_err());
        assert!(parse_benchmark_csv("\"test\",\"rps\"\n\"SET\",\"1\"\n", 1).is_err());
    }
}
