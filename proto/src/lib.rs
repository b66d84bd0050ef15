//! Tandem's contracts between nodes and the validated domain types behind
//! them.
//!
//! - [`auth`] — constant-time comparison of secrets (SHA-256 digests).
//! - [`cluster_token`] — the cluster's shared secret: attached to and
//!   required on every internal gRPC call and the data plane's handshake.
//! - [`admin`] — the conductor's admin API (`tandem.admin.v1`), which
//!   `tandem ctl` talks to.
//! - [`block_key`] — prefix-chained block keys (DESIGN.md §2): equal keys
//!   mean equal token prefixes, and two models never share keys.
//! - [`kvstore`] — the store's gRPC control plane (`tandem.kvstore.v1`):
//!   the `Master` and `StorageNode` services and their messages.
//! - [`worker`] — the prefill and decode services and the handoff between
//!   them (`tandem.worker.v1`).

pub mod auth;
pub mod block_key;
pub mod cluster_token;
pub mod handoff;

pub use block_key::{block_keys, BlockKey, KeySalt};

/// Generated from `proto/admin.proto` (tonic + prost).
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod admin {
    tonic::include_proto!("tandem.admin.v1");
}

/// Generated from `proto/kvstore.proto` (tonic + prost).
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod kvstore {
    tonic::include_proto!("tandem.kvstore.v1");
}

/// Generated from `proto/worker.proto` (tonic + prost).
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod worker {
    tonic::include_proto!("tandem.worker.v1");
}
