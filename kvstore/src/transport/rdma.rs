//! One-sided RDMA (feature `rdma`): [`RdmaTransport`] and the data
//! server's half of its handshake.
//!
//! # How it works
//!
//! 1. **Handshake over tcp.** The client opens a connection to the peer's
//!    data port and sends an `RDMA_CONNECT` frame (see [`super::frame`])
//!    carrying its reliable-connected queue pair's endpoint (QP number,
//!    LID, GID, PSN, MTU), the port and GID index it uses, and the segment
//!    ids it wants. The server opens its device (the first one, or
//!    `TANDEM_RDMA_DEVICE`), registers each of those segments' mappings
//!    (`ibv_reg_mr`, remote read + write), creates its own queue pair, and
//!    answers `RDMA_ACCEPT` with its endpoint and `(segment, addr, len,
//!    rkey)` per segment. Both queue pairs go INIT → RTR → RTS. The tcp
//!    connection stays open for the session's life; when it closes, the
//!    server destroys the queue pair and the registrations.
//! 2. **Data path.** Each DRAM op is one signalled `RDMA_READ` (or
//!    `RDMA_WRITE`) between the caller's buffer, registered for the batch,
//!    and the remote range — no server CPU involved. Completions are
//!    busy-polled with a deadline (`rdma.op_timeout_ms`), at most
//!    `rdma.max_outstanding` in flight. Ranges are checked against the
//!    advertised segment sizes before posting (and by the NIC against the
//!    remote registration).
//! 3. **SSD locations** are not in registered memory; they go through a
//!    [`TcpTransport`] to the same peer.
//!
//! A failed completion moves an RC queue pair to the error state: the ops
//! not yet completed fail with [`TransferError::ConnectionLost`] and the next
//! batch builds a new session. On a timeout the queue pair is moved to the
//! error state and its outstanding work requests are flushed before the
//! batch returns (the queue pair is destroyed if the flushes do not come),
//! so the NIC never touches caller memory after `read`/`write` return. The
//! whole post-and-poll runs without an `.await`, so dropping the future
//! cannot cut it short either.
//!
//! # Testing on a machine with an RDMA NIC, or with soft-RoCE
//!
//! This build machine has no RDMA device, so the transport is only compiled
//! here. On a Linux host:
//!
//! ```text
//! # soft-RoCE over an Ethernet interface, if there is no RDMA NIC:
//! sudo modprobe rdma_rxe
//! sudo rdma link add rxe0 type rxe netdev eth0
//! ibv_devices                      # lists rxe0 (or mlx5_0, ...)
//! show_gids                        # RoCE v2 wants the IPv4-mapped GID's index
//! TANDEM_RDMA_GID_INDEX=1 cargo test -p tandem-kvstore --release --features rdma \
//!     --test transport_conformance rdma -- --nocapture
//! ```
//!
//! The conformance test `rdma_conformance_when_a_device_is_present` runs the
//! shared suite over RDMA when `ibverbs::devices()` lists a device, and
//! otherwise prints why it skipped. Memory registration pins pages: raise
//! `ulimit -l` (memlock) to cover the segments.

mod handshake;
mod qp;
mod verbs;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use self::handshake::{decode_reply, encode_reply, RemoteSegment, Request, MAX_HANDSHAKE_SEGMENTS};
use self::qp::{Direction, Item, Verbs};
use self::verbs::{IBV_ACCESS_LOCAL_WRITE, IBV_ACCESS_REMOTE_READ, IBV_ACCESS_REMOTE_WRITE};
use super::frame::{self, FrameHeader, Opcode, Status, HEADER_LEN, MAX_ERROR_MESSAGE, TRAILER_LEN};
use super::{
    run_blocking, BoxFuture, DataTarget, RdmaConfig, ReadOp, TcpConfig, TcpTransport, TransferError, Transport,
    TransportKind, WriteOp,
};
use crate::types::{Location, PeerInfo};

/// Largest single RDMA message on an RC queue pair.
const MAX_MESSAGE_BYTES: usize = 1 << 31;
/// Server-side queue pairs are passive; they need only a token send queue.
const SERVER_MAX_WR: u32 = 16;

/// `Ok(device name)` when an RDMA device (the configured one, or any) is
/// present; otherwise why not.
pub fn device_available(cfg: &RdmaConfig) -> Result<String, String> {
    let list = ibverbs::devices().map_err(|e| format!("no RDMA devices: listing them failed: {e}"))?;
    let names: Vec<String> = list.iter().filter_map(|d| d.name().map(|n| n.to_string_lossy().into_owned())).collect();
    match &cfg.device {
        _ if names.is_empty() => Err("no RDMA devices: ibverbs lists none".to_owned()),
        Some(want) if !names.contains(want) => Err(format!("RDMA device {want} not found (have: {names:?})")),
        Some(want) => Ok(want.clone()),
        None => Ok(names[0].clone()),
    }
}

/// A caller buffer: the destination of a read or the source of a write.
enum Local<'a> {
    Dst(&'a mut [u8]),
    Src(&'a [u8]),
}

impl Local<'_> {
    /// Address and length for a work request. A write's source is only
    /// ever read (by the device), despite the `*mut` the verbs API takes.
    fn raw(&mut self) -> (*mut u8, usize) {
        match self {
            Local::Dst(d) => (d.as_mut_ptr(), d.len()),
            Local::Src(s) => (s.as_ptr().cast_mut(), s.len()),
        }
    }
}

/// A connected client session with one peer.
struct Session {
    verbs: parking_lot::Mutex<Verbs>,
    broken: AtomicBool,
    remote: HashMap<u32, RemoteSegment>,
    /// The handshake connection; closing it ends the server's session.
    _control: TcpStream,
}

/// A transport to one peer over one-sided RDMA, with tcp for SSD blocks.
/// Connects lazily (first batch) and reconnects after a failure.
#[derive(Debug)]
pub struct RdmaTransport {
    peer: String,
    addr: SocketAddr,
    segment_ids: Vec<u32>,
    cfg: RdmaConfig,
    tcp_cfg: TcpConfig,
    ssd: TcpTransport,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("segments", &self.remote.len()).finish_non_exhaustive()
    }
}

impl RdmaTransport {
    /// A transport to `peer`; `tcp` configures the handshake and SSD reads.
    pub fn new(peer: &PeerInfo, cfg: RdmaConfig, tcp: TcpConfig) -> RdmaTransport {
        RdmaTransport {
            peer: peer.name.clone(),
            addr: peer.data_addr,
            segment_ids: peer.segments.iter().map(|s| s.id).collect(),
            ssd: TcpTransport::new(peer.data_addr, tcp.clone()),
            cfg,
            tcp_cfg: tcp,
            session: tokio::sync::Mutex::new(None),
        }
    }

    async fn session(&self) -> Result<Arc<Session>, TransferError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.broken.load(Ordering::Acquire)) {
            return Ok(s.clone());
        }
        *slot = None;
        let session = Arc::new(self.establish().await?);
        *slot = Some(session.clone());
        Ok(session)
    }

    async fn establish(&self) -> Result<Session, TransferError> {
        let reject = TransferError::Rejected;
        let verbs =
            Verbs::open(self.cfg.device.as_deref(), self.cfg.port, self.cfg.gid_index, self.cfg.max_outstanding)
                .map_err(reject)?;
        let request = Request {
            endpoint: verbs.local,
            port: self.cfg.port,
            gid_index: self.cfg.gid_index,
            segments: self.segment_ids.clone(),
        };
        let connect_timeout = Duration::from_millis(self.tcp_cfg.connect_timeout_ms);
        let mut stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(TransferError::Unreachable(format!("{}: {e}", self.addr))),
            Err(_) => return Err(TransferError::Unreachable(format!("{}: connect timed out", self.addr))),
        };
        let op_timeout = Duration::from_millis(self.tcp_cfg.op_timeout_ms);
        if let Some(token) = &self.tcp_cfg.cluster_token {
            // The side channel opens with the cluster token like any data
            // connection.
            super::tcp::hello(&mut stream, token.as_bytes(), op_timeout).await?;
        }
        let reply = tokio::time::timeout(op_timeout, handshake(&mut stream, &request.encode()))
            .await
            .map_err(|_| TransferError::Timeout(self.tcp_cfg.op_timeout_ms))??;
        let (remote, segments) =
            decode_reply(&reply).ok_or_else(|| TransferError::Protocol("malformed RDMA_ACCEPT".to_owned()))?;
        verbs.connect(&remote).map_err(reject)?;
        tracing::info!(peer = %self.peer, segments = segments.len(), "RDMA session established");
        Ok(Session {
            verbs: parking_lot::Mutex::new(verbs),
            broken: AtomicBool::new(false),
            remote: segments.into_iter().map(|s| (s.id, s)).collect(),
            _control: stream,
        })
    }

    /// Resolves a DRAM op against the session's remote segments.
    fn resolve(session: &Session, loc: Location, len: usize) -> Result<(u64, u32), TransferError> {
        let Location::Dram { segment, offset } = loc else {
            return Err(TransferError::Rejected("not a DRAM location".to_owned()));
        };
        let Some(seg) = session.remote.get(&segment) else {
            return Err(TransferError::Rejected(format!("peer has no registered segment {segment}")));
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= seg.len && len <= MAX_MESSAGE_BYTES => Ok((seg.addr + offset, seg.rkey)),
            _ => Err(TransferError::Rejected(format!("range {offset}+{len} is outside segment {segment}"))),
        }
    }

    async fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<(), TransferError>> {
        let mut results = vec![Ok(()); ops.len()];
        let (mut ssd_index, mut ssd_ops) = (Vec::new(), Vec::new());
        let mut dram = Vec::new();
        for (i, op) in ops.iter_mut().enumerate() {
            match op.src {
                Location::Ssd { .. } => {
                    ssd_index.push(i);
                    ssd_ops.push(ReadOp::new(op.src, &mut *op.dst));
                }
                Location::Dram { .. } => dram.push((i, op.src, Local::Dst(&mut *op.dst))),
            }
        }
        if !dram.is_empty() {
            self.run(dram, Direction::Read, &mut results).await;
        }
        if !ssd_ops.is_empty() {
            for (i, r) in ssd_index.into_iter().zip(self.ssd.read(&mut ssd_ops).await) {
                results[i] = r;
            }
        }
        results
    }

    async fn write_batch(&self, ops: &[WriteOp<'_>]) -> Vec<Result<(), TransferError>> {
        let mut results = vec![Ok(()); ops.len()];
        let mut dram = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match op.dst {
                Location::Ssd { .. } => {
                    results[i] = Err(TransferError::Rejected("writes go to DRAM locations only".to_owned()));
                }
                Location::Dram { .. } => dram.push((i, op.dst, Local::Src(op.src))),
            }
        }
        if !dram.is_empty() {
            self.run(dram, Direction::Write, &mut results).await;
        }
        results
    }

    /// Moves the DRAM ops `(index in the batch, location, caller buffer)`.
    async fn run(
        &self,
        mut ops: Vec<(usize, Location, Local<'_>)>,
        dir: Direction,
        results: &mut [Result<(), TransferError>],
    ) {
        let session = match self.session().await {
            Ok(s) => s,
            Err(e) => {
                for (i, ..) in &ops {
                    results[*i] = Err(e.clone());
                }
                return;
            }
        };
        // Raw addresses from here on, with no `.await` before the transfer
        // has finished with them: `ops` keeps the buffers borrowed.
        let mut items = Vec::with_capacity(ops.len());
        for (index, loc, buf) in &mut ops {
            let (index, loc, (local, len)) = (*index, *loc, buf.raw());
            match Self::resolve(&session, loc, len) {
                // An empty block has nothing to move (and cannot be registered).
                Ok(_) if len == 0 => {}
                Ok((remote_addr, rkey)) => items.push(Item { index, local, len, remote_addr, rkey }),
                Err(e) => results[index] = Err(e),
            }
        }
        let healthy = run_blocking(|| session.verbs.lock().transfer(&items, dir, &self.cfg, results));
        if !healthy {
            session.broken.store(true, Ordering::Release);
        }
    }
}

/// Sends the `RDMA_CONNECT` frame and returns the `RDMA_ACCEPT` payload.
async fn handshake(stream: &mut TcpStream, request: &[u8]) -> Result<Vec<u8>, TransferError> {
    let lost = |e: io::Error| TransferError::ConnectionLost(e.to_string());
    let mut h = FrameHeader::new(Opcode::RdmaConnect, 1);
    h.count = 1;
    h.payload_len = request.len() as u64;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(request);
    out.extend_from_slice(&frame::payload_checksum(request).to_le_bytes());
    stream.write_all(&out).await.map_err(lost)?;
    let mut raw = [0u8; HEADER_LEN];
    stream.read_exact(&mut raw).await.map_err(lost)?;
    let reply = FrameHeader::decode(&raw).map_err(|e| TransferError::Rejected(e.to_string()))?;
    let limit = match reply.op() {
        Some(Opcode::Error) => MAX_ERROR_MESSAGE as u64,
        _ => 64 + 24 * MAX_HANDSHAKE_SEGMENTS as u64,
    };
    if reply.payload_len > limit {
        return Err(TransferError::Protocol(format!("handshake reply of {} bytes", reply.payload_len)));
    }
    let mut payload = vec![0u8; reply.payload_len as usize];
    if !payload.is_empty() {
        stream.read_exact(&mut payload).await.map_err(lost)?;
        let mut trailer = [0u8; TRAILER_LEN];
        stream.read_exact(&mut trailer).await.map_err(lost)?;
        if u64::from_le_bytes(trailer) != frame::payload_checksum(&payload) {
            return Err(TransferError::Protocol("handshake reply checksum mismatch".to_owned()));
        }
    }
    match reply.op() {
        Some(Opcode::RdmaAccept) => Ok(payload),
        Some(Opcode::Error) => {
            let msg = String::from_utf8_lossy(&payload);
            Err(match Status::from_u16(reply.status) {
                Status::Unsupported => TransferError::Rejected(format!("peer cannot do RDMA: {msg}")),
                status => status.into_error(&msg),
            })
        }
        _ => Err(TransferError::Protocol(format!("unexpected handshake reply opcode {:#04x}", reply.opcode))),
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(self.read_batch(ops))
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(self.write_batch(ops))
    }
}

/// The server's side of one RDMA session: its queue pair and the segment
/// registrations, alive until the client closes the handshake connection.
pub(crate) struct ServerSession {
    /// Dropped first: queue pair and registrations go before the mappings.
    _verbs: Verbs,
    _segments: Vec<Arc<crate::segment::Segment>>,
}

/// Serves an `RDMA_CONNECT` payload: registers the requested segments,
/// connects a queue pair to the client's, and returns the `RDMA_ACCEPT`
/// payload with the session to keep alive.
pub(crate) fn server_accept(target: &Arc<dyn DataTarget>, request: &[u8]) -> Result<(Vec<u8>, ServerSession), String> {
    let req = Request::decode(request).ok_or("malformed RDMA_CONNECT payload")?;
    let device = std::env::var("TANDEM_RDMA_DEVICE").ok();
    let mut verbs = Verbs::open(device.as_deref(), req.port, req.gid_index, SERVER_MAX_WR)?;
    let mut segments = Vec::new();
    let mut table = Vec::new();
    let access = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    for &id in &req.segments {
        let Some(seg) = target.segment(id) else { continue };
        let len = usize::try_from(seg.len()).map_err(|_| format!("segment {id} too large"))?;
        // Only the address is kept; the device, not Rust code, accesses the
        // range, within the registration.
        let addr = seg.slice_mut(0, len).map_err(|e| e.to_string())?.as_mut_ptr();
        let mr = verbs.register(addr, len, access)?;
        table.push(RemoteSegment { id, rkey: mr.rkey(), addr: addr as u64, len: len as u64 });
        verbs.mrs.push(mr);
        segments.push(seg);
    }
    verbs.connect(&req.endpoint)?;
    let reply = encode_reply(&verbs.local, &table);
    Ok((reply, ServerSession { _verbs: verbs, _segments: segments }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_check_explains_itself() {
        match device_available(&RdmaConfig::default()) {
            Ok(name) => assert!(!name.is_empty()),
            Err(reason) => assert!(reason.contains("RDMA"), "{reason}"),
        }
        let cfg = RdmaConfig { device: Some("no-such-device".to_owned()), ..RdmaConfig::default() };
        assert!(device_available(&cfg).is_err());
    }
}
