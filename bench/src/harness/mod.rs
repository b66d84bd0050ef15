//! `tandem bench replay|run|sweep|compare`: the loopback cluster under a
//! workload, measured at the client through the real HTTP API.
//!
//! - [`schema`] — the versioned JSON result.

pub mod schema;
