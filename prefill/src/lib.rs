//! Tandem's prefill worker (DESIGN.md §2, step 4).
//!
//! A request arrives over gRPC ([`service`]); the worker asks the store
//! for the prompt's longest cached prefix and reads those blocks while
//! other prompts compute, then the engine thread ([`engine`]) appends them
//! to its pages, computes the rest of the prompt in chunks (several
//! prompts share a forward pass up to a token budget) and writes every new
//! full block to the store **one layer at a time while the next layer
//! computes** (a staged two-phase put). It samples the first token and
//! hands the request to a decode node: block keys, the last partial block,
//! the first token and the sampler's state.
//!
//! Before serving, the node times a few prefill passes on its own model
//! and KV layout ([`profile`]) for the conductor's cost model.

pub mod engine;
pub mod profile;
pub mod service;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

pub use service::{serve, PrefillHandle};

/// One `[[prefill]]` entry of the cluster file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefillConfig {
    pub name: String,
    /// gRPC address (the conductor and tests call it).
    pub listen: SocketAddr,
    /// Memory for KV pages of the prompts being computed.
    pub kv_memory: ByteSize,
    /// Token budget of one forward pass: prompt chunks of several requests
    /// are packed up to it.
    pub chunk_tokens: usize,
    /// Requests waiting beyond this are refused (the scheduler should have
    /// sent them elsewhere).
    pub max_queue: usize,
    /// Compute threads (0: all cores).
    pub threads: usize,
    /// Write new blocks to the store (off: compute only, the benchmark's
    /// baseline).
    pub store_writes: bool,
    /// Read cached prefixes from the store (off: every prompt is computed
    /// in full while its blocks still go to the store for the decode node;
    /// the benchmark's "cache disabled" baseline).
    pub prefix_reads: bool,
    /// Time prefill passes at start so the conductor can predict this node
    /// (off: `Profile` answers empty and the conductor uses its priors).
    pub profile: bool,
    /// Required on every call, and sent to decode nodes (filled in at start
    /// from `[auth]`, never read from the file).
    #[serde(skip)]
    pub cluster_token: Option<tandem_proto::cluster_token::ClusterToken>,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        Self {
            name: "prefill-0".into(),
            listen: "127.0.0.1:7301".parse().expect("a valid address"),
            kv_memory: ByteSize::mib(512),
            chunk_tokens: 512,
            max_queue: 256,
            threads: 0,
            store_writes: true,
            prefix_reads: true,
            profile: true,
            cluster_token: None,
        }
    }
}

impl PrefillConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(format!("prefill node name {:?} must be 1-64 bytes", self.name));
        }
        if self.chunk_tokens == 0 || self.chunk_tokens > 65536 {
            return Err(format!("prefill {}: chunk_tokens must be in 1..=65536", self.name));
        }
        if self.max_queue == 0 {
            return Err(format!("prefill {}: max_queue must be at least 1", self.name));
        }
        if self.kv_memory.as_u64() == 0 {
            return Err(format!("prefill {}: kv_memory must be positive", self.name));
        }
        Ok(())
    }
}
