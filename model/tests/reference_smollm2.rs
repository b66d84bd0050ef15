//! SmolLM2-135M-Instruct from its Q4_1 GGUF against transformers' f32
//! reference (weights dequantized exactly): the exact path reproduces the
//! tokens and logits; the fast quantized path agrees on the first tokens.

mod common;

use common::{cases, max_abs_diff, smollm2_gguf};
use tandem_kernels::Precision;
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::forward::{Logits, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::sampling::SamplingParams;

const STEM: &str = "smollm2-135m-instruct-f32__f32compute__chat";

fn greedy(prompt: &[u32]) -> Request {
    Request { prompt: prompt.to_vec(), max_tokens: 32, sampling: SamplingParams::default(), stop_ids: vec![] }
}

#[test]
fn exact_path_reproduces_tokens_and_logits() {
    let loaded = engine::load(&smollm2_gguf(), Precision::Exact).unwrap();
    let case = &cases(STEM)[0];
    let model = loaded.model;
    let vocab = model.config().vocab_size;

    let mut cache = KvCache::new(model.kv_geometry(16), 16, KvDType::F32).unwrap();
    let mut all = case.prompt_ids.clone();
    all.extend_from_slice(&case.generated_ids[..31]);
    let mut seq = SeqKv::default();
    let logits =
        model.forward(&mut cache, &mut [Step { tokens: &all, seq: &mut seq, logits: Logits::All }]).unwrap().remove(0);
    let t = case.prompt_ids.len();
    let d_prefill = max_abs_diff(&logits[..t * vocab], &case.prefill_logits);
    let d_decode = max_abs_diff(&logits[(t - 1) * vocab..], &case.decode_logits);
    println!("smollm2 exact: prefill logits within {d_prefill:.2e}, teacher-forced within {d_decode:.2e}");
    assert!(d_prefill < 1e-3, "prefill logits differ by {d_prefill}");
    assert!(d_decode < 1e-3, "teacher-forced logits differ by {d_decode}");
    cache.release(seq);

    let mut engine = Engine::new(model, EngineOptions::default()).unwrap();
    let (gens, _) = engine.generate(&[greedy(&case.prompt_ids)], |_, _| Flow::Continue).unwrap();
    assert_eq!(gens[0].ids(), case.generated_ids);
    let text = loaded.tokenizer.decode(&gens[0].ids(), false).unwrap();
    assert!(text.starts_with("The capital of France is Paris."), "{text}");
}

#[test]
fn fast_path_agrees_on_the_first_tokens() {
    let loaded = engine::load(&smollm2_gguf(), Precision::Fast).unwrap();
    let case = &cases(STEM)[0];
    let mut engine = Engine::new(loaded.model, EngineOptions::default()).unwrap();
    let (gens, _) = engine.generate(&[greedy(&case.prompt_ids)], |_, _| Flow::Continue).unwrap();
    let ids = gens[0].ids();
    let agree = ids.iter().zip(&case.generated_ids).take_while(|(a, b)| a == b).count();
    println!("smollm2 fast path: first {agree} of 32 greedy tokens agree with the f32 reference");
    assert!(agree >= 8, "fast path diverges after {agree} tokens: {ids:?}");
}
