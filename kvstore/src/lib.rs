//! Tandem's pooled KV block store (DESIGN.md §4).
//!
//! - [`checksum`] — per-block checksums, computed by the writer and verified
//!   by the reader; a mismatch is a miss, never silent corruption.
//! - [`types`] — tiers, locations and peer descriptions shared by every role.
//! - [`segment`] — DRAM segments: shared-memory files mapped by the node and
//!   by same-host clients.
//! - [`transport`] — the transfer engine: shm, tcp and (feature `rdma`) RDMA.
//! - [`ssd`] — a node's SSD tier: block files plus a rocksdb index.
//! - [`policy`] — pluggable eviction (LRU and a scan-resistant default).
//! - [`trace`], [`sim`] — Mooncake traces and cache simulation over them.
//! - [`master`] — the metadata service (placement, two-phase puts, leases,
//!   tiering, replication, persistence); [`wire`] validates what arrives.
//! - [`grant`] — write grants binding data-plane writes to the put that
//!   reserved their range.
//! - [`error`] — errors classified for callers (retry, invalid, miss).
//! - [`node`] — a storage node process: segments, SSD tier, data server,
//!   tiering commands, heartbeats.
//! - [`client`] — the library prefill, decode and the conductor embed.
//! - [`config`] — the `[kvstore]` section of the cluster file.

pub mod checksum;
pub mod client;
pub mod config;
pub mod error;
pub mod grant;
pub mod master;
pub mod node;
pub mod policy;
pub mod segment;
pub mod sim;
pub mod ssd;
pub mod trace;
pub mod transport;
pub mod types;
pub mod wire;
