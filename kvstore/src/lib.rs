//! Tandem's pooled KV block store (DESIGN.md §4).
//!
//! - [`checksum`] — per-block checksums, computed by the writer and verified
//!   by the reader; a mismatch is a miss, never silent corruption.
//! - [`types`] — tiers, locations and peer descriptions shared by every role.
//! - [`segment`] — DRAM segments: shared-memory files mapped by the node and
//!   by same-host clients.
//! - [`transport`] — the transfer engine: shm, tcp and (feature `rdma`) RDMA.

pub mod checksum;
pub mod segment;
pub mod transport;
pub mod types;
