//! Queue-pair plumbing over [`super::verbs`]: opening a device, connecting
//! an RC queue pair, registering memory, and running one batch of one-sided
//! work requests to completion.

use std::ffi::CStr;
use std::io;
use std::os::raw::c_int;
use std::time::{Duration, Instant};

use super::handshake::Endpoint;
use super::verbs::*;
use crate::transport::{RdmaConfig, TransferError};

/// How long flushed work requests may take to complete after a failure.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

fn os_error(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// One device context with a protection domain, a completion queue and an
/// RC queue pair, plus memory registered for the session's life. Destroyed
/// in dependency order on drop.
pub(super) struct Verbs {
    ctx: *mut ibv_context,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    pub(super) mrs: Vec<Mr>,
    port: u8,
    gid_index: u8,
    pub(super) local: Endpoint,
}

// SAFETY: libibverbs objects may be used from any thread (the library is
// thread safe); `Verbs` is only reached through a mutex (client) or owned by
// one task (server), so no two threads drive the queue pair at once.
unsafe impl Send for Verbs {}

impl Verbs {
    /// Opens `device` (the first when `None`) and creates an RC queue pair
    /// in state INIT on `port`.
    pub(super) fn open(device: Option<&str>, port: u8, gid_index: u8, max_wr: u32) -> Result<Verbs, String> {
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
    pub(super) fn connect(&self, remote: &Endpoint) -> Result<(), String> {
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
    pub(super) fn register(&self, addr: *mut u8, len: usize, access: c_int) -> Result<Mr, String> {
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
pub(super) struct Mr(*mut ibv_mr);

impl Mr {
    fn lkey(&self) -> u32 {
        // SAFETY: the registration is live while `self` is.
        unsafe { (*self.0).lkey }
    }
    pub(super) fn rkey(&self) -> u32 {
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
pub(super) enum Direction {
    Read,
    Write,
}

/// One op, resolved to a local buffer and a remote range.
pub(super) struct Item {
    pub(super) index: usize,
    pub(super) local: *mut u8,
    pub(super) len: usize,
    pub(super) remote_addr: u64,
    pub(super) rkey: u32,
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

impl Verbs {
    /// Posts every item and polls its completions, synchronously, so the
    /// caller's buffers cannot go away while the device may touch them;
    /// fills `results[item.index]`. `false` when the queue pair failed and
    /// the session must be rebuilt.
    pub(super) fn transfer(
        &mut self,
        items: &[Item],
        dir: Direction,
        cfg: &RdmaConfig,
        results: &mut [Result<(), TransferError>],
    ) -> bool {
        let verbs = self;
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
        // The deadline moves with progress: a long batch is fine, a stall is not.
        let mut deadline = Instant::now() + timeout;
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
                    if !completed.is_empty() {
                        deadline = Instant::now() + timeout;
                    } else if Instant::now() > deadline {
                        failure = Some(TransferError::Timeout(cfg.op_timeout_ms));
                    } else {
                        std::hint::spin_loop();
                    }
                }
                Err(e) => failure = Some(TransferError::ConnectionLost(e)),
            }
        }
        let Some(e) = failure else {
            return true;
        };
        if outstanding > 0 {
            drain(verbs, &mut outstanding);
        }
        for (k, item) in items.iter().enumerate() {
            if mrs[k].is_some() && !done[k] && results[item.index].is_ok() {
                results[item.index] = Err(e.clone());
            }
        }
        drop(mrs);
        false
    }
}
