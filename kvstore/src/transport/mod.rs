//! The transfer engine (DESIGN.md §4): one [`Transport`] per peer storage
//! node, called per batch of blocks, never per byte.
//!
//! Implementations are chosen at run time per peer by [`connect`]: `shm` for
//! a peer on the same host, `tcp` otherwise, `rdma` when compiled in and
//! asked for.
//!
//! - [`frame`] — the tcp wire format (header table, checksums).
//! - [`server`] — [`DataServer`], a storage node's tcp data port, serving
//!   a [`DataTarget`] (the node's segments and SSD tier).
//! - [`tcp`] — [`TcpTransport`], striped pipelined connections to one peer.
//! - [`shm`] — [`ShmTransport`], `memcpy` through the peer's mapped segment
//!   files, no RPC on the data path.
//! - [`faulty`] — [`FaultyTransport`], seeded fault injection for tests.
//! - `rdma` (feature `rdma`) — one-sided RDMA READ/WRITE through ibverbs.
//! - [`config`] — [`TransportConfig`].

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use tandem_proto::BlockKey;

use crate::grant::WriteGrant;
use crate::segment::Segment;
use crate::types::{Location, PeerInfo};

pub mod config;
pub mod faulty;
pub mod frame;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod server;
pub mod shm;
pub mod tcp;

pub use config::{RdmaConfig, ShmConfig, TcpConfig, TransportConfig, TransportPreference};
pub use faulty::{FaultConfig, FaultStats, Faults, FaultyTransport};
#[cfg(feature = "rdma")]
pub use rdma::RdmaTransport;
pub use server::DataServer;
pub use shm::ShmTransport;
pub use tcp::TcpTransport;

/// A boxed future, so transports can be used as `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Read one block from the peer into caller memory (zero-copy where the
/// transport allows). `dst.len()` is the block's length.
#[derive(Debug)]
pub struct ReadOp<'a> {
    /// Where the block sits on the peer.
    pub src: Location,
    /// Caller memory the block lands in.
    pub dst: &'a mut [u8],
    /// Set by a transport that hashed the bytes as they arrived, with the
    /// block checksum's function (xxh3-64 of all of `dst`), so that the
    /// reader need not hash them again. `None` when the transport did not
    /// (or changed the bytes since).
    pub checksum: Option<u64>,
}

impl<'a> ReadOp<'a> {
    pub fn new(src: Location, dst: &'a mut [u8]) -> ReadOp<'a> {
        ReadOp { src, dst, checksum: None }
    }
}

/// Write one block from caller memory to a DRAM range the master reserved.
#[derive(Debug)]
pub struct WriteOp<'a> {
    /// A [`Location::Dram`] range; an SSD location is [`TransferError::Rejected`].
    pub dst: Location,
    /// The block's bytes.
    pub src: &'a [u8],
    /// The grant `put_start` gave for the reserved range; sent by the tcp
    /// transport (a storage node's data port refuses writes without one).
    pub grant: Option<WriteGrant>,
}

/// Which implementation a transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Same-host copies through mapped segment files.
    Shm,
    /// Framed requests over striped tcp connections.
    Tcp,
    /// One-sided RDMA READ/WRITE (feature `rdma`).
    Rdma,
}

/// Why a transfer (or one block of it) failed. Every variant means "no
/// bytes you can trust": the caller treats the block as a miss or tries
/// another replica.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    #[error("connection lost mid-transfer: {0}")]
    ConnectionLost(String),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("peer rejected the request: {0}")]
    Rejected(String),
    #[error("block not found on peer")]
    NotFound,
    #[error("io error: {0}")]
    Io(String),
}

/// Moves batches of blocks to and from one peer storage node.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Which implementation this is.
    fn kind(&self) -> TransportKind;

    /// Reads every op; the result has one entry per op, in order.
    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>>;

    /// Writes every op; the result has one entry per op, in order.
    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>>;
}

impl TransferError {
    /// Whether trying the same peer again may succeed (as opposed to a
    /// request the peer will always refuse, or a block it does not have).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TransferError::Unreachable(_) | TransferError::ConnectionLost(_) | TransferError::Timeout(_))
    }
}

/// What a storage node's [`DataServer`] serves: implemented by the node.
pub trait DataTarget: Send + Sync + 'static {
    /// DRAM segment `id`, if the node has it.
    fn segment(&self, id: u32) -> Option<Arc<Segment>>;

    /// Reads SSD block `key` into `dst` (`dst.len()` bytes, the block's
    /// length). Blocking file I/O: the server calls it on the blocking pool.
    /// [`TransferError::NotFound`] when the node has no such block.
    fn read_ssd(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), TransferError>;

    /// Whether SSD block `key` may be `len` bytes long, asked before the
    /// server allocates `len` bytes for a read (so a request for a block
    /// the node does not hold costs no memory). The default says yes and
    /// leaves the answer to [`DataTarget::read_ssd`].
    fn ssd_block_fits(&self, key: BlockKey, len: u64) -> bool {
        let _ = (key, len);
        true
    }

    /// Whether a write of `len` bytes at `offset` of `segment`, carrying
    /// the encoded `grant` (if any), may land; `Err(why)` refuses it before
    /// a byte is written. The default takes every in-bounds write (test and
    /// bench targets); a storage node checks the write's grant.
    fn authorize_write(&self, segment: u32, offset: u64, len: u64, grant: Option<&[u8]>) -> Result<(), String> {
        let _ = (segment, offset, len, grant);
        Ok(())
    }
}

impl std::fmt::Debug for dyn DataTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataTarget")
    }
}

/// The transport for `peer`, per `cfg.prefer` (see [`TransportPreference`]).
/// Connections are made lazily: an unreachable peer shows up as
/// [`TransferError::Unreachable`] on the first batch, not here.
pub fn connect(
    peer: &PeerInfo,
    local_host_id: &str,
    cfg: &TransportConfig,
) -> Result<Arc<dyn Transport>, TransferError> {
    cfg.validate().map_err(TransferError::Rejected)?;
    let same_host = !peer.host_id.is_empty() && peer.host_id == local_host_id;
    match cfg.prefer {
        TransportPreference::Auto | TransportPreference::Shm if same_host => {
            Ok(Arc::new(ShmTransport::new(peer, cfg.shm.clone())))
        }
        TransportPreference::Shm => Err(TransferError::Rejected(format!(
            "shm transport asked for, but peer {} is on host {:?} and this process on {:?}",
            peer.name, peer.host_id, local_host_id
        ))),
        TransportPreference::Auto | TransportPreference::Tcp => {
            Ok(Arc::new(TcpTransport::new(peer.data_addr, cfg.tcp.clone())))
        }
        TransportPreference::Rdma => rdma_transport(peer, cfg),
    }
}

#[cfg(feature = "rdma")]
fn rdma_transport(peer: &PeerInfo, cfg: &TransportConfig) -> Result<Arc<dyn Transport>, TransferError> {
    rdma::device_available(&cfg.rdma).map_err(TransferError::Rejected)?;
    Ok(Arc::new(RdmaTransport::new(peer, cfg.rdma.clone(), cfg.tcp.clone())))
}

#[cfg(not(feature = "rdma"))]
fn rdma_transport(_peer: &PeerInfo, _cfg: &TransportConfig) -> Result<Arc<dyn Transport>, TransferError> {
    Err(TransferError::Rejected(rdma_unavailable_reason()))
}

/// `Ok(device name)` when RDMA can be used: compiled in (feature `rdma`)
/// and a device is present; otherwise why not.
pub fn rdma_available(cfg: &RdmaConfig) -> Result<String, String> {
    #[cfg(feature = "rdma")]
    {
        rdma::device_available(cfg)
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = cfg;
        Err(rdma_unavailable_reason())
    }
}

#[cfg(not(feature = "rdma"))]
fn rdma_unavailable_reason() -> String {
    "rdma transport not compiled in: rebuild tandem-kvstore with `--features rdma`".to_owned()
}

/// Runs blocking work (copies, `pread`, RDMA completion polling) without
/// stalling the runtime: in place on a multi-threaded runtime's worker,
/// which first hands its other tasks off; inline elsewhere (a
/// current-thread runtime cannot do that).
pub(crate) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A stable identity of this host as seen by the shm transport: two
/// processes with the same id can map each other's segment files.
///
/// Hashes the machine id, the boot id (segments do not survive a reboot)
/// and the device of `/dev/shm` (containers on one machine with separate
/// shared-memory mounts must not try to map each other's files).
pub fn local_host_id() -> String {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default();
        let mut machine = read("/etc/machine-id");
        if machine.is_empty() {
            machine = read("/var/lib/dbus/machine-id");
        }
        if machine.is_empty() {
            machine = read("/proc/sys/kernel/hostname");
        }
        let boot = read("/proc/sys/kernel/random/boot_id");
        let shm_dev = std::fs::metadata(Path::new("/dev/shm")).map(|m| m.dev()).unwrap_or(0);
        let text = format!("{machine}\0{boot}\0{shm_dev}");
        format!("host-{:016x}", twox_hash::XxHash3_64::oneshot(text.as_bytes()))
    })
    .clone()
}
