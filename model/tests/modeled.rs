//! Modeled compute through the real paged KV cache: the forward pass
//! writes KV of the scaled size layer by layer, takes at least its modeled
//! time, and predicts one deterministic, non-special token per row, so an
//! engine generates exactly `max_tokens` tokens with any sampler.

use std::time::{Duration, Instant};
use tandem_model::deploy::ModelSection;
use tandem_model::engine::{Engine, EngineOptions, FinishReason, Flow, Request};
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::modeled::{Modeled, SeqWork, OTHER_LOGIT};
use tandem_model::sampling::SamplingParams;
use tandem_model::ModelConfig;

const VOCAB: usize = 1000;
const PAGE: usize = 16;

fn served() -> ModelConfig {
    ModelConfig::from_hf_json(
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
            "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}"#,
    )
    .unwrap()
}

fn modeled(kv_scale: u32, reserved: &[u32]) -> Model {
    Model::modeled(Modeled::new("h100-llama3-8b", kv_scale).unwrap(), &served(), reserved).unwrap()
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + salt * 101) % 990).collect()
}

/// The index of the single logit that is not [`OTHER_LOGIT`].
fn hot(row: &[f32]) -> u32 {
    let hot: Vec<usize> = (0..row.len()).filter(|&i| row[i] != OTHER_LOGIT).collect();
    assert_eq!(hot.len(), 1, "one token per row");
    assert_eq!(row[hot[0]], 0.0);
    hot[0] as u32
}

#[test]
fn a_modeled_pass_writes_scaled_kv_per_layer_and_takes_its_modeled_time() {
    let reserved = [1, 2, 300, 301, 302];
    let model = modeled(256, &reserved);
    assert!(model.is_modeled());
    let fp = model.fingerprint();
    assert!(fp.starts_with("modeled-h100-llama3-8b-kv256-"), "{fp}");
    assert_ne!(fp, modeled(128, &reserved).fingerprint(), "the scale is part of the identity");
    let c = model.config();
    assert_eq!((c.num_layers, c.vocab_size, c.max_position_embeddings), (32, VOCAB, 131072));

    let mut cache = KvCache::new(model.kv_geometry(PAGE), 64, KvDType::BF16).unwrap();
    assert_eq!(cache.block_bytes(), PAGE * 128 * 1024 / 256, "Llama-3-8B's 128 KiB/token ÷ 256");
    let layer_bytes = cache.layer_block_bytes();
    let (pa, pb) = (prompt(100, 0), prompt(37, 1));
    let (mut a, mut b) = (SeqKv::default(), SeqKv::default());
    // Pages taken up front (as the prefill engine does), so the observer knows where to look.
    cache.reserve(&mut a, pa.len()).unwrap();
    let first_page = a.block_table()[0];
    let mut layers = Vec::new();
    let started = Instant::now();
    let out = {
        let mut steps = [
            Step { tokens: &pa, seq: &mut a, logits: Logits::All },
            Step { tokens: &pb, seq: &mut b, logits: Logits::Last },
        ];
        let mut after = |l: usize, cache: &KvCache| {
            // Layer l is written when it is announced, layer l + 1 is not yet.
            let page = cache.page_bytes(first_page).unwrap();
            assert!(page[l * layer_bytes..(l + 1) * layer_bytes].iter().any(|&x| x != 0), "layer {l} written");
            if l + 1 < 32 {
                assert!(page[(l + 1) * layer_bytes..(l + 2) * layer_bytes].iter().all(|&x| x == 0));
            }
            layers.push(l);
        };
        model.forward_observed(&mut cache, &mut steps, &mut after).unwrap()
    };
    let took = started.elapsed();
    let modeled_time =
        model.modeled_backend().unwrap().forward_time(&[SeqWork { past: 0, new: 100 }, SeqWork { past: 0, new: 37 }]);
    assert!(took >= modeled_time, "{took:?} < modeled {modeled_time:?}");
    assert!(modeled_time > Duration::from_millis(5), "8B weights alone take 6.4 ms to read: {modeled_time:?}");
    assert_eq!(layers, (0..32).collect::<Vec<_>>(), "after_layer once per layer, in order");
    assert_eq!((a.len(), b.len()), (100, 37));

    // One token per requested row, a hash of the row's token and position,
    // never special.
    let m = model.modeled_backend().unwrap();
    assert_eq!((out[0].len(), out[1].len()), (100 * VOCAB, VOCAB));
    for (i, row) in out[0].chunks_exact(VOCAB).enumerate() {
        let t = hot(row);
        assert_eq!(t, m.next_token(VOCAB, pa[i], i));
        assert!(t >= 256 && !reserved.contains(&t), "{t}");
    }
    assert_eq!(hot(&out[1]), m.next_token(VOCAB, pb[36], 36));

    // The same tokens in other chunks and another cache give the same KV
    // bytes and the same prediction: a decode node recomputing a lost
    // block reproduces the stored one.
    let mut other = KvCache::new(model.kv_geometry(PAGE), 16, KvDType::BF16).unwrap();
    let mut s = SeqKv::default();
    model.forward(&mut other, &mut [Step { tokens: &pa[..60], seq: &mut s, logits: Logits::None }]).unwrap();
    let last = model.forward(&mut other, &mut [Step { tokens: &pa[60..], seq: &mut s, logits: Logits::Last }]).unwrap();
    assert_eq!(hot(&last[0]), hot(&out[0][99 * VOCAB..]));
    for (&p, &q) in a.block_table().iter().zip(s.block_table()) {
        assert_eq!(cache.page_bytes(p).unwrap(), other.page_bytes(q).unwrap());
    }
    // Other sequences' KV differs (the values depend on the tokens).
    assert_ne!(cache.page_bytes(a.block_table()[0]).unwrap(), cache.page_bytes(b.block_table()[0]).unwrap());
    cache.release(a);
    cache.release(b);
    other.release(s);
    assert_eq!(cache.free_pages(), 64);
}

#[test]
fn modeled_generation_gives_exactly_max_tokens_with_any_sampler() {
    let section = ModelSection {
        compute: "modeled".into(),
        modeled: "h100-llama3-8b".into(),
        kv_dtype: "bf16".into(),
        ..ModelSection::default()
    };
    let loaded = section.load(false).expect("SmolLM2's tokenizer in the model cache (run scripts/test.sh)");
    let specials = loaded.tokenizer.special_ids();
    assert!(!specials.is_empty());
    let stop_ids = loaded.tokenizer.stop_ids().to_vec();
    assert!(!stop_ids.is_empty(), "the stop ids are in force: only the modeled tokens avoid them");
    let (tok_cfg, served) = section.load_tokenizer(false).unwrap();
    assert_eq!(&served, loaded.model.config(), "the conductor sees the workers' configuration");
    assert_eq!(tok_cfg.vocab_size(), loaded.tokenizer.vocab_size());
    let m = Modeled::new("h100-llama3-8b", 256).unwrap();
    let opts = EngineOptions { page_tokens: PAGE, kv_dtype: KvDType::BF16, num_pages: 64, chunk_tokens: 512 };
    let mut engine = Engine::new(loaded.model, opts).unwrap();
    let vocab = engine.model().config().vocab_size;

    const MAX: usize = 12;
    let samplers = [
        SamplingParams::default(),
        SamplingParams { temperature: 1.0, top_p: 0.9, seed: 3, logprobs: Some(2), ..Default::default() },
        SamplingParams { temperature: 2.0, top_k: 40, seed: 4, ..Default::default() },
    ];
    let requests: Vec<Request> = samplers
        .iter()
        .map(|s| Request { prompt: prompt(50, 9), max_tokens: MAX, sampling: s.clone(), stop_ids: stop_ids.clone() })
        .collect();
    let (gens, timings) = engine.generate(&requests, |_, _| Flow::Continue).unwrap();
    for g in &gens {
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert_eq!(g.tokens.len(), MAX);
        for t in g.ids() {
            assert!((256..vocab as u32).contains(&t) && specials.binary_search(&t).is_err(), "{t}");
        }
    }
    // The same prompt: whatever the sampler, the same tokens.
    assert_eq!(gens[0].ids(), gens[1].ids());
    assert_eq!(gens[0].ids(), gens[2].ids());
    assert_eq!(gens[1].tokens[0].logprob, Some(0.0), "all the mass on the modeled token");
    // Each decode step of three sequences took at least its modeled time.
    let modeled: Duration = (0..MAX - 1).map(|s| m.forward_time(&[SeqWork { past: 50 + s, new: 1 }; 3])).sum();
    assert!(timings.decode >= modeled, "{:?} < {modeled:?}", timings.decode);
    assert_eq!(engine.cache().free_pages(), 64);
}
