//! Stage 2: the tcp transport against a raw tcp blast on loopback.
//!
//! A [`DataServer`] in this process serves one shared-memory segment; a
//! [`TcpTransport`] reads large batches of blocks from it into caller
//! buffers (and writes them back) with 1, 2 and 4 stripes, with the
//! store's socket buffer setting and with the kernel's autotuning. The
//! stage runs as a task on the runtime's workers, where a node's store
//! client runs (not on the `block_on` thread, whose every wake-up is a
//! cross-thread hop).
//!
//! The baseline is iperf-like: one plain connection, the sender writes the
//! same number of bytes in 4 MiB chunks and the receiver `read_exact`s them.
//! Both ends walk buffers as large as the transport's batch, so the blast
//! moves bytes between the same amounts of memory as the transport does (a
//! 64 MiB segment into 64 MiB of caller memory): a blast that rewrites one
//! 4 MiB buffer runs out of the CPU's last-level cache and measures the
//! cache, not the socket (it is reported too, as
//! `raw_std_recv_cache_resident_gbps`). It runs twice, on two OS threads
//! with blocking sockets and on tokio tasks in the bench's runtime; the
//! faster of the two is the ceiling the transport is divided by.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use bytesize::ByteSize;
use serde::Serialize;
use tandem_kvstore::segment::Segment;
use tandem_kvstore::transport::{
    DataServer, DataTarget, ReadOp, TcpConfig, TcpTransport, TransferError, Transport, WriteOp,
};
use tandem_kvstore::types::Location;
use tandem_proto::BlockKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::shm::check;
use super::sys::{filled, gbps};
use crate::stats::median;

/// Bytes per `write` of the raw blast's sender.
const BLAST_CHUNK: usize = 4 << 20;

/// What stage 2 measures.
#[derive(Debug, Clone, Serialize)]
pub struct TcpSettings {
    /// Bytes per transport call (and the segment's size).
    pub batch_bytes: usize,
    /// Calls per repetition.
    pub batches_per_rep: usize,
    pub block_sizes: Vec<usize>,
    pub stripes: Vec<usize>,
    /// SO_SNDBUF/SO_RCVBUF of the transport's sockets, client and server:
    /// the first is the headline (the store's default); 0 = the kernel's
    /// autotuning, as the raw blast uses.
    pub socket_buffers: Vec<u64>,
    /// Timed repetitions (the median is reported), after one warm-up.
    pub reps: usize,
}

/// The transport with one block size and stripe count (medians, GB/s).
#[derive(Debug, Clone, Serialize)]
pub struct TcpRun {
    pub block_bytes: usize,
    pub stripes: usize,
    /// Socket buffer size of client and server (0 = kernel autotuning).
    pub socket_buffer_bytes: u64,
    pub read_gbps: f64,
    pub write_gbps: f64,
    pub read_runs_gbps: Vec<f64>,
    pub write_runs_gbps: Vec<f64>,
}

/// Stage 2's results.
#[derive(Debug, Clone, Serialize)]
pub struct TcpResult {
    /// Raw blast, blocking sockets on two threads: receive (server → client).
    pub raw_std_recv_gbps: f64,
    /// Raw blast, blocking sockets: send (client → server).
    pub raw_std_send_gbps: f64,
    /// Raw blast on tokio tasks: receive.
    pub raw_tokio_recv_gbps: f64,
    /// Raw blast on tokio tasks: send.
    pub raw_tokio_send_gbps: f64,
    /// The better raw receive rate: the ceiling for reads.
    pub raw_recv_gbps: f64,
    /// The better raw send rate: the ceiling for writes.
    pub raw_send_gbps: f64,
    /// Every repetition of the four raw variants, in the order above.
    pub raw_runs_gbps: [Vec<f64>; 4],
    /// The blocking-socket receive blast on one 4 MiB buffer per end, which
    /// stays in the last-level cache (context, not the ceiling).
    pub raw_std_recv_cache_resident_gbps: f64,
    pub runs: Vec<TcpRun>,
}

impl TcpResult {
    /// The run with the best read rate for `block` bytes and socket buffers.
    pub fn best_read(&self, block: usize, buffers: u64) -> Option<&TcpRun> {
        self.runs_of(block, buffers).max_by(|a, b| a.read_gbps.total_cmp(&b.read_gbps))
    }

    /// The run with the best write rate for `block` bytes and socket buffers.
    pub fn best_write(&self, block: usize, buffers: u64) -> Option<&TcpRun> {
        self.runs_of(block, buffers).max_by(|a, b| a.write_gbps.total_cmp(&b.write_gbps))
    }

    pub fn runs_of(&self, block: usize, buffers: u64) -> impl Iterator<Item = &TcpRun> {
        self.runs.iter().filter(move |r| r.block_bytes == block && r.socket_buffer_bytes == buffers)
    }
}

/// One segment, served as segment 0.
struct OneSegment(Arc<Segment>);

impl DataTarget for OneSegment {
    fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        (id == 0).then(|| self.0.clone())
    }

    fn read_ssd(&self, _key: BlockKey, _dst: &mut [u8]) -> Result<(), TransferError> {
        Err(TransferError::NotFound)
    }
}

/// Runs stage 2 with the served segment file in `dir`.
pub async fn run(settings: &TcpSettings, dir: &Path) -> anyhow::Result<TcpResult> {
    let batch = settings.batch_bytes;
    let rep_bytes = (batch * settings.batches_per_rep) as u64;
    let path = dir.join(format!("tandem-bench-tcp-{}.seg", std::process::id()));
    let segment = Arc::new(Segment::create(&path, batch as u64, true).context("creating the bench segment")?);
    segment.write_at(0, &filled(batch, 11)).context("filling the bench segment")?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut servers = Vec::with_capacity(settings.socket_buffers.len());
    for &buffers in &settings.socket_buffers {
        let cfg = TcpConfig { socket_buffer_bytes: ByteSize::b(buffers), ..TcpConfig::default() };
        let target = Arc::new(OneSegment(segment.clone()));
        servers.push((buffers, DataServer::bind(loopback, target, cfg).await.context("starting a data server")?));
    }
    let mut caller = filled(batch, 12);

    let mut std_blast = StdBlast::start(batch).context("starting the raw blocking-socket blast")?;
    let mut cached_blast = StdBlast::start(BLAST_CHUNK).context("starting the cache-resident raw blast")?;
    let mut tokio_blast = TokioBlast::start(batch).await.context("starting the raw tokio blast")?;
    let mut raw_runs: [Vec<f64>; 4] = Default::default();
    let mut cached_runs = Vec::new();
    let mut runs = Vec::new();
    for &block in &settings.block_sizes {
        if block == 0 || !batch.is_multiple_of(block) {
            bail!("block size {block} must divide the batch ({batch} bytes)");
        }
        // (Indices, not an iterator of borrows, are held across the awaits:
        // the stage runs as a spawned task, which must be `Send`.)
        let combos: Vec<(usize, usize)> =
            (0..servers.len()).flat_map(|s| settings.stripes.iter().map(move |&n| (s, n))).collect();
        for (s, stripes) in combos {
            let (buffers, server) = &servers[s];
            let what = if *buffers == 0 { "autotuned".to_owned() } else { ByteSize::b(*buffers).to_string() };
            eprintln!("[kvstore bench]   tcp: {} KiB blocks, {stripes} stripe(s), {what} socket buffers", block >> 10);
            let cfg = TcpConfig { stripes, socket_buffer_bytes: ByteSize::b(*buffers), ..TcpConfig::default() };
            let transport = TcpTransport::new(server.local_addr(), cfg);
            let (mut reads, mut writes) = (Vec::new(), Vec::new());
            for rep in 0..=settings.reps {
                // The raw baselines run next to every transport run, so that
                // both see the same state of the machine.
                let raw = [
                    std_blast.recv(rep_bytes)?,
                    std_blast.send(rep_bytes)?,
                    tokio_blast.recv(rep_bytes).await?,
                    tokio_blast.send(rep_bytes).await?,
                ];
                let cached = cached_blast.recv(rep_bytes)?;
                let start = Instant::now();
                for _ in 0..settings.batches_per_rep {
                    read_batch(&transport, &mut caller, block).await?;
                }
                let read = start.elapsed().as_secs_f64();
                let start = Instant::now();
                for _ in 0..settings.batches_per_rep {
                    write_batch(&transport, &caller, block).await?;
                }
                let write = start.elapsed().as_secs_f64();
                if rep > 0 {
                    for (runs, secs) in raw_runs.iter_mut().zip(raw) {
                        runs.push(gbps(rep_bytes, secs));
                    }
                    cached_runs.push(gbps(rep_bytes, cached));
                    reads.push(gbps(rep_bytes, read));
                    writes.push(gbps(rep_bytes, write));
                }
            }
            let mut direct = vec![0u8; batch];
            segment.read_at(0, &mut direct).context("reading back the bench segment")?;
            if direct != caller {
                bail!("tcp transport round trip changed the bytes ({} KiB blocks)", block >> 10);
            }
            runs.push(TcpRun {
                block_bytes: block,
                stripes,
                socket_buffer_bytes: *buffers,
                read_gbps: median(&reads),
                write_gbps: median(&writes),
                read_runs_gbps: reads,
                write_runs_gbps: writes,
            });
        }
    }
    std_blast.stop();
    cached_blast.stop();
    for (_, server) in servers {
        server.shutdown().await;
    }
    let m: Vec<f64> = raw_runs.iter().map(|r| if r.is_empty() { 0.0 } else { median(r) }).collect();
    Ok(TcpResult {
        raw_std_recv_gbps: m[0],
        raw_std_send_gbps: m[1],
        raw_tokio_recv_gbps: m[2],
        raw_tokio_send_gbps: m[3],
        raw_recv_gbps: m[0].max(m[2]),
        raw_send_gbps: m[1].max(m[3]),
        raw_runs_gbps: raw_runs,
        raw_std_recv_cache_resident_gbps: if cached_runs.is_empty() { 0.0 } else { median(&cached_runs) },
        runs,
    })
}

async fn read_batch(t: &TcpTransport, caller: &mut [u8], block: usize) -> anyhow::Result<()> {
    let mut ops: Vec<ReadOp<'_>> = caller
        .chunks_exact_mut(block)
        .enumerate()
        .map(|(i, dst)| ReadOp::new(Location::Dram { segment: 0, offset: (i * block) as u64 }, dst))
        .collect();
    check(t.read(&mut ops).await)
}

async fn write_batch(t: &TcpTransport, caller: &[u8], block: usize) -> anyhow::Result<()> {
    let ops: Vec<WriteOp<'_>> = caller
        .chunks_exact(block)
        .enumerate()
        .map(|(i, src)| WriteOp { dst: Location::Dram { segment: 0, offset: (i * block) as u64 }, src, grant: None })
        .collect();
    check(t.write(&ops).await)
}

/// Request of the raw blast: direction (0 = server sends, 1 = server
/// receives) and byte count. The server answers a receive with one byte.
fn request(direction: u8, bytes: u64) -> [u8; 9] {
    let mut r = [0u8; 9];
    r[0] = direction;
    r[1..].copy_from_slice(&bytes.to_le_bytes());
    r
}

/// The raw blast on blocking sockets: a server thread and the caller.
/// The pieces a blast of `bytes` moves: at most [`BLAST_CHUNK`] each,
/// walking a buffer of `span` bytes from its start (and wrapping).
fn pieces(bytes: u64, span: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut left = usize::try_from(bytes).unwrap_or(usize::MAX);
    let mut pos = 0;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        if pos >= span {
            pos = 0;
        }
        let n = left.min(BLAST_CHUNK).min(span - pos);
        left -= n;
        pos += n;
        Some(pos - n..pos)
    })
}

struct StdBlast {
    conn: TcpStream,
    buf: Vec<u8>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl StdBlast {
    /// A connection to a server thread; both ends move bytes through
    /// buffers of `span` bytes.
    fn start(span: usize) -> std::io::Result<StdBlast> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let server = std::thread::Builder::new().name("raw-blast".into()).spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                // Errors end the thread; the client sees them as a closed socket.
                let _ = serve_std(&mut conn, span);
            }
        })?;
        let conn = TcpStream::connect(addr)?;
        conn.set_nodelay(true)?;
        Ok(StdBlast { conn, buf: filled(span, 13), server: Some(server) })
    }

    /// Seconds to receive `bytes` from the server.
    fn recv(&mut self, bytes: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.conn.write_all(&request(0, bytes))?;
        for piece in pieces(bytes, self.buf.len()) {
            self.conn.read_exact(&mut self.buf[piece]).context("raw blast receive")?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Seconds to send `bytes` to the server (until it acknowledges).
    fn send(&mut self, bytes: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.conn.write_all(&request(1, bytes))?;
        for piece in pieces(bytes, self.buf.len()) {
            self.conn.write_all(&self.buf[piece]).context("raw blast send")?;
        }
        let mut ack = [0u8; 1];
        self.conn.read_exact(&mut ack).context("raw blast acknowledgement")?;
        Ok(start.elapsed().as_secs_f64())
    }

    fn stop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StdBlast {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_std(conn: &mut TcpStream, span: usize) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = filled(span, 14);
    loop {
        let mut req = [0u8; 9];
        conn.read_exact(&mut req)?;
        for piece in pieces(u64::from_le_bytes(req[1..].try_into().unwrap_or_default()), span) {
            if req[0] == 0 {
                conn.write_all(&buf[piece])?;
            } else {
                conn.read_exact(&mut buf[piece])?;
            }
        }
        if req[0] == 1 {
            conn.write_all(&[1])?;
        }
    }
}

/// The raw blast on tokio tasks in the bench's runtime.
struct TokioBlast {
    conn: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl TokioBlast {
    /// Like [`StdBlast::start`], on tokio tasks.
    async fn start(span: usize) -> std::io::Result<TokioBlast> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut conn, _)) = listener.accept().await {
                // Errors end the task; the client sees them as a closed socket.
                let _ = serve_tokio(&mut conn, span).await;
            }
        });
        let conn = tokio::net::TcpStream::connect(addr).await?;
        conn.set_nodelay(true)?;
        Ok(TokioBlast { conn, buf: filled(span, 15) })
    }

    async fn recv(&mut self, bytes: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.conn.write_all(&request(0, bytes)).await?;
        for piece in pieces(bytes, self.buf.len()) {
            self.conn.read_exact(&mut self.buf[piece]).await.context("raw blast receive")?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    async fn send(&mut self, bytes: u64) -> anyhow::Result<f64> {
        let start = Instant::now();
        self.conn.write_all(&request(1, bytes)).await?;
        for piece in pieces(bytes, self.buf.len()) {
            self.conn.write_all(&self.buf[piece]).await.context("raw blast send")?;
        }
        let mut ack = [0u8; 1];
        self.conn.read_exact(&mut ack).await.context("raw blast acknowledgement")?;
        Ok(start.elapsed().as_secs_f64())
    }
}

async fn serve_tokio(conn: &mut tokio::net::TcpStream, span: usize) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = filled(span, 16);
    loop {
        let mut req = [0u8; 9];
        conn.read_exact(&mut req).await?;
        for piece in pieces(u64::from_le_bytes(req[1..].try_into().unwrap_or_default()), span) {
            if req[0] == 0 {
                conn.write_all(&buf[piece]).await?;
            } else {
                conn.read_exact(&mut buf[piece]).await?;
            }
        }
        if req[0] == 1 {
            conn.write_all(&[1]).await?;
        }
    }
}
