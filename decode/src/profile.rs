//! A worker's start-up profile (the `Profile` RPC): forward passes of a few
//! shapes, timed once on the node's own model and KV layout before it
//! serves, so the conductor can fit its cost models to this node (prefill
//! time from uncached and cached tokens, decode step time from batch size
//! and context) and correct them online from `Status`.
//!
//! Token ids are synthetic and the KV is zero-filled: a pass's time depends
//! on its shape, not on what it computes. Every page taken is released
//! before a profile returns, whether it succeeds or fails. [`decode`]
//! profiles a decode node; the helpers are shared with the prefill node's
//! profile.

use std::time::{Duration, Instant};
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, SeqKv};
use tandem_model::ModelError;
use tandem_proto::worker as pb;

/// Runs of a cheap shape (the median is kept).
pub const RUNS: usize = 3;
/// A shape whose first run is faster than this is cheap: it is run
/// [`RUNS`] times, where noise matters most. Slower shapes run once: they
/// dominate the profile's time, and their noise is relatively small.
pub const REPEAT_BELOW: Duration = Duration::from_millis(200);

/// Sequences per decode step.
const DECODE_BATCH: [usize; 3] = [1, 4, 16];
/// KV tokens per sequence of a decode step.
const DECODE_CONTEXT: [usize; 2] = [64, 512];
/// The same for a modeled model (`tandem_model::modeled`), which serves
/// batches of long contexts: a modeled step only sleeps its modeled time
/// (milliseconds), so serving-sized shapes are cheap to time and put the
/// fit's points where the workload is.
const MODELED_BATCH: [usize; 3] = [1, 16, 64];
const MODELED_CONTEXT: [usize; 2] = [1024, 16384];

/// `n` pseudo-random token ids below `vocab`, the same in every process
/// (SplitMix64 over the index).
pub fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let vocab = vocab.max(1) as u64;
    (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % vocab) as u32
        })
        .collect()
}

/// Appends `tokens` token slots of zero KV to `seq`, which must be empty:
/// whole blocks, then a partial one. On error the caller still owns (and
/// releases) whatever `seq` holds.
pub fn fill_zeros(cache: &mut KvCache, seq: &mut SeqKv, tokens: usize) -> Result<(), ModelError> {
    debug_assert!(seq.is_empty(), "zero KV goes into an empty sequence");
    let page_tokens = cache.geometry().page_tokens;
    let zero = vec![0u8; cache.block_bytes()];
    let blocks = vec![zero.as_slice(); tokens / page_tokens];
    cache.append_blocks(seq, &blocks)?;
    if !tokens.is_multiple_of(page_tokens) {
        cache.append_partial(seq, &zero, tokens % page_tokens)?;
    }
    debug_assert_eq!(seq.len(), tokens);
    Ok(())
}

/// The time of `pass` in milliseconds: the median of [`RUNS`] runs when
/// the first is faster than [`REPEAT_BELOW`], else the first.
pub fn time_ms(mut pass: impl FnMut() -> Result<Duration, ModelError>) -> Result<f64, ModelError> {
    let mut runs = vec![pass()?];
    if runs[0] < REPEAT_BELOW {
        for _ in 1..RUNS {
            runs.push(pass()?);
        }
    }
    runs.sort();
    Ok(runs[runs.len() / 2].as_secs_f64() * 1e3)
}

/// Runs `measure`, logging how long it took. A failure is logged and
/// gives no points: the conductor then falls back to its priors, and the
/// node still serves.
pub fn timed<P>(node: &str, measure: impl FnOnce() -> Result<Vec<P>, ModelError>) -> Vec<P> {
    let started = Instant::now();
    match measure() {
        Ok(points) => {
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(node, points = points.len(), took_ms, "profiled forward passes");
            points
        }
        Err(e) => {
            tracing::warn!(node, "profiling failed; the conductor will use its priors: {e}");
            Vec::new()
        }
    }
}

/// Times one batched decode step for each shape that fits: `batch` ∈
/// {1, 4, 16} (capped at `max_batch`) sequences of {64, 512} KV tokens
/// each — for a modeled model {1, 16, 64} sequences of {1024, 16384} —
/// timed with [`time_ms`]. Shapes the pool or the context length cannot
/// hold are skipped.
pub fn decode(model: &Model, cache: &mut KvCache, max_batch: usize) -> Result<Vec<pb::DecodePoint>, ModelError> {
    let (all_batches, all_contexts) =
        if model.is_modeled() { (&MODELED_BATCH, &MODELED_CONTEXT) } else { (&DECODE_BATCH, &DECODE_CONTEXT) };
    let mut batches: Vec<usize> = all_batches.iter().map(|&b| b.min(max_batch.max(1))).collect();
    batches.dedup();
    let limit = model.config().max_position_embeddings;
    let shapes: Vec<(usize, usize)> = batches
        .iter()
        .flat_map(|&b| all_contexts.iter().map(move |&c| (b, c)))
        // Each step (a warm-up, then up to RUNS) appends a token to every sequence.
        .filter(|&(b, c)| c + RUNS < limit && b * cache.pages_for(c + RUNS + 1) <= cache.free_pages())
        .collect();
    let token = synthetic_tokens(1, model.config().vocab_size);
    let mut points = Vec::with_capacity(shapes.len());
    for (i, &(batch, context)) in shapes.iter().enumerate() {
        let mut seqs = vec![SeqKv::default(); batch];
        let result = seqs.iter_mut().try_for_each(|s| fill_zeros(cache, s, context)).and_then(|()| {
            let mut step = || {
                let mut steps: Vec<Step<'_>> =
                    seqs.iter_mut().map(|seq| Step { tokens: &token, seq, logits: Logits::Last }).collect();
                let started = Instant::now();
                model.forward(cache, &mut steps)?;
                Ok(started.elapsed())
            };
            if i == 0 {
                // Warm-up: the first pass faults in weights and scratch.
                step()?;
            }
            time_ms(step)
        });
        for s in seqs {
            cache.release(s);
        }
        // The sequences grow by one token a step (RUNS + 1 at most, a few
        // per cent of the smallest context): the shape is reported as it
        // started.
        points.push(pb::DecodePoint { batch: batch as u32, context: (batch * context) as u64, ms: result? });
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_tokens_are_deterministic_and_in_the_vocabulary() {
        let a = synthetic_tokens(1000, 50);
        assert_eq!(a, synthetic_tokens(1000, 50));
        assert!(a.iter().all(|&t| t < 50));
        let distinct: std::collections::HashSet<u32> = a.iter().copied().collect();
        assert!(distinct.len() > 40, "spread over the vocabulary, got {} ids", distinct.len());
        assert_eq!(synthetic_tokens(3, 1), vec![0, 0, 0]);
    }

    #[test]
    fn cheap_shapes_take_the_median_of_three_runs_and_slow_ones_one() {
        let ms = |v: u64| Duration::from_millis(v);
        let mut times = [5, 1, 3, 0].into_iter().map(ms);
        assert_eq!(time_ms(|| Ok(times.next().unwrap())).unwrap(), 3.0);
        assert_eq!(times.next(), Some(ms(0)), "three runs, no more");
        let mut times = [250, 1, 1].into_iter().map(ms);
        assert_eq!(time_ms(|| Ok(times.next().unwrap())).unwrap(), 250.0);
        assert_eq!(times.len(), 2, "one run of a slow shape");
        let mut calls = 0;
        let err = time_ms(|| {
            calls += 1;
            Err(ModelError::Request("no".into()))
        });
        assert!(err.is_err());
        assert_eq!(calls, 1, "the first error ends the measurement");
    }
}
