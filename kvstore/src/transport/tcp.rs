//! [`TcpTransport`]: framed, pipelined, striped tcp to one peer's
//! [`super::DataServer`].
//!
//! A batch is cut into contiguous runs of roughly equal bytes, one per
//! stripe (connection), and the runs go concurrently. On each connection the
//! client sends every request of its run while it reads the replies, so one
//! round trip carries the whole run. Read payloads land directly in the
//! caller's buffers and are hashed chunk by chunk as they arrive.
//!
//! A connection that fails (I/O error, timeout, protocol violation) is
//! dropped and every op of its run not yet answered fails with
//! [`TransferError::ConnectionLost`] or [`TransferError::Timeout`]; the next
//! batch reconnects. A run that fails on a *reused* connection before any
//! reply arrived — typically one the server closed while it sat idle — is
//! retried once on a fresh connection (reads and writes to a reserved range
//! are idempotent).
//!
//! With a cluster token (`TcpConfig::cluster_token`) every new connection
//! first sends `HELLO` and waits for `HELLO_OK` (see [`super::frame`]): one
//! round trip per connection, none per batch.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;

use super::frame::{
    hello_frame, payload_checksum, FrameHeader, HeaderError, Opcode, PayloadHasher, Status, FLAG_GRANT, GRANT_LEN,
    HEADER_LEN, IO_CHUNK, MAX_ERROR_MESSAGE, TRAILER_LEN,
};
use super::{BoxFuture, ReadOp, TcpConfig, TransferError, Transport, TransportKind, WriteOp};
use crate::types::Location;

/// Buffer for reply headers; payloads larger than this bypass it, so at
/// most two buffer-fulls of a block are copied.
const READ_BUFFER: usize = 16 * 1024;
/// Buffer coalescing request headers; payloads larger than this bypass it.
const WRITE_BUFFER: usize = 64 * 1024;
/// A batch is spread over more stripes only when each gets at least this.
const MIN_STRIPE_BYTES: u64 = 256 * 1024;

/// A tcp transport to one peer. Cheap to create: connections are made on
/// first use and re-made after failures.
#[derive(Debug)]
pub struct TcpTransport {
    addr: SocketAddr,
    cfg: TcpConfig,
    stripes: Box<[Stripe]>,
    /// Where the next batch starts, so concurrent small batches spread over
    /// the stripes.
    next_stripe: AtomicUsize,
}

#[derive(Debug, Default)]
struct Stripe {
    conn: tokio::sync::Mutex<Option<Conn>>,
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    /// Request ids start at 1; 0 marks connection-level error replies.
    next_id: u64,
}

/// A per-op result slot, `None` until the op is answered.
type Slot = Option<Result<(), TransferError>>;

impl TcpTransport {
    /// A transport to the data server at `addr`. `cfg.stripes` is clamped
    /// to at least 1.
    pub fn new(addr: SocketAddr, cfg: TcpConfig) -> TcpTransport {
        let stripes = (0..cfg.stripes.max(1)).map(|_| Stripe::default()).collect();
        TcpTransport { addr, cfg, stripes, next_stripe: AtomicUsize::new(0) }
    }

    /// The peer's data address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.op_timeout_ms)
    }

    async fn dial(&self) -> Result<Conn, TransferError> {
        let unreachable = |e: io::Error| TransferError::Unreachable(format!("{}: {e}", self.addr));
        let socket = if self.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
        let socket = socket.map_err(unreachable)?;
        let bytes = self.cfg.socket_buffer_bytes.as_u64();
        if bytes > 0 {
            let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
            // Best effort: the kernel clamps to its limits.
            let _ = socket.set_send_buffer_size(bytes);
            let _ = socket.set_recv_buffer_size(bytes);
        }
        let timeout = Duration::from_millis(self.cfg.connect_timeout_ms);
        let mut stream = match tokio::time::timeout(timeout, socket.connect(self.addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => {
                let msg = format!("{}: connect timed out after {} ms", self.addr, self.cfg.connect_timeout_ms);
                return Err(TransferError::Unreachable(msg));
            }
        };
        stream.set_nodelay(true).map_err(unreachable)?;
        if let Some(token) = &self.cfg.cluster_token {
            hello(&mut stream, token.as_bytes(), self.op_timeout()).await?;
        }
        let (r, w) = stream.into_split();
        Ok(Conn {
            reader: BufReader::with_capacity(READ_BUFFER, r),
            writer: BufWriter::with_capacity(WRITE_BUFFER, w),
            next_id: 1,
        })
    }

    /// Sizes of the contiguous runs a batch of ops with these lengths is
    /// cut into, and the stripe the first run goes to.
    fn plan(&self, lens: &[u64]) -> (Vec<usize>, usize) {
        let total: u64 = lens.iter().sum();
        let by_bytes = usize::try_from(total.div_ceil(MIN_STRIPE_BYTES)).unwrap_or(usize::MAX).max(1);
        let parts = self.stripes.len().min(lens.len()).min(by_bytes);
        let first = self.next_stripe.fetch_add(1, Ordering::Relaxed);
        (split_by_bytes(lens, parts), first)
    }

    /// Runs `exchange` for each chunk of at most `max_batch_ops` ops of one
    /// run, on one stripe's connection, dialing and retrying as documented
    /// in the module docs.
    async fn on_stripe<T, F>(&self, stripe: &Stripe, ops: &mut [T], slots: &mut [Slot], mut exchange: F)
    where
        F: for<'c> FnMut(&'c mut Conn, &'c mut [T], &'c mut [Slot]) -> BoxFuture<'c, Result<(), TransferError>>,
    {
        let mut guard = stripe.conn.lock().await;
        let chunk = self.cfg.max_batch_ops as usize;
        let mut start = 0;
        while start < ops.len() {
            let end = (start + chunk).min(ops.len());
            let (ops, slots) = (&mut ops[start..end], &mut slots[start..end]);
            start = end;
            if slots.iter().all(Option::is_some) {
                continue;
            }
            let mut retried = false;
            loop {
                let reused = guard.is_some();
                let conn = match guard.as_mut() {
                    Some(conn) => conn,
                    None => match self.dial().await {
                        Ok(conn) => guard.insert(conn),
                        Err(e) => {
                            fill(slots, &e);
                            break;
                        }
                    },
                };
                let answered_before = slots.iter().filter(|s| s.is_some()).count();
                let Err(e) = exchange(conn, ops, slots).await else { break };
                *guard = None;
                let nothing_answered = slots.iter().filter(|s| s.is_some()).count() == answered_before;
                if reused && !retried && nothing_answered && matches!(e, TransferError::ConnectionLost(_)) {
                    tracing::debug!(addr = %self.addr, error = %e, "stale connection; retrying once");
                    retried = true;
                    match self.dial().await {
                        Ok(conn) => {
                            *guard = Some(conn);
                            continue;
                        }
                        Err(_) => {
                            fill(slots, &e);
                            break;
                        }
                    }
                }
                fill(slots, &e);
                break;
            }
        }
    }

    async fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<(), TransferError>> {
        let max_frame = self.cfg.max_frame();
        let mut slots: Vec<Slot> = ops
            .iter()
            .map(|op| (op.dst.len() as u64 > max_frame).then(|| Err(too_large(op.dst.len(), max_frame))))
            .collect();
        let lens: Vec<u64> = ops.iter().map(|op| op.dst.len() as u64).collect();
        let (runs, first) = self.plan(&lens);
        let timeout = self.op_timeout();
        let mut runs_futs = Vec::with_capacity(runs.len());
        let (mut ops_rest, mut slots_rest) = (ops, slots.as_mut_slice());
        for (k, len) in runs.into_iter().enumerate() {
            let (ops_run, ops_tail) = ops_rest.split_at_mut(len);
            let (slots_run, slots_tail) = slots_rest.split_at_mut(len);
            (ops_rest, slots_rest) = (ops_tail, slots_tail);
            let stripe = &self.stripes[(first + k) % self.stripes.len()];
            runs_futs.push(self.on_stripe(stripe, ops_run, slots_run, move |conn, ops, slots| {
                Box::pin(read_exchange(conn, ops, slots, timeout))
            }));
        }
        futures::future::join_all(runs_futs).await;
        finish(slots)
    }

    async fn write_batch(&self, ops: &[WriteOp<'_>]) -> Vec<Result<(), TransferError>> {
        let max_frame = self.cfg.max_frame();
        let mut slots: Vec<Slot> = ops
            .iter()
            .map(|op| match op.dst {
                Location::Ssd { .. } => Some(Err(ssd_write())),
                Location::Dram { .. } if op.src.len() as u64 > max_frame => {
                    Some(Err(too_large(op.src.len(), max_frame)))
                }
                Location::Dram { .. } => None,
            })
            .collect();
        let lens: Vec<u64> = ops.iter().map(|op| op.src.len() as u64).collect();
        let (runs, first) = self.plan(&lens);
        let timeout = self.op_timeout();
        // `on_stripe` hands out `&mut [T]`; a run of writes only reads its
        // ops, so it works on a copy of the (small) op descriptors.
        let mut owned: Vec<WriteOp<'_>> =
            ops.iter().map(|op| WriteOp { dst: op.dst, src: op.src, grant: op.grant }).collect();
        let mut runs_futs = Vec::with_capacity(runs.len());
        let (mut ops_rest, mut slots_rest) = (owned.as_mut_slice(), slots.as_mut_slice());
        for (k, len) in runs.into_iter().enumerate() {
            let (ops_run, ops_tail) = ops_rest.split_at_mut(len);
            let (slots_run, slots_tail) = slots_rest.split_at_mut(len);
            (ops_rest, slots_rest) = (ops_tail, slots_tail);
            let stripe = &self.stripes[(first + k) % self.stripes.len()];
            runs_futs.push(self.on_stripe(stripe, ops_run, slots_run, move |conn, ops, slots| {
                Box::pin(write_exchange(conn, ops, slots, timeout))
            }));
        }
        futures::future::join_all(runs_futs).await;
        finish(slots)
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(self.read_batch(ops))
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(self.write_batch(ops))
    }
}

/// Contiguous run sizes (each at least one op) whose byte totals are about
/// equal; `parts` is clamped to `1..=lens.len()`.
pub(crate) fn split_by_bytes(lens: &[u64], parts: usize) -> Vec<usize> {
    let n = lens.len();
    if n == 0 {
        return Vec::new();
    }
    let parts = parts.clamp(1, n);
    let total: u128 = lens.iter().map(|&l| u128::from(l)).sum();
    let mut sizes = Vec::with_capacity(parts);
    let (mut acc, mut count) = (0u128, 0usize);
    for (i, &len) in lens.iter().enumerate() {
        acc += u128::from(len);
        count += 1;
        let parts_left = parts - sizes.len() - 1;
        let ops_left = n - i - 1;
        let share_reached = acc * parts as u128 >= total * (sizes.len() as u128 + 1);
        if parts_left > 0 && (share_reached || ops_left == parts_left) {
            sizes.push(count);
            count = 0;
        }
    }
    sizes.push(count);
    sizes
}

fn fill(slots: &mut [Slot], e: &TransferError) {
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = Some(Err(e.clone()));
    }
}

fn finish(slots: Vec<Slot>) -> Vec<Result<(), TransferError>> {
    let missing = || Err(TransferError::Protocol("op left unanswered".to_owned()));
    slots.into_iter().map(|s| s.unwrap_or_else(missing)).collect()
}

/// Opens a connection with the cluster token (`HELLO`, see [`super::frame`])
/// and waits for the server's `HELLO_OK`; a refusal comes back as the
/// server's `Unauthenticated` error.
pub(super) async fn hello<S>(stream: &mut S, token: &[u8], timeout: Duration) -> Result<(), TransferError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    timed(timeout, stream.write_all(&hello_frame(token))).await?;
    let mut raw = [0u8; HEADER_LEN];
    timed(timeout, stream.read_exact(&mut raw)).await?;
    let h = FrameHeader::decode(&raw).map_err(|e| TransferError::Protocol(format!("handshake reply: {e}")))?;
    match h.op() {
        Some(Opcode::HelloOk) if h.payload_len == 0 => Ok(()),
        Some(Opcode::Error) if h.payload_len <= MAX_ERROR_MESSAGE as u64 => {
            let mut msg = vec![0u8; h.payload_len as usize + if h.payload_len > 0 { TRAILER_LEN } else { 0 }];
            timed(timeout, stream.read_exact(&mut msg)).await?;
            msg.truncate(h.payload_len as usize);
            Err(Status::from_u16(h.status).into_error(&String::from_utf8_lossy(&msg)))
        }
        _ => Err(TransferError::Protocol(format!("unexpected handshake reply opcode {:#04x}", h.opcode))),
    }
}

fn too_large(len: usize, max: u64) -> TransferError {
    TransferError::Rejected(format!("block of {len} bytes exceeds the frame limit of {max}"))
}

fn ssd_write() -> TransferError {
    TransferError::Rejected("writes go to DRAM locations only".to_owned())
}

fn lost(e: io::Error) -> TransferError {
    TransferError::ConnectionLost(e.to_string())
}

fn timeout_error(t: Duration) -> TransferError {
    TransferError::Timeout(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

async fn timed<T>(t: Duration, fut: impl Future<Output = io::Result<T>>) -> Result<T, TransferError> {
    match tokio::time::timeout(t, fut).await {
        Ok(r) => r.map_err(lost),
        Err(_) => Err(timeout_error(t)),
    }
}

fn request_header(op: Opcode, id: u64, count: usize, loc: Location, len: usize) -> [u8; HEADER_LEN] {
    request(op, id, count, loc, len).encode()
}

fn request(op: Opcode, id: u64, count: usize, loc: Location, len: usize) -> FrameHeader {
    let mut h = FrameHeader::new(op, id);
    h.count = u32::try_from(count).unwrap_or(u32::MAX);
    h.len = len as u64;
    match loc {
        Location::Dram { segment, offset } => {
            h.segment = segment;
            h.offset = offset;
        }
        Location::Ssd { key } => h.offset = key.0,
    }
    if op == Opcode::Write {
        h.payload_len = len as u64;
    }
    h
}

/// Drives the sending and the receiving half of one pipelined exchange.
/// The receiver's error wins when both fail: it carries the server's reason
/// (an `ERROR` frame) where the sender only sees a closed socket.
async fn drive(
    send: impl Future<Output = Result<(), TransferError>>,
    recv: impl Future<Output = Result<(), TransferError>>,
) -> Result<(), TransferError> {
    tokio::pin!(send, recv);
    tokio::select! {
        sent = &mut send => match sent {
            Ok(()) => recv.await,
            Err(e) => recv.await.and(Err(e)),
        },
        received = &mut recv => received,
    }
}

async fn read_exchange(
    conn: &mut Conn,
    ops: &mut [ReadOp<'_>],
    slots: &mut [Slot],
    timeout: Duration,
) -> Result<(), TransferError> {
    let base = conn.next_id;
    conn.next_id += ops.len() as u64;
    let pending: Vec<usize> = (0..ops.len()).filter(|&i| slots[i].is_none()).collect();
    let headers: Vec<[u8; HEADER_LEN]> = pending
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let op = match ops[i].src {
                Location::Dram { .. } => Opcode::Read,
                Location::Ssd { .. } => Opcode::ReadSsd,
            };
            request_header(op, base + i as u64, pending.len() - k, ops[i].src, ops[i].dst.len())
        })
        .collect();
    let Conn { reader, writer, .. } = conn;
    let send = async {
        for h in &headers {
            timed(timeout, writer.write_all(h)).await?;
        }
        timed(timeout, writer.flush()).await
    };
    let recv = async {
        for &i in &pending {
            let reply = recv_read_reply(reader, base + i as u64, ops[i].dst, timeout).await?;
            // The trailer hash is the block checksum's function over exactly
            // the block's bytes: hand it on.
            slots[i] = Some(reply.map(|sum| ops[i].checksum = Some(sum)));
        }
        Ok(())
    };
    drive(send, recv).await
}

async fn write_exchange(
    conn: &mut Conn,
    ops: &mut [WriteOp<'_>],
    slots: &mut [Slot],
    timeout: Duration,
) -> Result<(), TransferError> {
    let base = conn.next_id;
    conn.next_id += ops.len() as u64;
    let pending: Vec<usize> = (0..ops.len()).filter(|&i| slots[i].is_none()).collect();
    let Conn { reader, writer, .. } = conn;
    let ops = &*ops;
    let send = async {
        for (k, &i) in pending.iter().enumerate() {
            let op = &ops[i];
            let mut h = request(Opcode::Write, base + i as u64, pending.len() - k, op.dst, op.src.len());
            let grant = op.grant.map(|g| g.encode());
            if grant.is_some() {
                // The grant rides before the block (see `frame`).
                h.flags |= FLAG_GRANT;
                h.payload_len += GRANT_LEN as u64;
            }
            timed(timeout, writer.write_all(&h.encode())).await?;
            let mut hasher = PayloadHasher::default();
            if let Some(grant) = &grant {
                hasher.update(grant);
                timed(timeout, writer.write_all(grant)).await?;
            } else if op.src.is_empty() {
                continue;
            }
            for chunk in op.src.chunks(IO_CHUNK) {
                hasher.update(chunk);
                timed(timeout, writer.write_all(chunk)).await?;
            }
            timed(timeout, writer.write_all(&hasher.finish().to_le_bytes())).await?;
        }
        timed(timeout, writer.flush()).await
    };
    let recv = async {
        for &i in &pending {
            slots[i] = Some(recv_write_reply(reader, base + i as u64, timeout).await?);
        }
        Ok(())
    };
    drive(send, recv).await
}

/// Reads a reply header. A connection-level `ERROR` (request id 0) becomes
/// the returned error; so does any header that is not for `expected_id`.
async fn recv_header(
    reader: &mut BufReader<OwnedReadHalf>,
    expected_id: u64,
    timeout: Duration,
) -> Result<FrameHeader, TransferError> {
    let mut raw = [0u8; HEADER_LEN];
    timed(timeout, reader.read_exact(&mut raw)).await?;
    let h = FrameHeader::decode(&raw).map_err(|e| match e {
        HeaderError::VersionMismatch { .. } => TransferError::Rejected(e.to_string()),
        HeaderError::BadMagic | HeaderError::BadChecksum => TransferError::Protocol(format!("reply header: {e}")),
    })?;
    if h.request_id == 0 && h.op() == Some(Opcode::Error) {
        let msg = recv_error_message(reader, &h, timeout).await?;
        return Err(Status::from_u16(h.status).into_error(&msg));
    }
    if h.request_id != expected_id {
        let msg = format!("reply for request {} while expecting {expected_id}", h.request_id);
        return Err(TransferError::Protocol(msg));
    }
    Ok(h)
}

async fn recv_error_message(
    reader: &mut BufReader<OwnedReadHalf>,
    h: &FrameHeader,
    timeout: Duration,
) -> Result<String, TransferError> {
    if h.payload_len > MAX_ERROR_MESSAGE as u64 {
        return Err(TransferError::Protocol(format!("error message of {} bytes", h.payload_len)));
    }
    let mut msg = vec![0u8; h.payload_len as usize];
    if recv_payload(reader, &mut msg, timeout).await?.is_none() {
        return Err(TransferError::Protocol("error message checksum mismatch".to_owned()));
    }
    Ok(String::from_utf8_lossy(&msg).into_owned())
}

/// Receives a payload into `dst`, hashing each chunk while it is in cache;
/// `Ok(Some(hash))` when the trailer matches (the payload's xxh3-64),
/// `Ok(None)` when it does not.
async fn recv_payload(
    reader: &mut BufReader<OwnedReadHalf>,
    dst: &mut [u8],
    timeout: Duration,
) -> Result<Option<u64>, TransferError> {
    if dst.is_empty() {
        return Ok(Some(payload_checksum(dst)));
    }
    let mut hasher = PayloadHasher::default();
    for chunk in dst.chunks_mut(IO_CHUNK) {
        timed(timeout, reader.read_exact(chunk)).await?;
        hasher.update(chunk);
    }
    let mut trailer = [0u8; TRAILER_LEN];
    timed(timeout, reader.read_exact(&mut trailer)).await?;
    let sum = hasher.finish();
    Ok((u64::from_le_bytes(trailer) == sum).then_some(sum))
}

/// The outer error means the connection is unusable; the inner result is
/// the op's: the block's xxh3-64 when it arrived intact.
async fn recv_read_reply(
    reader: &mut BufReader<OwnedReadHalf>,
    id: u64,
    dst: &mut [u8],
    timeout: Duration,
) -> Result<Result<u64, TransferError>, TransferError> {
    let h = recv_header(reader, id, timeout).await?;
    match h.op() {
        Some(Opcode::Data) if h.payload_len == dst.len() as u64 && h.len == h.payload_len => {
            match recv_payload(reader, dst, timeout).await? {
                Some(sum) => Ok(Ok(sum)),
                None => Ok(Err(TransferError::Protocol("read payload checksum mismatch".to_owned()))),
            }
        }
        Some(Opcode::Data) => {
            let msg = format!("reply of {} bytes for a block of {}", h.payload_len, dst.len());
            Err(TransferError::Protocol(msg))
        }
        Some(Opcode::Error) => {
            let msg = recv_error_message(reader, &h, timeout).await?;
            Ok(Err(Status::from_u16(h.status).into_error(&msg)))
        }
        _ => Err(TransferError::Protocol(format!("unexpected reply opcode {:#04x} to a read", h.opcode))),
    }
}

async fn recv_write_reply(
    reader: &mut BufReader<OwnedReadHalf>,
    id: u64,
    timeout: Duration,
) -> Result<Result<(), TransferError>, TransferError> {
    let h = recv_header(reader, id, timeout).await?;
    match h.op() {
        Some(Opcode::WriteOk) if h.payload_len == 0 => Ok(Ok(())),
        Some(Opcode::Error) => {
            let msg = recv_error_message(reader, &h, timeout).await?;
            Ok(Err(Status::from_u16(h.status).into_error(&msg)))
        }
        _ => Err(TransferError::Protocol(format!("unexpected reply opcode {:#04x} to a write", h.opcode))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lens: &[u64], parts: usize) -> Vec<usize> {
        let sizes = split_by_bytes(lens, parts);
        assert_eq!(sizes.iter().sum::<usize>(), lens.len());
        assert!(sizes.iter().all(|&s| s >= 1), "{sizes:?}");
        assert_eq!(sizes.len(), parts.clamp(1, lens.len().max(1)).min(lens.len()));
        sizes
    }

    #[test]
    fn batches_split_into_byte_balanced_contiguous_runs() {
        assert_eq!(check(&[4; 8], 4), vec![2, 2, 2, 2]);
        assert_eq!(check(&[100, 1, 1, 1, 1], 2), vec![1, 4]);
        assert_eq!(check(&[1, 1, 1, 100], 3), vec![2, 1, 1]);
        assert_eq!(check(&[0, 0, 0], 3), vec![1, 1, 1]);
        assert_eq!(check(&[7], 4), vec![1]);
        assert!(split_by_bytes(&[], 4).is_empty());
        let lens: Vec<u64> = (0..1000).map(|i| (i * 7919 % 4096) as u64).collect();
        let sizes = check(&lens, 4);
        let total: u64 = lens.iter().sum();
        let mut at = 0;
        for s in sizes {
            let part: u64 = lens[at..at + s].iter().sum();
            assert!(part <= total / 4 + 4096, "part {part} of {total}");
            at += s;
        }
    }
}
