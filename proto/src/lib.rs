//! Tandem's contracts between nodes and the validated domain types behind
//! them.
//!
//! - [`block_key`] — prefix-chained block keys (DESIGN.md §2): equal keys
//!   mean equal token prefixes, and two models never share keys.
//!
//! The gRPC services (tonic/prost) join this crate with the kvstore issue;
//! generated types will stay private to it, mirrored by the strict types
//! here.

pub mod block_key;

pub use block_key::{block_keys, BlockKey, KeySalt};
