//! KV blocks moved between two engines' caches (what the store does between
//! a prefill and a decode node) continue the computation bit for bit: the
//! receiving side's logits equal those of the sender continuing itself.

mod common;

use common::fixtures;
use tandem_kernels::Precision;
use tandem_model::engine;
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, KvDType, SeqKv};
use tandem_model::sampling::argmax;

fn tiny() -> Model {
    engine::load(&fixtures().join("tiny-llama-bf16"), Precision::Fast).unwrap().model
}

fn step(model: &Model, cache: &mut KvCache, seq: &mut SeqKv, tokens: &[u32]) -> Vec<f32> {
    model.forward(cache, &mut [Step { tokens, seq, logits: Logits::Last }]).unwrap().remove(0)
}

#[test]
fn blocks_exported_by_one_cache_continue_bit_identically_in_another() {
    let (prefill, decode) = (tiny(), tiny());
    for dtype in [KvDType::F32, KvDType::BF16] {
        for page_tokens in [16, 64] {
            let prompt: Vec<u32> = (0..150u32).map(|i| 3 + (i * 53) % 4000).collect();
            let full = prompt.len() / page_tokens * page_tokens;

            // Sender: prefill the whole prompt, then decode 8 tokens itself.
            let mut a = KvCache::new(prefill.kv_geometry(page_tokens), 32, dtype).unwrap();
            let mut sa = SeqKv::default();
            let mut want = vec![step(&prefill, &mut a, &mut sa, &prompt)];
            let blocks: Vec<Vec<u8>> =
                sa.block_table()[..full / page_tokens].iter().map(|&p| a.page_bytes(p).unwrap().to_vec()).collect();
            for _ in 0..8 {
                let t = [argmax(want.last().unwrap())];
                want.push(step(&prefill, &mut a, &mut sa, &t));
            }

            // Receiver: the full blocks from the "store", the partial tail
            // recomputed, then the same 8 decode steps.
            let mut b = KvCache::new(decode.kv_geometry(page_tokens), 32, dtype).unwrap();
            let mut sb = SeqKv::default();
            let views: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            b.append_blocks(&mut sb, &views).unwrap();
            assert_eq!(sb.len(), full);
            let mut got = vec![step(&decode, &mut b, &mut sb, &prompt[full..])];
            for _ in 0..8 {
                let t = [argmax(got.last().unwrap())];
                got.push(step(&decode, &mut b, &mut sb, &t));
            }
            assert_eq!(got, want, "{dtype:?}, {page_tokens}-token blocks: logits differ after the handoff");
        }
    }
}
