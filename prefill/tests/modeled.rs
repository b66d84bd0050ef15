//! Modeled compute end to end: a modeled prefill node and decode node
//! (`[model] compute = "modeled"`, Llama-3-8B on an H100, KV ÷ 256) and a
//! KV store (master and storage node), all in this process over real
//! sockets and shared-memory segments. Requests get exactly `max_tokens`
//! tokens, the store holds blocks of the scaled size with the bytes the
//! modeled pass wrote, and a repeated prompt hits the cache. The start-up
//! profiles time serving-sized shapes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_decode::wire::Layout;
use tandem_decode::DecodeConfig;
use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_kvstore::master::{self, MasterConfig, MasterHandle};
use tandem_kvstore::node::{self, NodeHandle, StorageConfig};
use tandem_model::deploy::ModelSection;
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvDType, SeqKv};
use tandem_model::modeled::SeqWork;
use tandem_prefill::service::WorkerModel;
use tandem_prefill::PrefillConfig;
use tandem_proto::block_keys;
use tandem_proto::worker as pb;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_client::PrefillClient;

const BLOCK: usize = 16;
/// Llama-3-8B's 128 KiB of KV per token, ÷ 256.
const TOKEN_BYTES: usize = 512;

fn section() -> ModelSection {
    ModelSection {
        compute: "modeled".into(),
        modeled: "h100-llama3-8b".into(),
        kv_scale: 256,
        kv_dtype: "bf16".into(),
        block_tokens: BLOCK,
        ..ModelSection::default()
    }
}

fn modeled() -> Model {
    section().load(false).expect("SmolLM2's tokenizer in the model cache (run scripts/test.sh)").model
}

/// A fresh folder, removed when dropped (a failed test leaves nothing).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("tandem-modeled-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A master and one storage node whose segments live in a fresh folder.
struct Store {
    master: MasterHandle,
    node: NodeHandle,
    _dir: TempDir,
}

impl Store {
    async fn start() -> Store {
        let dir = TempDir::new();
        let cfg = MasterConfig { listen: "127.0.0.1:0".parse().unwrap(), tick_ms: 20, ..MasterConfig::default() };
        let master = master::serve(cfg).await.unwrap();
        let cfg = StorageConfig {
            name: "store-0".into(),
            master: master.local_addr().to_string(),
            listen: "127.0.0.1:0".parse().unwrap(),
            data_listen: "127.0.0.1:0".parse().unwrap(),
            dram: bytesize::ByteSize::mib(64),
            segment_size: bytesize::ByteSize::mib(32),
            shm_dir: dir.0.clone(),
            ..StorageConfig::default()
        };
        let node = node::start(cfg).await.unwrap();
        let store = Store { master, node, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.client().stats().await.map_or(0, |s| s.nodes.len()) < 1 {
            assert!(Instant::now() < deadline, "the storage node did not register");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
    }

    fn client(&self) -> StoreClient {
        StoreClient::new(ClientConfig { master: self.master.local_addr().to_string(), ..ClientConfig::default() })
            .unwrap()
    }

    async fn stop(self) {
        self.node.shutdown().await;
        self.master.shutdown().await;
    }
}

/// What one request's event stream said.
#[derive(Debug, Default)]
struct Outcome {
    prefilled: Option<pb::PrefillStats>,
    tokens: Vec<u32>,
    finished: Option<pb::Finished>,
}

async fn run(prefill: std::net::SocketAddr, decode: std::net::SocketAddr, prompt: &[u32], max: u32) -> Outcome {
    let mut c = PrefillClient::connect(format!("http://{prefill}")).await.unwrap();
    let request = pb::GenerateRequest {
        request_id: "modeled".into(),
        prompt: prompt.to_vec(),
        max_tokens: max,
        sampling: Some(pb::SamplingParams { temperature: 0.7, top_k: 0, top_p: 0.9, seed: 5, logprobs: None }),
        stop_ids: vec![],
        sampler_step: 0,
        tenant: String::new(),
    };
    let req = pb::PrefillRequest { request: Some(request), decode_addr: decode.to_string(), cached_blocks: 0 };
    let mut events = c.prefill(req).await.unwrap().into_inner();
    let mut out = Outcome::default();
    while let Some(ev) = events.message().await.unwrap() {
        match ev.event {
            Some(Event::Prefilled(s)) => out.prefilled = Some(s),
            Some(Event::Tokens(t)) => out.tokens.extend(t.tokens.iter().map(|t| t.id)),
            Some(Event::Finished(f)) => out.finished = Some(f),
            other => panic!("unexpected event {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modeled_prefill_and_decode_serve_through_the_store() {
    const PROMPT: usize = 100;
    const MAX: u32 = 24;
    let store = Store::start().await;
    let (prefill_model, decode_model) = (modeled(), modeled());
    assert!(prefill_model.is_modeled());
    let layout = Layout::new(&prefill_model, KvDType::BF16, BLOCK, 0);
    assert_eq!(layout.block_bytes, BLOCK * TOKEN_BYTES, "blocks of the scaled size");
    assert_eq!(layout.context, 131072, "the modeled model's context");
    // The KV a modeled pass writes for the prompt, computed here.
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| 300 + (i * 7919) % 40000).collect();
    let mut local = Layout::new(&prefill_model, KvDType::BF16, BLOCK, 1 << 20).cache(&prefill_model).unwrap();
    let mut seq = SeqKv::default();
    prefill_model.forward(&mut local, &mut [Step { tokens: &prompt, seq: &mut seq, logits: Logits::None }]).unwrap();

    let decode_cfg = DecodeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        kv_memory: bytesize::ByteSize::mib(64),
        profile: false,
        ..DecodeConfig::default()
    };
    let decode = tandem_decode::serve(decode_cfg, decode_model, KvDType::BF16, BLOCK, Some(Arc::new(store.client())))
        .await
        .unwrap();
    let prefill_cfg = PrefillConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        kv_memory: bytesize::ByteSize::mib(64),
        profile: false,
        ..PrefillConfig::default()
    };
    let wm = WorkerModel { model: prefill_model, kv_dtype: KvDType::BF16, block_tokens: BLOCK };
    let prefill = tandem_prefill::serve(prefill_cfg, wm, Some(Arc::new(store.client()))).await.unwrap();

    let started = Instant::now();
    let first = run(prefill.local_addr(), decode.local_addr(), &prompt, MAX).await;
    let took = started.elapsed();
    assert_eq!(first.tokens.len(), MAX as usize, "{first:?}");
    let fin = first.finished.as_ref().unwrap();
    assert_eq!((fin.reason.as_str(), fin.generated), ("length", MAX));
    let pre = first.prefilled.as_ref().unwrap();
    assert_eq!((pre.cached_blocks, pre.computed_tokens, pre.stored_blocks), (0, PROMPT as u32, 6));
    assert_eq!(fin.decode.as_ref().unwrap().fetched_blocks, 6, "the decode node read the prompt's blocks");
    // The prompt's pass and MAX - 1 decode steps each take their modeled time.
    let backend = tandem_model::modeled::Modeled::new("h100-llama3-8b", 256).unwrap();
    let floor = backend.forward_time(&[SeqWork { past: 0, new: PROMPT }])
        + (0..MAX as usize - 1).map(|s| backend.forward_time(&[SeqWork { past: PROMPT + s, new: 1 }])).sum();
    assert!(took >= floor, "{took:?} < modeled {floor:?}");

    // The store holds the prompt's full blocks at the scaled size, with
    // the bytes the modeled pass writes.
    let keys = block_keys(layout.salt, &prompt, BLOCK);
    assert_eq!(keys.len(), 6);
    let got = store.client().get(&keys, 4 * layout.block_bytes).await.unwrap();
    for (i, block) in got.iter().enumerate() {
        let block = block.as_ref().unwrap_or_else(|| panic!("block {i} is not in the store"));
        assert_eq!(block.len(), BLOCK * TOKEN_BYTES);
        assert_eq!(block.as_slice(), local.page_bytes(seq.block_table()[i]).unwrap(), "block {i}");
    }

    // The same prompt again: its full blocks come from the store, only the
    // last partial block is computed, and the tokens are the same.
    let second = run(prefill.local_addr(), decode.local_addr(), &prompt, MAX).await;
    let pre = second.prefilled.as_ref().unwrap();
    assert_eq!((pre.cached_blocks, pre.computed_tokens), (6, (PROMPT - 6 * BLOCK) as u32), "{pre:?}");
    assert_eq!(second.tokens, first.tokens);

    // Nothing left reserved or leased (write-backs and lease releases are
    // asynchronous: allow them a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = store.client().stats().await.unwrap();
        if (s.pending_puts, s.active_leases) == (0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "{} puts pending, {} leases held", s.pending_puts, s.active_leases);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    prefill.shutdown().await;
    decode.shutdown().await;
    local.release(seq);
    store.stop().await;
}

/// A modeled node's start-up profile times serving-sized passes, each at
/// least its modeled time, and gives every page back.
#[test]
fn modeled_profiles_time_serving_sized_shapes() {
    let model = modeled();
    let backend = model.modeled_backend().unwrap().clone();
    let layout = Layout::new(&model, KvDType::BF16, BLOCK, 512 << 20);
    let mut cache = layout.cache(&model).unwrap();
    let points = tandem_prefill::profile::prefill(&model, &mut cache, 16384).unwrap();
    let shapes: Vec<(u32, u32)> = points.iter().map(|p| (p.uncached, p.cached)).collect();
    let want: Vec<(u32, u32)> = [512, 4096, 16384].into_iter().flat_map(|u| [(u, 0), (u, 16384)]).collect();
    assert_eq!(shapes, want);
    for p in &points {
        let modeled = backend.forward_time(&[SeqWork { past: p.cached as usize, new: p.uncached as usize }]);
        assert!(p.ms >= modeled.as_secs_f64() * 1e3, "{p:?} faster than modeled {modeled:?}");
    }
    // Capped at the chunk budget, as for a real model.
    let capped = tandem_prefill::profile::prefill(&model, &mut cache, 512).unwrap();
    assert_eq!(capped.iter().map(|p| (p.uncached, p.cached)).collect::<Vec<_>>(), [(512, 0), (512, 16384)]);
    assert_eq!(cache.free_pages(), layout.num_pages);

    // 64 sequences of 16384 tokens need 512 MiB of scaled KV: with 256 MiB
    // that shape is skipped.
    let layout = Layout::new(&model, KvDType::BF16, BLOCK, 256 << 20);
    let mut cache = layout.cache(&model).unwrap();
    let points = tandem_decode::profile::decode(&model, &mut cache, 64).unwrap();
    let shapes: Vec<(u32, u64)> = points.iter().map(|p| (p.batch, p.context)).collect();
    assert_eq!(shapes, [(1, 1024), (1, 16384), (16, 16 * 1024), (16, 16 * 16384), (64, 64 * 1024)]);
    for p in &points {
        let per_seq = p.context as usize / p.batch as usize;
        let modeled = backend.forward_time(&vec![SeqWork { past: per_seq, new: 1 }; p.batch as usize]);
        assert!(p.ms >= modeled.as_secs_f64() * 1e3, "{p:?} faster than modeled {modeled:?}");
    }
    assert_eq!(cache.free_pages(), layout.num_pages);
}
