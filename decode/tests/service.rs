//! A decode node over real gRPC with SmolLM2 (from the model cache;
//! `scripts/test.sh` fetches it): its start-up profile and the running
//! batch's context in its status.

use std::time::{Duration, Instant};
use tandem_decode::profile::synthetic_tokens;
use tandem_decode::wire::Layout;
use tandem_decode::DecodeConfig;
use tandem_model::deploy::ModelSection;
use tandem_model::forward::Model;
use tandem_model::kv_cache::KvDType;
use tandem_proto::block_keys;
use tandem_proto::worker as pb;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::generate_event::Event;

/// SmolLM2 as the cluster file's default `[model]` section loads it.
fn smollm2() -> Model {
    ModelSection::default().load(false).expect("SmolLM2 in the model cache (run scripts/test.sh)").model
}

const BLOCK_TOKENS: usize = 16;

/// A handoff of a `prompt` of whole blocks whose KV the node recomputes
/// (it has no store).
fn handoff(layout: &Layout, prompt: Vec<u32>, max_tokens: u32) -> pb::Handoff {
    assert!(prompt.len().is_multiple_of(BLOCK_TOKENS));
    let keys = block_keys(layout.salt, &prompt, BLOCK_TOKENS).iter().map(|k| k.0).collect();
    pb::Handoff {
        request: Some(pb::GenerateRequest {
            request_id: "status".into(),
            prompt,
            max_tokens,
            sampling: Some(pb::SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }),
            stop_ids: vec![],
            sampler_step: 0,
            tenant: String::new(),
        }),
        model_fingerprint: layout.fingerprint.clone(),
        kv_dtype: layout.kv_dtype.name().into(),
        block_tokens: BLOCK_TOKENS as u32,
        block_keys: keys,
        partial_block: vec![],
        partial_tokens: 0,
        first_token: Some(pb::Token { id: 42, logprob: None, top: vec![] }),
        sampler_step: 1,
        prefill: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_status_over_grpc() {
    let model = smollm2();
    let cfg = DecodeConfig { listen: "127.0.0.1:0".parse().unwrap(), ..DecodeConfig::default() };
    let layout = Layout::new(&model, KvDType::F32, BLOCK_TOKENS, cfg.kv_memory.as_u64());
    let started = Instant::now();
    let node = tandem_decode::serve(cfg, model, KvDType::F32, BLOCK_TOKENS, None).await.unwrap();
    eprintln!("decode node profiled and started in {:?}", started.elapsed());
    let mut c = DecodeClient::connect(format!("http://{}", node.local_addr())).await.unwrap();

    let profile = c.profile(pb::ProfileRequest {}).await.unwrap().into_inner();
    eprintln!("{profile:#?}");
    assert_eq!(profile.node, "decode-0");
    assert!(profile.prefill.is_empty(), "a decode node has no prefill timings");
    // batch ∈ {1, 4, 16} × per-sequence context ∈ {64, 512}, all fit the default pool.
    let shapes: Vec<(u32, u64)> = profile.decode.iter().map(|p| (p.batch, p.context)).collect();
    let want: Vec<(u32, u64)> =
        [1u32, 4, 16].into_iter().flat_map(|b| [(b, 64 * b as u64), (b, 512 * b as u64)]).collect();
    assert_eq!(shapes, want);
    for p in &profile.decode {
        assert!(p.ms.is_finite() && p.ms > 0.0, "{p:?}");
    }
    let ms = |b: u32, ctx: u64| profile.decode.iter().find(|p| (p.batch, p.context) == (b, ctx)).unwrap().ms;
    assert!(ms(16, 16 * 512) > ms(1, 64), "16 sequences of 512 tokens cost more than one of 64: {profile:?}");

    let idle = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((idle.batch_size, idle.context_tokens), (0, 0));
    assert_eq!(idle.kv_pages_free, idle.kv_pages_total, "profiling gave back every page");

    // A running sequence: its KV shows in the status while it decodes
    // (2000 tokens to go, so it is still running when asked).
    const PROMPT: usize = 32;
    const MAX_TOKENS: u32 = 2000;
    let prompt = synthetic_tokens(PROMPT, layout.vocab);
    let mut events = c.decode(handoff(&layout, prompt, MAX_TOKENS)).await.unwrap().into_inner();
    for _ in 0..2 {
        let ev = events.message().await.unwrap();
        assert!(matches!(ev, Some(pb::GenerateEvent { event: Some(Event::Tokens(_)) })), "{ev:?}");
    }
    let busy = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(busy.batch_size, 1);
    assert!(
        (PROMPT as u64..PROMPT as u64 + MAX_TOKENS as u64).contains(&busy.context_tokens),
        "context_tokens {} for one sequence of a {PROMPT}-token prompt",
        busy.context_tokens
    );
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        if (s.batch_size, s.context_tokens, s.kv_pages_free) == (0, 0, s.kv_pages_total) {
            break;
        }
        assert!(Instant::now() < deadline, "the cancelled sequence still holds the batch: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    node.shutdown().await;
}

/// Shapes the pool cannot hold are skipped, batches are capped at
/// `max_batch`, partial blocks fill the context, and every page comes
/// back.
#[test]
fn profiles_fit_the_node() {
    let model = smollm2();
    // Blocks of 48 tokens: 64 and 512 tokens end mid-block.
    let page_bytes = Layout::new(&model, KvDType::F32, 48, 0).block_bytes as u64;
    let layout = Layout::new(&model, KvDType::F32, 48, 20 * page_bytes);
    let mut cache = layout.cache(&model).unwrap();
    let points = tandem_decode::profile::decode(&model, &mut cache, 2).unwrap();
    let shapes: Vec<(u32, u64)> = points.iter().map(|p| (p.batch, p.context)).collect();
    assert_eq!(shapes, [(1, 64), (1, 512), (2, 128)], "two sequences of 512 tokens need 22 pages of 20");
    assert!(points.iter().all(|p| p.ms.is_finite() && p.ms > 0.0));
    assert_eq!(cache.free_pages(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_off_answers_empty() {
    let cfg = DecodeConfig { listen: "127.0.0.1:0".parse().unwrap(), profile: false, ..DecodeConfig::default() };
    let node = tandem_decode::serve(cfg, smollm2(), KvDType::F32, BLOCK_TOKENS, None).await.unwrap();
    let mut c = DecodeClient::connect(format!("http://{}", node.local_addr())).await.unwrap();
    let profile = c.profile(pb::ProfileRequest {}).await.unwrap().into_inner();
    assert_eq!(profile, pb::ProfileReply { node: "decode-0".into(), prefill: vec![], decode: vec![] });
    drop(c);
    node.shutdown().await;
}
