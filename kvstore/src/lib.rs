//! Tandem's pooled KV block store (DESIGN.md §4).
//!
//! - [`checksum`] — per-block checksums, computed by the writer and verified
//!   by the reader; a mismatch is a miss, never silent corruption.
//!
//! The master, storage nodes, transports and client arrive with the kvstore
//! issue.

pub mod checksum;
