//! Tandem's benchmark harness.
//!
//! - [`baseline`] — physical limits measured in the same run (memory read
//!   bandwidth), so results are reported as ratios, not absolute times.
//! - [`stats`] — medians and result files under `bench/results/`.
//! - [`kvstore`] — the KV store against memcpy, raw tcp and Redis, and its
//!   eviction policies on the Mooncake trace (`tandem bench kvstore`).
//! - [`serving`] — prefill and decode nodes with the store: layer-wise
//!   write overlap and decode TBT under prefetch (`tandem bench serving`).
//! - [`workload`] — trace requests made concrete: prompts synthesised from
//!   block hash ids (shared ids, shared tokens), scaled lengths and times.
//!
//! Binaries: `bench-attention` (paged decode attention vs memory
//! bandwidth, paged vs contiguous). The engine benchmark against llama.cpp
//! is `bench/run_engine_bench.sh`.

pub mod baseline;
pub mod harness;
pub mod kvstore;
pub mod serving;
pub mod stats;
pub mod workload;
