//! The prefill node's start-up profile (the `Profile` RPC; the shared
//! method is described in `tandem_decode::profile`): the time of one
//! forward pass computing `uncached` prompt tokens after `cached` tokens
//! already in the KV cache.

use std::time::Instant;
use tandem_decode::profile::{fill_zeros, synthetic_tokens, time_ms};
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, SeqKv};
use tandem_model::ModelError;
use tandem_proto::worker as pb;

/// Prompt tokens computed by a timed pass (capped at the node's chunk
/// budget: no pass computes more).
const UNCACHED: [usize; 3] = [16, 64, 256];
/// Prompt tokens already in the KV cache before it.
const CACHED: [usize; 2] = [0, 256];
/// The same for a modeled model (`tandem_model::modeled`), which serves
/// prompts of thousands to a hundred thousand tokens: a modeled pass only
/// sleeps its modeled time, so serving-sized shapes are cheap to time
/// (about 2 s in all for Llama-3-8B or -70B on H100s) and put the fit's
/// points where the workload is.
const MODELED_UNCACHED: [usize; 3] = [512, 4096, 16384];
const MODELED_CACHED: [usize; 2] = [0, 16384];

/// Times one prefill pass for each shape that fits: `uncached` ∈ {16, 64,
/// 256} (capped at `chunk_tokens`; longer prompts are extrapolated by the
/// fit's quadratic term) × `cached` ∈ {0, 256} — for a modeled model
/// `uncached` ∈ {512, 4096, 16384} × `cached` ∈ {0, 16384} — timed with
/// [`time_ms`]. Shapes the pool or the context length cannot hold are
/// skipped.
pub fn prefill(model: &Model, cache: &mut KvCache, chunk_tokens: usize) -> Result<Vec<pb::PrefillPoint>, ModelError> {
    let (all_uncached, all_cached) =
        if model.is_modeled() { (&MODELED_UNCACHED, &MODELED_CACHED) } else { (&UNCACHED, &CACHED) };
    let mut uncached: Vec<usize> = all_uncached.iter().map(|&u| u.min(chunk_tokens.max(1))).collect();
    uncached.dedup();
    let limit = model.config().max_position_embeddings;
    let shapes: Vec<(usize, usize)> = uncached
        .iter()
        .flat_map(|&u| all_cached.iter().map(move |&c| (u, c)))
        .filter(|&(u, c)| u + c < limit && cache.pages_for(u + c) <= cache.free_pages())
        .collect();
    let tokens = synthetic_tokens(uncached.iter().copied().max().unwrap_or(0), model.config().vocab_size);
    let mut points = Vec::with_capacity(shapes.len());
    for (i, &(u, c)) in shapes.iter().enumerate() {
        let mut pass = || {
            let mut seq = SeqKv::default();
            let result = fill_zeros(cache, &mut seq, c).and_then(|()| {
                let step = Step { tokens: &tokens[..u], seq: &mut seq, logits: Logits::Last };
                let started = Instant::now();
                model.forward(cache, &mut [step])?;
                Ok(started.elapsed())
            });
            cache.release(seq);
            result
        };
        if i == 0 {
            // Warm-up: the first pass faults in weights and scratch.
            pass()?;
        }
        points.push(pb::PrefillPoint { uncached: u as u32, cached: c as u32, ms: time_ms(pass)? });
    }
    Ok(points)
}
