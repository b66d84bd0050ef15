//! Requests of a Mooncake trace made concrete: token prompts synthesised
//! from the trace's block hash ids (the same id always gives the same
//! tokens, so two requests that share leading ids share that prefix token
//! for token, and the store's cache hits are real), with lengths and
//! arrival times scaled to what the machine can run.

use tandem_kvstore::trace::TraceRequest;

/// How a trace maps to requests this cluster can serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Synth {
    /// Tokens per hash id in the trace (512 in the published traces).
    pub trace_block_tokens: u32,
    /// Tokens per hash id in the synthesised prompts (choose the cluster's
    /// block size, or a multiple of it, so a shared id is a shared block).
    pub block_tokens: u32,
    /// Output lengths are multiplied by this (at least 1 token).
    pub output_scale: f64,
    /// Arrival times are multiplied by this (0.5: twice the request rate).
    pub time_scale: f64,
    /// Token ids are drawn from `[vocab_lo, vocab_hi)` (keep clear of the
    /// model's special tokens).
    pub vocab_lo: u32,
    pub vocab_hi: u32,
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// When to send it, ms after the start of the run.
    pub at_ms: u64,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
}

impl Synth {
    pub fn validate(&self) -> Result<(), String> {
        if self.trace_block_tokens == 0 || self.block_tokens == 0 {
            return Err("block sizes must be positive".into());
        }
        if self.vocab_hi <= self.vocab_lo {
            return Err(format!("empty token range [{}, {})", self.vocab_lo, self.vocab_hi));
        }
        for (v, name) in [(self.output_scale, "output scale"), (self.time_scale, "time scale")] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} must be a positive number, got {v}"));
            }
        }
        Ok(())
    }

    /// The tokens of the block named `hash_id`: a deterministic stream
    /// (splitmix64 seeded by the id).
    pub fn block(&self, hash_id: u64) -> Vec<u32> {
        let span = (self.vocab_hi - self.vocab_lo) as u64;
        let mut state = hash_id ^ 0x7461_6e64_656d_2d62; // "tandem-b"
        (0..self.block_tokens)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                self.vocab_lo + (z % span) as u32
            })
            .collect()
    }

    /// The request a trace line becomes. The prompt has one synthesised
    /// block per hash id, the last cut in the same proportion as the
    /// trace's last block, so its length is the trace's scaled by
    /// `block_tokens / trace_block_tokens`.
    pub fn plan(&self, r: &TraceRequest) -> Planned {
        let n = r.hash_ids.len();
        let mut prompt = Vec::with_capacity(n * self.block_tokens as usize);
        for (i, &id) in r.hash_ids.iter().enumerate() {
            let mut block = self.block(id);
            if i + 1 == n {
                // The trace's last block holds input_length - (n-1)·B tokens.
                let full = (n as u64 - 1) * self.trace_block_tokens as u64;
                let last = (r.input_length as u64).saturating_sub(full).clamp(1, self.trace_block_tokens as u64);
                let keep = (last * self.block_tokens as u64).div_ceil(self.trace_block_tokens as u64);
                block.truncate(keep.max(1) as usize);
            }
            prompt.extend_from_slice(&block);
        }
        let max_tokens = ((r.output_length as f64 * self.output_scale).round() as u32).max(1);
        Planned { at_ms: (r.timestamp_ms as f64 * self.time_scale).round() as u64, prompt, max_tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth() -> Synth {
        Synth {
            trace_block_tokens: 512,
            block_tokens: 16,
            output_scale: 0.5,
            time_scale: 2.0,
            vocab_lo: 100,
            vocab_hi: 40_000,
        }
    }

    fn req(ts: u64, input: u32, output: u32, ids: &[u64]) -> TraceRequest {
        TraceRequest { timestamp_ms: ts, input_length: input, output_length: output, hash_ids: ids.to_vec() }
    }

    #[test]
    fn shared_hash_ids_are_shared_tokens_and_shared_block_keys() {
        let s = synth();
        s.validate().unwrap();
        assert_eq!(s.block(7), s.block(7), "the same id always gives the same tokens");
        assert_ne!(s.block(7), s.block(8));
        assert!(s.block(7).iter().all(|&t| (100..40_000).contains(&t)));
        // Two requests share their first two blocks, then differ.
        let a = s.plan(&req(10, 3 * 512, 100, &[1, 2, 3]));
        let b = s.plan(&req(20, 2 * 512 + 100, 7, &[1, 2, 9]));
        assert_eq!(a.prompt.len(), 48);
        assert_eq!(b.prompt.len(), 32 + 4, "the last block scaled: 100/512 of 16 tokens, rounded up");
        assert_eq!(a.prompt[..32], b.prompt[..32]);
        assert_ne!(a.prompt[32..36], b.prompt[32..36]);
        // With the cluster's block size, the shared blocks have the same
        // store keys: a replay's cache hits are real.
        let salt = tandem_proto::KeySalt::new("model", "f32", 16);
        let (ka, kb) = (tandem_proto::block_keys(salt, &a.prompt, 16), tandem_proto::block_keys(salt, &b.prompt, 16));
        assert_eq!(ka[..2], kb[..2]);
        assert_eq!((ka.len(), kb.len()), (3, 2), "a partial last block has no key");
        assert_eq!((a.at_ms, a.max_tokens), (20, 50));
        assert_eq!((b.at_ms, b.max_tokens), (40, 4));
    }

    #[test]
    fn odd_inputs_still_give_a_request_and_bad_settings_are_named() {
        let s = synth();
        let p = s.plan(&req(0, 1, 0, &[5]));
        assert_eq!((p.prompt.len(), p.max_tokens), (1, 1), "at least one token in and out");
        let mut bad = synth();
        bad.vocab_hi = 100;
        assert!(bad.validate().unwrap_err().contains("token range"));
        let mut bad = synth();
        bad.time_scale = f64::NAN;
        assert!(bad.validate().unwrap_err().contains("time scale"));
    }

    #[test]
    fn the_published_trace_plans_within_bounds() {
        // The trace file copied into the repository for the kvstore bench.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/traces/synthetic_trace.jsonl");
        let opts = tandem_kvstore::trace::TraceOptions::default();
        let trace = tandem_kvstore::trace::load_trace(&path, &opts).unwrap();
        let s = synth();
        let planned: Vec<Planned> = trace.iter().take(200).map(|r| s.plan(r)).collect();
        for (r, p) in trace.iter().zip(&planned) {
            let want = (r.input_length as u64 * 16).div_ceil(512) as usize;
            assert!(p.prompt.len().abs_diff(want) <= 1, "{} tokens for input {}", p.prompt.len(), r.input_length);
        }
        assert!(planned.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "arrivals stay in order");
    }
}
