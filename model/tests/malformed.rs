//! Bad model files and bad requests give clear errors, never panics.

mod common;

use common::fixtures;
use std::path::Path;
use tandem_kernels::Precision;
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::forward::{Logits, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::sampling::SamplingParams;
use tandem_model::ModelError;

/// A copy of the tiny fixture whose `model.safetensors` is replaced.
fn tiny_with_weights(dir: &Path, weights: &[u8]) {
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tiny-llama-bf16").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

fn load_err(dir: &Path) -> String {
    match engine::load(dir, Precision::Exact) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_corrupt_safetensors_are_clear_errors() {
    let good = std::fs::read(fixtures().join("tiny-llama-bf16/model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Truncations through the header, at the data start and mid-data.
    let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    for cut in [0, 4, 8, 100, header / 2, 8 + header, 8 + header + 1000, good.len() - 1] {
        tiny_with_weights(tmp.path(), &good[..cut]);
        let e = load_err(tmp.path());
        assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
    }
    // A header length pointing past the end, and a header that is not JSON.
    let mut bad = good.clone();
    bad[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    tiny_with_weights(tmp.path(), &bad);
    assert!(load_err(tmp.path()).contains("header"));
    let mut bad = good.clone();
    bad[8..16].copy_from_slice(b"garbage!");
    tiny_with_weights(tmp.path(), &bad);
    assert!(load_err(tmp.path()).contains("header"));
    // Valid container, wrong shapes: a tensor renamed away.
    let text = String::from_utf8_lossy(&good[8..8 + header]).replace("model.norm.weight", "model.nrom.weight");
    let mut renamed = good[..8].to_vec();
    renamed.extend_from_slice(text.as_bytes());
    renamed.extend_from_slice(&good[8 + header..]);
    tiny_with_weights(tmp.path(), &renamed);
    let e = load_err(tmp.path());
    assert!(e.contains("model.norm.weight is missing"), "{e}");
}

#[test]
fn absurd_configs_and_missing_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixtures().join("tiny-llama-bf16/model.safetensors")).unwrap();
    tiny_with_weights(tmp.path(), &good);
    let config = std::fs::read_to_string(fixtures().join("tiny-llama-bf16/config.json")).unwrap();
    for (from, to, expect) in [
        ("\"num_hidden_layers\": 4", "\"num_hidden_layers\": 0", "num_hidden_layers"),
        ("\"hidden_size\": 256", "\"hidden_size\": 255", "shape"),
        ("\"vocab_size\": 4096", "\"vocab_size\": -1", "config.json"),
        ("\"num_attention_heads\": 8,", "", "num_attention_heads"),
        ("\"head_dim\": 32", "\"head_dim\": 31", "head_dim"),
    ] {
        assert!(config.contains(from), "fixture lacks {from}");
        std::fs::write(tmp.path().join("config.json"), config.replace(from, to)).unwrap();
        let e = load_err(tmp.path());
        assert!(e.contains(expect), "{to}: {e}");
    }
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    assert!(load_err(tmp.path()).contains("config.json"));
    assert!(load_err(&tmp.path().join("nope")).contains("nope"));
    let not_gguf = tmp.path().join("model.gguf");
    std::fs::write(&not_gguf, b"definitely not a model").unwrap();
    assert!(load_err(&not_gguf).contains("not a GGUF file"));
}

#[test]
fn bad_requests_are_rejected_before_any_work() {
    let model = engine::load(&fixtures().join("tiny-llama-bf16"), Precision::Fast).unwrap().model;
    let ctx = model.config().max_position_embeddings;
    let mut engine = Engine::new(model, EngineOptions { num_pages: 512, ..EngineOptions::default() }).unwrap();
    let req = |prompt: Vec<u32>, max_tokens, temperature| Request {
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature, ..SamplingParams::default() },
        stop_ids: vec![],
    };
    let cases = [
        (req(vec![1, 4096], 4, 0.0), "outside the vocabulary"),
        (req(vec![1, u32::MAX], 4, 0.0), "outside the vocabulary"),
        (req(vec![], 4, 0.0), "empty"),
        (req(vec![1; ctx + 5], 4, 0.0), "context length"),
        (req(vec![1, 2], 0, 0.0), "max_tokens"),
        (req(vec![1, 2], 4, -1.0), "temperature"),
        (req(vec![1, 2], 4, f32::NAN), "temperature"),
    ];
    for (r, expect) in cases {
        let e = engine.generate(&[r], |_, _| Flow::Continue).unwrap_err();
        assert!(matches!(e, ModelError::Request(_)), "{e}");
        assert!(e.to_string().contains(expect), "{e}");
        assert_eq!(engine.cache().free_pages(), engine.cache().num_pages());
    }
    // Generation stops at the context length instead of failing.
    let (gens, _) = engine.generate(&[req(vec![1; ctx - 3], 10, 0.0)], |_, _| Flow::Continue).unwrap();
    assert_eq!(gens[0].tokens.len(), 3);
    assert_eq!(gens[0].finish_reason, engine::FinishReason::ContextFull);
}

#[test]
fn forward_rejects_out_of_range_ids_and_overflow_without_side_effects() {
    let model = engine::load(&fixtures().join("tiny-llama-bf16"), Precision::Fast).unwrap().model;
    let mut cache = KvCache::new(model.kv_geometry(16), 4, KvDType::F32).unwrap();
    let mut seq = SeqKv::default();
    let e = model.forward(&mut cache, &mut [Step { tokens: &[1, 99999], seq: &mut seq, logits: Logits::Last }]);
    assert!(e.unwrap_err().to_string().contains("outside the vocabulary"));
    let too_long = vec![5u32; 100];
    let e = model.forward(&mut cache, &mut [Step { tokens: &too_long, seq: &mut seq, logits: Logits::Last }]);
    assert!(matches!(e.unwrap_err(), ModelError::CacheFull { .. }));
    assert_eq!(seq.len(), 0);
    assert!(seq.block_table().is_empty());
    assert_eq!(cache.free_pages(), 4);
}
