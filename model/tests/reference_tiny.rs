//! The tiny Llama fixture (bf16 weights, GQA, untied head) against
//! transformers' f32 references: exact greedy tokens, logits within 1e-4.

mod common;

use common::{cases, fixtures, max_abs_diff};
use tandem_kernels::Precision;
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::forward::{Logits, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::sampling::SamplingParams;

fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request { prompt: prompt.to_vec(), max_tokens, sampling: SamplingParams::default(), stop_ids: vec![] }
}

#[test]
fn tiny_llama_generates_the_reference_tokens() {
    let loaded = engine::load(&fixtures().join("tiny-llama-bf16"), Precision::Exact).unwrap();
    let mut engine = Engine::new(loaded.model, EngineOptions::default()).unwrap();
    let cases = cases("tiny-llama-bf16__f32compute");
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let (gens, _) = engine.generate(&[greedy(&case.prompt_ids, 32)], |_, _| Flow::Continue).unwrap();
        assert_eq!(gens[0].ids(), case.generated_ids, "case {}", case.name);
    }
    assert_eq!(engine.cache().free_pages(), engine.cache().num_pages(), "every page returned");
}

#[test]
fn tiny_llama_logits_match_within_1e4() {
    let loaded = engine::load(&fixtures().join("tiny-llama-bf16"), Precision::Exact).unwrap();
    let model = loaded.model;
    let vocab = model.config().vocab_size;
    for case in cases("tiny-llama-bf16__f32compute") {
        let mut cache = KvCache::new(model.kv_geometry(16), 64, KvDType::F32).unwrap();
        // Teacher forcing: prompt plus the reference continuation in one
        // pass gives every position's logits.
        let mut all = case.prompt_ids.clone();
        all.extend_from_slice(&case.generated_ids[..31]);
        let mut seq = SeqKv::default();
        let logits = model
            .forward(&mut cache, &mut [Step { tokens: &all, seq: &mut seq, logits: Logits::All }])
            .unwrap()
            .remove(0);
        let t = case.prompt_ids.len();
        let first = &logits[(t - 1) * vocab..t * vocab];
        let d_first = max_abs_diff(first, &case.first_step_logits);
        let d_prefill = max_abs_diff(&logits[..t * vocab], &case.prefill_logits);
        // decode_logits[i] are the logits that chose generated_ids[i].
        let d_decode = max_abs_diff(&logits[(t - 1) * vocab..], &case.decode_logits);
        println!("{}: first {d_first:.2e} prefill {d_prefill:.2e} decode {d_decode:.2e}", case.name);
        assert!(d_first < 1e-4, "{}: first-step logits differ by {d_first}", case.name);
        assert!(d_prefill < 1e-4, "{}: prefill logits differ by {d_prefill}", case.name);
        assert!(d_decode < 1e-4, "{}: teacher-forced logits differ by {d_decode}", case.name);
        cache.release(seq);
    }
}
