//! Stage 1: does writing a prompt's KV blocks to the store cost the
//! prefill node time? One node writes every new block layer by layer while
//! the next layer computes and hands off only after the store's commit;
//! the baseline node computes the same size of prompt and writes nothing.
//! Both have the store attached (so both pay the cached-prefix lookup) and
//! every prompt is new, so nothing is read from the cache.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::nodes::{prompt, PrefillNode, PromptSet};
use crate::stats::median;

#[derive(Debug, Clone, Serialize)]
pub struct OverlapSettings {
    pub prompt_tokens: usize,
    /// The prefill nodes' token budget per forward pass.
    pub chunk_tokens: usize,
    /// Timed runs per node, interleaved.
    pub reps: usize,
}

/// One timed prefill.
#[derive(Debug, Clone, Serialize)]
pub struct OverlapRun {
    pub rep: usize,
    pub store_writes: bool,
    /// Client side: from sending the request until the handoff arrived.
    pub wall_ms: f64,
    /// The node's own time from admitting the prompt to finishing it.
    pub prefill_ms: f64,
    /// Forward passes alone.
    pub forward_ms: f64,
    pub computed_tokens: u32,
    pub stored_blocks: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverlapResult {
    pub runs: Vec<OverlapRun>,
    /// Medians of the runs of each node.
    pub with_writes_wall_ms: f64,
    pub compute_only_wall_ms: f64,
    /// with / without (target <= 1.15).
    pub wall_ratio: f64,
    /// Computed tokens per second of the node's prefill time (medians).
    pub with_writes_tokens_per_s: f64,
    pub compute_only_tokens_per_s: f64,
    /// Computed tokens per second of forward-pass time alone (medians).
    pub with_writes_forward_tokens_per_s: f64,
    pub compute_only_forward_tokens_per_s: f64,
    pub blocks_stored_per_run: usize,
    pub bytes_stored_per_run: usize,
}

/// One untimed prefill on each node, then `reps` timed ones on each,
/// alternating which node goes first.
pub async fn run(s: &OverlapSettings, writer: &PrefillNode, baseline: &PrefillNode) -> anyhow::Result<OverlapResult> {
    let shape = writer.shape;
    let blocks = s.prompt_tokens / shape.block_tokens;
    for (i, node) in [writer, baseline].into_iter().enumerate() {
        let p = prompt(PromptSet::OverlapWarmup, i as u64, s.prompt_tokens, shape.vocab);
        node.prefill(format!("overlap-warmup-{i}"), p, 1).await?.expect_fresh(s.prompt_tokens, None)?;
    }
    let mut runs = Vec::with_capacity(2 * s.reps);
    for rep in 0..s.reps {
        let order = if rep % 2 == 0 { [true, false] } else { [false, true] };
        for store_writes in order {
            let node = if store_writes { writer } else { baseline };
            let index = 2 * rep as u64 + u64::from(store_writes);
            let p = prompt(PromptSet::Overlap, index, s.prompt_tokens, shape.vocab);
            let forward_before = node.stats().compute_ns.load(Ordering::Relaxed);
            let done = node.prefill(format!("overlap-{index}"), p, 1).await?;
            let forward_ns = node.stats().compute_ns.load(Ordering::Relaxed) - forward_before;
            let stored = if store_writes { blocks } else { 0 };
            done.expect_fresh(s.prompt_tokens, Some(stored))?;
            let run = OverlapRun {
                rep,
                store_writes,
                wall_ms: done.wall.as_secs_f64() * 1e3,
                prefill_ms: done.stats.prefill_us as f64 / 1e3,
                forward_ms: forward_ns as f64 / 1e6,
                computed_tokens: done.stats.computed_tokens,
                stored_blocks: done.stats.stored_blocks,
            };
            eprintln!(
                "[serving bench]   rep {}/{} {}: {:.1} ms to the handoff (prefill {:.1} ms, forward {:.1} ms), {} blocks stored",
                rep + 1,
                s.reps,
                if store_writes { "with writes " } else { "compute only" },
                run.wall_ms,
                run.prefill_ms,
                run.forward_ms,
                run.stored_blocks
            );
            runs.push(run);
        }
    }
    let med = |writes: bool, f: fn(&OverlapRun) -> f64| {
        let xs: Vec<f64> = runs.iter().filter(|r| r.store_writes == writes).map(f).collect();
        median(&xs)
    };
    let tokens = s.prompt_tokens as f64;
    let (with, without) = (med(true, |r| r.wall_ms), med(false, |r| r.wall_ms));
    Ok(OverlapResult {
        with_writes_wall_ms: with,
        compute_only_wall_ms: without,
        wall_ratio: with / without,
        with_writes_tokens_per_s: tokens / med(true, |r| r.prefill_ms) * 1e3,
        compute_only_tokens_per_s: tokens / med(false, |r| r.prefill_ms) * 1e3,
        with_writes_forward_tokens_per_s: tokens / med(true, |r| r.forward_ms) * 1e3,
        compute_only_forward_tokens_per_s: tokens / med(false, |r| r.forward_ms) * 1e3,
        blocks_stored_per_run: blocks,
        bytes_stored_per_run: blocks * shape.block_bytes,
        runs,
    })
}
