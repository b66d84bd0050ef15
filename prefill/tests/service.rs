//! A prefill node over real gRPC with SmolLM2 (from the model cache;
//! `scripts/test.sh` fetches it): its start-up profile, its status, and
//! resumed requests continuing their sampler.

use std::time::Instant;
use tandem_decode::wire::Layout;
use tandem_model::deploy::ModelSection;
use tandem_model::engine::{Engine, EngineOptions, Flow, Request};
use tandem_model::forward::Model;
use tandem_model::sampling::SamplingParams;
use tandem_prefill::engine::{Job, PrefillEngine};
use tandem_prefill::service::WorkerModel;
use tandem_prefill::PrefillConfig;
use tandem_proto::worker as pb;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_client::PrefillClient;
use tonic::transport::Channel;

/// SmolLM2 as the cluster file's default `[model]` section loads it.
fn smollm2() -> Model {
    ModelSection::default().load(false).expect("SmolLM2 in the model cache (run scripts/test.sh)").model
}

fn worker_model() -> WorkerModel {
    let section = ModelSection::default();
    WorkerModel { model: smollm2(), kv_dtype: section.kv_dtype().unwrap(), block_tokens: section.block_tokens }
}

fn config(profile: bool) -> PrefillConfig {
    PrefillConfig { listen: "127.0.0.1:0".parse().unwrap(), profile, ..PrefillConfig::default() }
}

async fn client(addr: std::net::SocketAddr) -> PrefillClient<Channel> {
    PrefillClient::connect(format!("http://{addr}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_and_status_over_grpc() {
    let cfg = config(true);
    let chunk_tokens = cfg.chunk_tokens;
    let wm = worker_model();
    let started = Instant::now();
    let node = tandem_prefill::serve(cfg, wm, None).await.unwrap();
    eprintln!("prefill node profiled and started in {:?}", started.elapsed());
    let mut c = client(node.local_addr()).await;

    let profile = c.profile(pb::ProfileRequest {}).await.unwrap().into_inner();
    eprintln!("{profile:#?}");
    assert_eq!(profile.node, "prefill-0");
    assert!(profile.decode.is_empty(), "a prefill node has no decode timings");
    // uncached ∈ {16, 64, 256} × cached ∈ {0, 256}, all fit the default pool.
    assert_eq!(chunk_tokens, 512);
    let shapes: Vec<(u32, u32)> = profile.prefill.iter().map(|p| (p.uncached, p.cached)).collect();
    let want: Vec<(u32, u32)> = [16, 64, 256].into_iter().flat_map(|u| [(u, 0), (u, 256)]).collect();
    assert_eq!(shapes, want);
    for p in &profile.prefill {
        assert!(p.ms.is_finite() && p.ms > 0.0, "{p:?}");
    }
    let ms = |u: u32, c: u32| profile.prefill.iter().find(|p| (p.uncached, p.cached) == (u, c)).unwrap().ms;
    assert!(ms(256, 0) > ms(16, 0), "256 uncached tokens cost more than 16: {profile:?}");

    let status = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.node, "prefill-0");
    assert_eq!(status.queued_requests, 0);
    assert_eq!(status.kv_pages_free, status.kv_pages_total, "profiling gave back every page");
    assert!(status.kv_pages_total > 0);
    drop(c);
    node.shutdown().await;
}

/// Profiles skip what the pool or the chunk budget rules out and give
/// every page back.
#[test]
fn profiles_fit_the_node() {
    let model = smollm2();
    // 20 pages of 16 tokens: 320 tokens at most.
    let layout = Layout::new(&model, Default::default(), 16, 0);
    let page_bytes = layout.block_bytes as u64;
    let layout = Layout::new(&model, Default::default(), 16, 20 * page_bytes);
    let mut cache = layout.cache(&model).unwrap();
    let points = tandem_prefill::profile::prefill(&model, &mut cache, 100).unwrap();
    let shapes: Vec<(u32, u32)> = points.iter().map(|p| (p.uncached, p.cached)).collect();
    assert_eq!(shapes, [(16, 0), (16, 256), (64, 0), (64, 256), (100, 0)], "100 + 256 tokens need 23 pages");
    assert!(points.iter().all(|p| p.ms.is_finite() && p.ms > 0.0));
    assert_eq!(cache.free_pages(), 20);
}

/// A request resumed after `k` sampled tokens (its prompt ends with them,
/// `sampler_step = k`) draws the token an unmoved request draws `k`
/// tokens on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_continues_its_sampler() {
    const N: usize = 6;
    let sampling = SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, seed: 7, logprobs: None };
    let prompt: Vec<u32> = vec![504, 3459, 282, 4649, 314, 2997, 30, 378, 1183, 282];
    let opts = EngineOptions { page_tokens: 16, ..EngineOptions::default() };
    let mut engine = Engine::new(smollm2(), opts).unwrap();
    let request = Request { prompt: prompt.clone(), max_tokens: N, sampling: sampling.clone(), stop_ids: vec![] };
    let (gens, _) = engine.generate(&[request], |_, _| Flow::Continue).unwrap();
    let want = gens[0].ids();
    assert_eq!(want.len(), N);

    let node = tandem_prefill::serve(config(false), worker_model(), None).await.unwrap();
    let mut c = client(node.local_addr()).await;
    let profile = c.profile(pb::ProfileRequest {}).await.unwrap().into_inner();
    assert!(profile.prefill.is_empty() && profile.decode.is_empty(), "profile = false: {profile:?}");

    let first = |k: usize, step: u64| {
        let mut c = c.clone();
        let request = pb::GenerateRequest {
            request_id: format!("resume-{k}-{step}"),
            prompt: [&prompt[..], &want[..k]].concat(),
            max_tokens: 1,
            sampling: Some(tandem_decode::wire::sampling_to_pb(&sampling)),
            stop_ids: vec![],
            sampler_step: step,
            tenant: String::new(),
        };
        async move {
            let req = pb::PrefillRequest { request: Some(request), decode_addr: String::new(), cached_blocks: 0 };
            let mut events = c.prefill(req).await.unwrap().into_inner();
            let Some(pb::GenerateEvent { event: Some(Event::Handoff(h)) }) = events.message().await.unwrap() else {
                panic!("a prefill without decode_addr answers with its handoff");
            };
            assert_eq!(h.sampler_step, step + 1, "the handoff counts the first token");
            h.first_token.unwrap().id
        }
    };
    let mut ignoring_the_step = Vec::new();
    for (k, &token) in want.iter().enumerate() {
        assert_eq!(first(k, k as u64).await, token, "token {k} of {want:?}");
        ignoring_the_step.push(first(k, 0).await);
    }
    // Were the step ignored, the resumed requests would draw these instead:
    // they must differ somewhere, or this test could not fail.
    assert_ne!(ignoring_the_step, want, "sampler steps must matter for this prompt and seed");

    let mut c = client(node.local_addr()).await;
    let bad = pb::GenerateRequest {
        request_id: "too-far".into(),
        prompt: prompt.clone(),
        max_tokens: 1,
        sampling: Some(tandem_decode::wire::sampling_to_pb(&sampling)),
        stop_ids: vec![],
        sampler_step: prompt.len() as u64,
        tenant: String::new(),
    };
    let req = pb::PrefillRequest { request: Some(bad), decode_addr: String::new(), cached_blocks: 0 };
    let err = c.prefill(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("sampler_step"), "{err}");
    drop(c);
    node.shutdown().await;
}

/// Four prompts queued at once and packed 48 tokens a pass finish in the
/// order they came: the engine chunks prompts first come, first served,
/// which the conductor's queue-time predictions assume (a prompt that
/// finished must not hand its place to the newest one).
#[test]
fn queued_prompts_finish_in_arrival_order() {
    let wm = worker_model();
    let layout = Layout::new(&wm.model, wm.kv_dtype, wm.block_tokens, 64 << 20);
    let vocab = layout.vocab;
    let cache = layout.cache(&wm.model).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (jobs, rx) = crossbeam_channel::unbounded();
    let mut waiters = Vec::new();
    for n in 0..4u32 {
        let (reply, done) = tokio::sync::oneshot::channel();
        let mut prompt = tandem_decode::profile::synthetic_tokens(64, vocab);
        prompt[0] = n; // four different prompts
        let job = Job {
            id: format!("r{n}"),
            prompt,
            sampling: SamplingParams::default(),
            sampler_step: 0,
            keys: vec![],
            cached: vec![],
            enqueued: Instant::now(),
            reply,
        };
        jobs.send(job).unwrap();
        waiters.push(std::thread::spawn(move || {
            let prefilled = done.blocking_recv().expect("a reply").expect("prefilled");
            (Instant::now(), prefilled.computed_tokens)
        }));
    }
    drop(jobs);
    let engine = PrefillEngine {
        model: wm.model,
        cache,
        chunk_tokens: 48,
        store: None,
        rt: rt.handle().clone(),
        stats: Default::default(),
        jobs: rx,
    };
    engine.run();
    let finished: Vec<(Instant, usize)> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(finished.iter().all(|&(_, computed)| computed == 64));
    let mut order: Vec<usize> = (0..4).collect();
    order.sort_by_key(|&i| finished[i].0);
    assert_eq!(order, [0, 1, 2, 3], "prompts must finish in arrival order");
}
