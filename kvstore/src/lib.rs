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

pub mod checksum;
pub mod policy;
pub mod segment;
pub mod sim;
pub mod ssd;
pub mod trace;
pub mod transport;
pub mod types;
