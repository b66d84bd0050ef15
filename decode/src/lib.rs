//! Tandem's decode worker (DESIGN.md §2, step 5).
//!
//! A handoff arrives over gRPC ([`service`]); the worker reads the
//! request's blocks from the store on the async runtime while the engine
//! thread ([`engine`]) keeps decoding the running batch (prefetch), then
//! the request joins the **continuous batch**: every step advances every
//! running sequence by one token and streams it to its caller. Blocks that
//! fill during decoding are written back to the store, so the next turn of
//! a conversation hits the cache. Prefetch is paced to a share of the
//! wall clock while sequences decode (`prefetch_duty`). When KV pages run out, the most recently
//! admitted sequence is preempted: its full blocks are in the store, its
//! partial block is kept, and it re-joins after a fresh fetch (anything
//! the store lost is recomputed).
//!
//! **Colocated mode** (`Generate`, the vLLM-style baseline): the node
//! computes a request's prompt itself, in chunks that share the running
//! batch's forward passes (chunked prefill), reusing the full blocks of
//! earlier prompts from its own byte-bounded LRU ([`local_cache`]), samples
//! the first token and decodes it like any other sequence. Colocated
//! requests never touch the store.
//!
//! Before serving, the node times a few decode steps on its own model and
//! KV layout ([`profile`]) for the conductor's cost model.

pub mod engine;
pub mod local_cache;
pub mod profile;
pub mod service;
pub mod wire;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

pub use service::{serve, DecodeHandle};

/// One `[[decode]]` entry of the cluster file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    pub name: String,
    /// gRPC address (prefill nodes hand off to it).
    pub listen: SocketAddr,
    /// Memory for the paged KV pool of the running batch.
    pub kv_memory: ByteSize,
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// Requests (handoffs or colocated) waiting for pages beyond this are
    /// refused.
    pub max_waiting: usize,
    /// Token budget of one forward pass for prompt chunks (colocated
    /// prompts, and blocks the store lost), on top of one token for every
    /// decoding sequence.
    pub chunk_tokens: usize,
    /// Compute threads (0: all cores).
    pub threads: usize,
    /// Write blocks that fill during decoding back to the store.
    pub write_back: bool,
    /// Share of the wall clock prefetch may take while sequences are
    /// decoding (1: unpaced). On CPU nodes block copies and checksums
    /// compete with the forward pass for cores; pacing keeps the running
    /// batch's token rate steady at the cost of slower fetches. Ignored
    /// (unpaced) with modeled compute, whose passes do not use the cores.
    pub prefetch_duty: f64,
    /// Time decode steps at start so the conductor can predict this node
    /// (off: `Profile` answers empty and the conductor uses its priors).
    pub profile: bool,
    /// Colocated mode: this node's own prefix cache of full KV blocks
    /// (LRU, bounded by bytes; 0: off).
    pub local_cache: ByteSize,
    /// Required on every call (filled in at start from `[auth]`, never
    /// read from the file).
    #[serde(skip)]
    pub cluster_token: Option<tandem_proto::cluster_token::ClusterToken>,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            name: "decode-0".into(),
            listen: "127.0.0.1:7401".parse().expect("a valid address"),
            kv_memory: ByteSize::gib(1),
            max_batch: 64,
            max_waiting: 1024,
            chunk_tokens: 512,
            threads: 0,
            write_back: true,
            prefetch_duty: 0.2,
            profile: true,
            local_cache: ByteSize::mib(256),
            cluster_token: None,
        }
    }
}

impl DecodeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(format!("decode node name {:?} must be 1-64 bytes", self.name));
        }
        if self.max_batch == 0 || self.max_batch > 4096 {
            return Err(format!("decode {}: max_batch must be in 1..=4096", self.name));
        }
        if self.max_waiting == 0 {
            return Err(format!("decode {}: max_waiting must be at least 1", self.name));
        }
        if self.chunk_tokens == 0 || self.chunk_tokens > 65536 {
            return Err(format!("decode {}: chunk_tokens must be in 1..=65536", self.name));
        }
        if self.kv_memory.as_u64() == 0 {
            return Err(format!("decode {}: kv_memory must be positive", self.name));
        }
        if !(self.prefetch_duty > 0.0 && self.prefetch_duty <= 1.0) {
            return Err(format!("decode {}: prefetch_duty must be in (0, 1]", self.name));
        }
        Ok(())
    }
}
