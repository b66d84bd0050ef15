//! The transfer engine (DESIGN.md §4): one [`Transport`] per peer storage
//! node, called per batch of blocks, never per byte.
//!
//! Implementations are chosen at run time per peer by [`connect`]: `shm` for
//! a peer on the same host, `tcp` otherwise, `rdma` when compiled in and a
//! device is present.

use std::future::Future;
use std::pin::Pin;

use crate::types::Location;

/// A boxed future, so transports can be used as `dyn Transport`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Read one block from the peer into caller memory (zero-copy where the
/// transport allows). `dst.len()` is the block's length.
#[derive(Debug)]
pub struct ReadOp<'a> {
    pub src: Location,
    pub dst: &'a mut [u8],
}

/// Write one block from caller memory to a DRAM range the master reserved.
#[derive(Debug)]
pub struct WriteOp<'a> {
    pub dst: Location,
    pub src: &'a [u8],
}

/// Which implementation a transport is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    Shm,
    Tcp,
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
    fn kind(&self) -> TransportKind;

    /// Reads every op; the result has one entry per op, in order.
    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>>;

    /// Writes every op; the result has one entry per op, in order.
    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>>;
}
