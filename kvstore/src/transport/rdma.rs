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

mod verbs;

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use self::verbs::*;
use super::frame::{self, FrameHeader, Opcode, Status, HEADER_LEN, MAX_ERROR_MESSAGE, TRAILER_LEN};
use super::{
    run_blocking, BoxFuture, DataTarget, RdmaConfig, ReadOp, TcpConfig, TcpTransport, TransferError, Transport,
    TransportKind, WriteOp,
};
use crate::types::{Location, PeerInfo};

/// Most segments one handshake may name.
const MAX_HANDSHAKE_SEGMENTS: usize = 4096;
/// Largest single RDMA message on an RC queue pair.
const MAX_MESSAGE_BYTES: usize = 1 << 31;
/// How long flushed work requests may take to complete after a timeout.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
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

/// One side's queue-pair endpoint, as exchanged in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Endpoint {
    qp_num: u32,
    lid: u16,
    gid: [u8; 16],
    psn: u32,
    /// `enum ibv_mtu` of the port.
    mtu: u32,
}

/// A remote segment as the server registered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RemoteSegment {
    id: u32,
    rkey: u32,
    addr: u64,
    len: u64,
}

/// Handshake request: the client's endpoint, its port and GID index (the
/// server uses the same ones), and the segments it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    endpoint: Endpoint,
    port: u8,
    gid_index: u8,
    segments: Vec<u32>,
}

/// Little-endian reader over a handshake payload; `None` when it runs out.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn count(&mut self) -> Option<usize> {
        self.u32().map(|n| n as usize).filter(|&n| n <= MAX_HANDSHAKE_SEGMENTS)
    }
}

fn put_endpoint(out: &mut Vec<u8>, e: &Endpoint, port: u8, gid_index: u8) {
    out.extend_from_slice(&e.qp_num.to_le_bytes());
    out.extend_from_slice(&e.lid.to_le_bytes());
    out.push(port);
    out.push(gid_index);
    out.extend_from_slice(&e.gid);
    out.extend_from_slice(&e.psn.to_le_bytes());
    out.extend_from_slice(&e.mtu.to_le_bytes());
}

fn get_endpoint(c: &mut Cursor<'_>) -> Option<(Endpoint, u8, u8)> {
    let qp_num = c.u32()?;
    let lid = c.u16()?;
    let port = c.u8()?;
    let gid_index = c.u8()?;
    let gid = c.take::<16>()?;
    let psn = c.u32()?;
    let mtu = c.u32()?;
    Some((Endpoint { qp_num, lid, gid, psn, mtu }, port, gid_index))
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40 + 4 * self.segments.len());
        put_endpoint(&mut out, &self.endpoint, self.port, self.gid_index);
        out.extend_from_slice(&(self.segments.len() as u32).to_le_bytes());
        for id in &self.segments {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Request> {
        let mut c = Cursor(bytes);
        let (endpoint, port, gid_index) = get_endpoint(&mut c)?;
        let n = c.count()?;
        let segments = (0..n).map(|_| c.u32()).collect::<Option<Vec<u32>>>()?;
        c.0.is_empty().then_some(Request { endpoint, port, gid_index, segments })
    }
}

fn encode_reply(endpoint: &Endpoint, segments: &[RemoteSegment]) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + 24 * segments.len());
    put_endpoint(&mut out, endpoint, 0, 0);
    out.extend_from_slice(&(segments.len() as u32).to_le_bytes());
    for s in segments {
        out.extend_from_slice(&s.id.to_le_bytes());
        out.extend_from_slice(&s.rkey.to_le_bytes());
        out.extend_from_slice(&s.addr.to_le_bytes());
        out.extend_from_slice(&s.len.to_le_bytes());
    }
    out
}

fn decode_reply(bytes: &[u8]) -> Option<(Endpoint, Vec<RemoteSegment>)> {
    let mut c = Cursor(bytes);
    let (endpoint, _, _) = get_endpoint(&mut c)?;
    let n = c.count()?;
    let segments = (0..n)
        .map(|_| Some(RemoteSegment { id: c.u32()?, rkey: c.u32()?, addr: c.u64()?, len: c.u64()? }))
        .collect::<Option<Vec<_>>>()?;
    c.0.is_empty().then_some((endpoint, segments))
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// One device context with a protection domain, a completion queue and an
/// RC queue pair, plus memory registered for the session's life. Destroyed
/// in dependency order on drop.
struct Verbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mrs: Vec<Mr>,
    port: u8,
    gid_index: u8,
    local: Endpoint,
}

// SAFETY: libibverbs objects may be used from any thread (the library is
// thread safe); `Verbs` is only reached through a mutex (client) or owned by
// one task (server), so no two threads drive the queue pair at once.
unsafe impl Send for Verbs {}

impl Verbs {
    /// Opens `device` (the first when `None`) and creates an RC queue pair
    /// in state INIT on `port`.
    fn open(device: Option<&str>, port: u8, gid_index: u8, max_wr: u32) -> Result<Verbs, String> {
        let mut v = Verbs {
            ctx: std::ptr::null_mut(),
            pd: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            mrs: Vec::new(),
            port,
            gid_index,
            local: Endpoint { qp_num: 0, lid: 0, gid: [0; 16], psn: rand::random::<u32>() & 0xff_ffff, mtu: 0 },
        };
        v.ctx = open_device(device)?;
        let mut port_attr = ibv_port_attr::default();
        // SAFETY: `ctx` is an open device context; `port_attr` is a valid,
        // zeroed `ibv_port_attr`, at least as large as the library writes.
        if unsafe { ibv_query_port(v.ctx, port, &mut port_attr) } != 0 {
            return Err(os_error(&format!("querying RDMA port {port}")));
        }
        if port_attr.state != IBV_PORT_ACTIVE {
            return Err(format!("RDMA port {port} is not active (state {})", port_attr.state));
        }
        let mut gid = ibv_gid::default();
        // SAFETY: as above; `gid` is a valid `union ibv_gid`.
        if unsafe { ibv_query_gid(v.ctx, port, c_int::from(gid_index), &mut gid) } != 0 {
            return Err(os_error(&format!("reading GID {gid_index} of port {port}")));
        }
        if port_attr.link_layer == IBV_LINK_LAYER_ETHERNET && gid.raw == [0; 16] {
            return Err(format!("GID index {gid_index} of RoCE port {port} is empty; set rdma.gid_index"));
        }
        v.local.lid = port_attr.lid;
        v.local.gid = gid.raw;
        v.local.mtu = port_attr.active_mtu;
        // SAFETY: `ctx` is open; the returned pointers are checked below and
        // owned by `v`, whose drop releases them in reverse order.
        unsafe {
            v.pd = ibv_alloc_pd(v.ctx);
            if v.pd.is_null() {
                return Err(os_error("allocating a protection domain"));
            }
            let cqe = c_int::try_from(max_wr * 2).unwrap_or(c_int::MAX);
            v.cq = ibv_create_cq(v.ctx, cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0);
            if v.cq.is_null() {
                return Err(os_error("creating a completion queue"));
            }
            let mut init = ibv_qp_init_attr {
                qp_context: std::ptr::null_mut(),
                send_cq: v.cq,
                recv_cq: v.cq,
                srq: std::ptr::null_mut(),
                cap: ibv_qp_cap {
                    max_send_wr: max_wr,
                    max_recv_wr: 1,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: IBV_QPT_RC,
                sq_sig_all: 0,
            };
            v.qp = ibv_create_qp(v.pd, &mut init);
            if v.qp.is_null() {
                return Err(os_error("creating a queue pair"));
            }
            v.local.qp_num = (*v.qp).qp_num;
        }
        let mut attr = ibv_qp_attr {
            qp_state: IBV_QPS_INIT,
            pkey_index: 0,
            port_num: port,
            qp_access_flags: IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE,
            ..ibv_qp_attr::default()
        };
        v.modify(&mut attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS, "INIT")?;
        Ok(v)
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: c_int, state: &str) -> Result<(), String> {
        // SAFETY: `qp` is a live queue pair; `attr` is a valid attribute
        // struct whose fields named by `mask` are set.
        let errno = unsafe { ibv_modify_qp(self.qp, attr, mask) };
        if errno != 0 {
            return Err(format!("moving the queue pair to {state}: {}", io::Error::from_raw_os_error(errno)));
        }
        Ok(())
    }

    /// Connects the queue pair to `remote` (INIT → RTR → RTS).
    fn connect(&self, remote: &Endpoint) -> Result<(), String> {
        let global = remote.gid != [0; 16];
        let mut attr = ibv_qp_attr {
            qp_state: IBV_QPS_RTR,
            path_mtu: self.local.mtu.min(remote.mtu),
            dest_qp_num: remote.qp_num,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 16,
            min_rnr_timer: 12,
            ah_attr: ibv_ah_attr {
                grh: ibv_global_route {
                    dgid: ibv_gid { raw: remote.gid },
                    flow_label: 0,
                    sgid_index: self.gid_index,
                    hop_limit: 64,
                    traffic_class: 0,
                },
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                static_rate: 0,
                is_global: u8::from(global),
                port_num: self.port,
            },
            ..ibv_qp_attr::default()
        };
        let mask = IBV_QP_STATE
            | IBV_QP_AV
            | IBV_QP_PATH_MTU
            | IBV_QP_DEST_QPN
            | IBV_QP_RQ_PSN
            | IBV_QP_MAX_DEST_RD_ATOMIC
            | IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut attr, mask, "RTR")?;
        let mut attr = ibv_qp_attr {
            qp_state: IBV_QPS_RTS,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: self.local.psn,
            max_rd_atomic: 16,
            ..ibv_qp_attr::default()
        };
        let mask = IBV_QP_STATE
            | IBV_QP_TIMEOUT
            | IBV_QP_RETRY_CNT
            | IBV_QP_RNR_RETRY
            | IBV_QP_SQ_PSN
            | IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, mask, "RTS")
    }

    /// Registers `len` bytes at `addr`; the registration is released with
    /// the returned guard.
    fn register(&self, addr: *mut u8, len: usize, access: c_int) -> Result<Mr, String> {
        // SAFETY: `pd` is live; the caller keeps `addr..addr + len` mapped
        // for as long as the guard lives (batch buffers outlive their batch,
        // server segments are held by the session).
        let mr = unsafe { ibv_reg_mr(self.pd, addr.cast(), len, access) };
        if mr.is_null() {
            return Err(os_error(&format!("registering {len} bytes")));
        }
        Ok(Mr(mr))
    }

    /// Moves the queue pair to the error state: every outstanding work
    /// request completes with a flush error.
    fn fail(&self) {
        let mut attr = ibv_qp_attr { qp_state: IBV_QPS_ERR, ..ibv_qp_attr::default() };
        if let Err(e) = self.modify(&mut attr, IBV_QP_STATE, "ERR") {
            tracing::warn!(error = %e, "could not fail the RDMA queue pair");
        }
    }

    /// Destroys the queue pair now; after this the device no longer touches
    /// memory on its behalf.
    fn destroy_qp(&mut self) {
        if !self.qp.is_null() {
            // SAFETY: `qp` is live and destroyed exactly once (nulled below).
            let errno = unsafe { ibv_destroy_qp(self.qp) };
            if errno != 0 {
                tracing::warn!(errno, "ibv_destroy_qp failed");
            }
            self.qp = std::ptr::null_mut();
        }
    }

    fn post(&self, wr: &mut ibv_send_wr) -> Result<(), String> {
        if self.qp.is_null() {
            return Err("queue pair destroyed".to_owned());
        }
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: `qp` is live, so its context and ops table are; `wr` and
        // its scatter list are valid for the duration of the call (the
        // provider copies them into the send queue).
        let errno = unsafe {
            match (*(*self.qp).context).ops.post_send {
                Some(post_send) => post_send(self.qp, wr, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if errno != 0 {
            return Err(format!("posting a work request: {}", io::Error::from_raw_os_error(errno)));
        }
        Ok(())
    }

    fn poll<'w>(&self, wcs: &'w mut [ibv_wc]) -> Result<&'w [ibv_wc], String> {
        let n = c_int::try_from(wcs.len()).unwrap_or(c_int::MAX);
        // SAFETY: `cq` is live, so its context and ops table are; `wcs` has
        // room for `n` completions.
        let got = unsafe {
            match (*(*self.cq).context).ops.poll_cq {
                Some(poll_cq) => poll_cq(self.cq, n, wcs.as_mut_ptr()),
                None => -1,
            }
        };
        let got = usize::try_from(got).map_err(|_| "polling the completion queue failed".to_owned())?;
        Ok(&wcs[..got.min(wcs.len())])
    }
}

impl Drop for Verbs {
    fn drop(&mut self) {
        self.destroy_qp();
        self.mrs.clear();
        // SAFETY: each handle is live (or null) and released once, after
        // everything that depends on it.
        unsafe {
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ibv_close_device(self.ctx);
            }
        }
    }
}

/// A memory registration, released on drop.
struct Mr(*mut ibv_mr);

impl Mr {
    fn lkey(&self) -> u32 {
        // SAFETY: the registration is live while `self` is.
        unsafe { (*self.0).lkey }
    }
    fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.0).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: live registration, released once; no work request using
        // it is outstanding (callers drain or destroy the queue pair first).
        let errno = unsafe { ibv_dereg_mr(self.0) };
        if errno != 0 {
            tracing::warn!(errno, "ibv_dereg_mr failed");
        }
    }
}

fn open_device(want: Option<&str>) -> Result<*mut ibv_context, String> {
    let mut n: c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the list is freed below, after
    // the chosen device was opened (contexts outlive the list).
    unsafe {
        let list = ibv_get_device_list(&mut n);
        if list.is_null() {
            return Err(os_error("no RDMA devices"));
        }
        let devices = std::slice::from_raw_parts(list, usize::try_from(n).unwrap_or(0));
        let name = |d: *mut ibv_device| {
            let p = ibv_get_device_name(d);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let chosen = devices.iter().copied().find(|&d| want.is_none_or(|w| name(d).as_deref() == Some(w)));
        let ctx = chosen.map_or(std::ptr::null_mut(), |d| ibv_open_device(d));
        let err = match (chosen, ctx.is_null()) {
            (None, _) => Some(format!("RDMA device {} not found", want.unwrap_or("(any)"))),
            (Some(_), true) => Some(os_error("opening the RDMA device")),
            (Some(_), false) => None,
        };
        ibv_free_device_list(list);
        err.map_or(Ok(ctx), Err)
    }
}

/// What a batch moves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
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

/// One op, resolved to a local buffer and a remote range.
struct Item {
    index: usize,
    local: *mut u8,
    len: usize,
    remote_addr: u64,
    rkey: u32,
}

/// A connected client session with one peer.
struct Session {
    verbs: parking_lot::Mutex<Verbs>,
    broken: AtomicBool,
    remote: HashMap<u32, RemoteSegment>,
    /// The handshake connection; closing it ends the server's session.
    _control: TcpStream,
}

impl Session {
    /// Posts every item and polls its completion: synchronously, so the
    /// caller's buffers cannot go away while the device may touch them.
    fn transfer(&self, items: &[Item], dir: Direction, cfg: &RdmaConfig, results: &mut [Result<(), TransferError>]) {
        let mut verbs = self.verbs.lock();
        let access = match dir {
            Direction::Read => IBV_ACCESS_LOCAL_WRITE,
            Direction::Write => 0,
        };
        // Registrations are released (guards dropped) only after every
        // posted request completed or the queue pair is gone.
        let mut mrs = Vec::with_capacity(items.len());
        for item in items {
            match verbs.register(item.local, item.len, access) {
                Ok(mr) => mrs.push(Some(mr)),
                Err(e) => {
                    results[item.index] = Err(TransferError::Io(e));
                    mrs.push(None);
                }
            }
        }
        let timeout = Duration::from_millis(cfg.op_timeout_ms);
        let deadline = Instant::now() + timeout;
        let window = cfg.max_outstanding as usize;
        let mut done = vec![false; items.len()];
        let mut wcs = [ibv_wc::default(); 32];
        let (mut next, mut outstanding) = (0usize, 0usize);
        let mut failure: Option<TransferError> = None;
        while failure.is_none() && (next < items.len() || outstanding > 0) {
            while outstanding < window && next < items.len() {
                let (k, item) = (next, &items[next]);
                next += 1;
                let Some(mr) = &mrs[k] else { continue };
                let mut sge = ibv_sge { addr: item.local as u64, length: item.len as u32, lkey: mr.lkey() };
                let mut wr = ibv_send_wr {
                    wr_id: k as u64,
                    sg_list: &mut sge,
                    num_sge: 1,
                    opcode: if dir == Direction::Read { IBV_WR_RDMA_READ } else { IBV_WR_RDMA_WRITE },
                    send_flags: IBV_SEND_SIGNALED,
                    rdma_remote_addr: item.remote_addr,
                    rdma_rkey: item.rkey,
                    ..ibv_send_wr::default()
                };
                match verbs.post(&mut wr) {
                    Ok(()) => outstanding += 1,
                    Err(e) => {
                        failure = Some(TransferError::ConnectionLost(e));
                        break;
                    }
                }
            }
            if outstanding == 0 {
                continue;
            }
            match verbs.poll(&mut wcs) {
                Ok(completed) => {
                    for wc in completed {
                        let Some(k) = usize::try_from(wc.wr_id()).ok().filter(|&k| k < items.len()) else { continue };
                        outstanding = outstanding.saturating_sub(1);
                        done[k] = true;
                        if wc.is_valid() {
                            results[items[k].index] = Ok(());
                        } else {
                            let msg = format!("RDMA completion failed: {:?}", wc.error());
                            results[items[k].index] = Err(TransferError::ConnectionLost(msg.clone()));
                            failure.get_or_insert(TransferError::ConnectionLost(msg));
                        }
                    }
                    if completed.is_empty() {
                        if Instant::now() > deadline {
                            failure = Some(TransferError::Timeout(cfg.op_timeout_ms));
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                }
                Err(e) => failure = Some(TransferError::ConnectionLost(e)),
            }
        }
        if let Some(e) = failure {
            self.broken.store(true, Ordering::Release);
            if outstanding > 0 {
                drain(&mut verbs, &mut outstanding);
            }
            for (k, item) in items.iter().enumerate() {
                if mrs[k].is_some() && !done[k] && results[item.index].is_ok() {
                    results[item.index] = Err(e.clone());
                }
            }
        }
        drop(mrs);
    }
}

/// After a failure: flush the queue pair's outstanding requests, or destroy
/// it when the flushes do not come, so nothing still targets the batch's
/// buffers.
fn drain(verbs: &mut Verbs, outstanding: &mut usize) {
    verbs.fail();
    let deadline = Instant::now() + FLUSH_TIMEOUT;
    let mut wcs = [ibv_wc::default(); 32];
    while *outstanding > 0 && Instant::now() < deadline {
        match verbs.poll(&mut wcs) {
            Ok(completed) => *outstanding = outstanding.saturating_sub(completed.len()),
            Err(_) => break,
        }
    }
    if *outstanding > 0 {
        verbs.destroy_qp();
        *outstanding = 0;
    }
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
                    ssd_ops.push(ReadOp { src: op.src, dst: &mut *op.dst });
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
        run_blocking(|| session.transfer(&items, dir, &self.cfg, results));
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

    fn endpoint() -> Endpoint {
        Endpoint { qp_num: 0x1234, lid: 7, gid: [9; 16], psn: 0xabcdef, mtu: 5 }
    }

    #[test]
    fn handshake_payloads_round_trip_and_reject_damage() {
        let req = Request { endpoint: endpoint(), port: 1, gid_index: 3, segments: vec![0, 1, 7] };
        let bytes = req.encode();
        assert_eq!(Request::decode(&bytes), Some(req));
        assert_eq!(Request::decode(&bytes[..bytes.len() - 1]), None, "truncated");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Request::decode(&longer), None, "trailing bytes");
        let mut huge = bytes[..34].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Request::decode(&huge), None, "absurd segment count");

        let segs = vec![RemoteSegment { id: 3, rkey: 99, addr: 1 << 40, len: 1 << 30 }];
        let reply = encode_reply(&endpoint(), &segs);
        assert_eq!(decode_reply(&reply), Some((endpoint(), segs)));
        assert_eq!(decode_reply(&reply[..10]), None);
    }

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
