//! The engine's invariants: how tokens are paged, chunked, batched or
//! shared never changes what the model computes. Results must be bit for
//! bit identical, not merely close.

mod common;

use common::{cases, fixtures};
use tandem_kernels::Precision;
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::sampling::{argmax, SamplingParams};

fn tiny(precision: Precision) -> Model {
    engine::load(&fixtures().join("tiny-llama-bf16"), precision).unwrap().model
}

fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request { prompt: prompt.to_vec(), max_tokens, sampling: SamplingParams::default(), stop_ids: vec![] }
}

/// A prompt of `n` ordinary ids, different per `salt`.
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + salt * 101) % 4000).collect()
}

/// Prefills `prompt` into `seq`, then decodes `n` greedy tokens one at a
/// time; returns every logits row produced.
fn run_greedy(model: &Model, cache: &mut KvCache, seq: &mut SeqKv, prompt: &[u32], n: usize) -> Vec<Vec<f32>> {
    let mut rows =
        vec![model.forward(cache, &mut [Step { tokens: prompt, seq, logits: Logits::Last }]).unwrap().remove(0)];
    for _ in 1..n {
        let tok = [argmax(rows.last().unwrap())];
        rows.push(model.forward(cache, &mut [Step { tokens: &tok, seq, logits: Logits::Last }]).unwrap().remove(0));
    }
    rows
}

#[test]
fn paged_equals_contiguous_for_both_kv_dtypes() {
    let model = tiny(Precision::Fast);
    let p = prompt(70, 1);
    for dtype in [KvDType::F32, KvDType::BF16] {
        // Contiguous: one page holds the whole sequence.
        let mut flat = KvCache::new(model.kv_geometry(256), 1, dtype).unwrap();
        let mut seq = SeqKv::default();
        let want = run_greedy(&model, &mut flat, &mut seq, &p, 24);

        // Paged: 16-token pages, scattered by another sequence that grabs
        // every other page.
        let mut paged = KvCache::new(model.kv_geometry(16), 32, dtype).unwrap();
        let (mut seq, mut other) = (SeqKv::default(), SeqKv::default());
        for i in 1..=8 {
            paged.reserve(&mut other, i * 16).unwrap();
            paged.reserve(&mut seq, i * 16).unwrap();
        }
        let table = seq.block_table().to_vec();
        assert!(table.windows(2).all(|w| w[1] != w[0] + 1), "pages are scattered: {table:?}");
        let got = run_greedy(&model, &mut paged, &mut seq, &p, 24);
        assert_eq!(got, want, "{dtype:?}: paged logits differ from contiguous");
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    for precision in [Precision::Exact, Precision::Fast] {
        let mut want = None;
        for chunk in [1usize, 5, 16, 64, 512] {
            let mut engine =
                Engine::new(tiny(precision), EngineOptions { chunk_tokens: chunk, ..EngineOptions::default() })
                    .unwrap();
            let p = prompt(100, 2);
            let (gens, t) = engine.generate(&[greedy(&p, 16)], |_, _| Flow::Continue).unwrap();
            assert_eq!(t.prefill_tokens, 100);
            let ids = gens[0].ids();
            match &want {
                None => want = Some(ids),
                Some(w) => assert_eq!(&ids, w, "{precision:?}: chunk {chunk} changed the output"),
            }
        }
    }
}

#[test]
fn a_mixed_batch_equals_each_request_alone() {
    let reqs: Vec<Request> = cases("tiny-llama-bf16__f32compute")
        .iter()
        .map(|c| greedy(&c.prompt_ids, 20))
        .chain([greedy(&prompt(33, 3), 7), greedy(&prompt(90, 4), 25)])
        .collect();
    for dtype in [KvDType::F32, KvDType::BF16] {
        let options = EngineOptions { kv_dtype: dtype, chunk_tokens: 64, ..EngineOptions::default() };
        let mut engine = Engine::new(tiny(Precision::Fast), options).unwrap();
        let (batched, t) = engine.generate(&reqs, |_, _| Flow::Continue).unwrap();
        assert!(t.decode_steps < reqs.iter().map(|r| r.max_tokens).sum::<usize>(), "decode steps were batched");
        for (r, b) in reqs.iter().zip(&batched) {
            let (alone, _) = engine.generate(std::slice::from_ref(r), |_, _| Flow::Continue).unwrap();
            assert_eq!(b.ids(), alone[0].ids(), "{dtype:?}: batching changed a request's output");
            assert_eq!(b.ids().len(), r.max_tokens);
        }
        assert_eq!(engine.cache().free_pages(), engine.cache().num_pages());
    }
}

#[test]
fn reused_prefix_pages_equal_recomputed_ones() {
    let model = tiny(Precision::Fast);
    let shared = prompt(48, 5); // three full 16-token pages
    let tail_a = prompt(9, 6);
    let tail_b = prompt(21, 7);
    let mut cache = KvCache::new(model.kv_geometry(16), 64, KvDType::F32).unwrap();

    let mut first = SeqKv::default();
    model.forward(&mut cache, &mut [Step { tokens: &shared, seq: &mut first, logits: Logits::None }]).unwrap();
    let used = cache.num_pages() - cache.free_pages();

    for tail in [&tail_a, &tail_b] {
        // Reused: share the cached pages, compute only the tail.
        let mut reused = cache.share_prefix(&first, 48).unwrap();
        assert_eq!(cache.num_pages() - cache.free_pages(), used, "sharing allocates nothing");
        let got = run_greedy(&model, &mut cache, &mut reused, tail, 12);
        // Recomputed: the whole prompt from scratch.
        let full: Vec<u32> = shared.iter().chain(tail.iter()).copied().collect();
        let mut fresh = SeqKv::default();
        let want = run_greedy(&model, &mut cache, &mut fresh, &full, 12);
        assert_eq!(got, want, "prefix reuse changed the logits");
        cache.release(reused);
        cache.release(fresh);
    }
    cache.release(first);
    assert_eq!(cache.free_pages(), cache.num_pages());
}
