//! Colocated serving (`Decode.Generate`) over real gRPC with SmolLM2 (from
//! the model cache; `scripts/test.sh` fetches it): the node computes the
//! prompt itself in chunks interleaved with the running batch, reusing its
//! local prefix cache, and must draw exactly what the single-process engine
//! draws.

use std::time::{Duration, Instant};
use tandem_decode::wire::{self, Layout};
use tandem_decode::{DecodeConfig, DecodeHandle};
use tandem_model::deploy::ModelSection;
use tandem_model::engine::{Engine, EngineOptions, Flow, Request};
use tandem_model::forward::Model;
use tandem_model::kv_cache::KvDType;
use tandem_proto::worker as pb;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::generate_event::Event;
use tonic::transport::Channel;
use tonic::Code;

const BLOCK_TOKENS: usize = 16;
/// Small, so prompts take several chunks and decode in between.
const CHUNK_TOKENS: usize = 24;

fn smollm2() -> Model {
    ModelSection::default().load(false).expect("SmolLM2 in the model cache (run scripts/test.sh)").model
}

/// `n` tokens of a seeded xorshift stream: distinct seeds share no prefix.
fn prompt(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn greedy() -> pb::SamplingParams {
    pb::SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt,
        max_tokens,
        sampling: Some(greedy()),
        stop_ids: vec![],
        sampler_step: 0,
        tenant: String::new(),
    }
}

/// What the single-process engine draws for each request (pages of the
/// same size and dtype; its own chunking and batching).
fn reference(model: Model, requests: &[pb::GenerateRequest]) -> Vec<Vec<u32>> {
    let options =
        EngineOptions { page_tokens: BLOCK_TOKENS, kv_dtype: KvDType::F32, num_pages: 256, chunk_tokens: 512 };
    let mut engine = Engine::new(model, options).unwrap();
    let requests: Vec<Request> = requests
        .iter()
        .map(|r| Request {
            prompt: r.prompt.clone(),
            max_tokens: r.max_tokens as usize,
            sampling: wire::sampling_params(r.sampling.as_ref().unwrap()),
            stop_ids: r.stop_ids.clone(),
        })
        .collect();
    let (generations, _) = engine.generate(&requests, |_, _| Flow::Continue).unwrap();
    generations.iter().map(|g| g.ids()).collect()
}

struct Node {
    handle: DecodeHandle,
    client: DecodeClient<Channel>,
    layout: Layout,
}

async fn start(cfg: DecodeConfig) -> Node {
    let model = smollm2();
    let cfg =
        DecodeConfig { listen: "127.0.0.1:0".parse().unwrap(), profile: false, chunk_tokens: CHUNK_TOKENS, ..cfg };
    let layout = Layout::new(&model, KvDType::F32, BLOCK_TOKENS, cfg.kv_memory.as_u64());
    let handle = tandem_decode::serve(cfg, model, KvDType::F32, BLOCK_TOKENS, None).await.unwrap();
    let client = DecodeClient::connect(format!("http://{}", handle.local_addr())).await.unwrap();
    Node { handle, client, layout }
}

fn small_pool() -> DecodeConfig {
    DecodeConfig { kv_memory: bytesize::ByteSize::mib(128), ..DecodeConfig::default() }
}

/// One Generate call's events, checked for their order: `Prefilled`, then
/// `Tokens`, then `Finished`, then the end of the stream.
#[derive(Debug)]
struct Output {
    prefilled: pb::PrefillStats,
    tokens: Vec<u32>,
    finished: pb::Finished,
}

async fn generate(mut c: DecodeClient<Channel>, r: pb::GenerateRequest) -> Output {
    let mut events = c.generate(r).await.unwrap().into_inner();
    let (mut prefilled, mut tokens) = (None, Vec::new());
    while let Some(ev) = events.message().await.unwrap() {
        match ev.event.expect("an event") {
            Event::Prefilled(p) => {
                assert!(prefilled.is_none() && tokens.is_empty(), "Prefilled comes first, once: {p:?}");
                prefilled = Some(p);
            }
            Event::Tokens(t) => {
                assert!(prefilled.is_some(), "tokens before Prefilled");
                tokens.extend(t.tokens.iter().map(|t| t.id));
            }
            Event::Finished(finished) => {
                assert!(events.message().await.unwrap().is_none(), "Finished is the last event");
                return Output { prefilled: prefilled.expect("Prefilled before Finished"), tokens, finished };
            }
            Event::Handoff(h) => panic!("a colocated node hands nothing off: {h:?}"),
        }
    }
    panic!("the stream ended without Finished")
}

async fn status(c: &mut DecodeClient<Channel>) -> pb::DecodeStatus {
    c.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

/// Waits until nothing runs or waits and every page is free.
async fn idle(c: &mut DecodeClient<Channel>) -> pb::DecodeStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(c).await;
        if (s.batch_size, s.waiting, s.context_tokens, s.kv_pages_free) == (0, 0, 0, s.kv_pages_total) {
            return s;
        }
        assert!(Instant::now() < deadline, "the node still holds requests or pages: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `requests` at once on the node.
async fn generate_all(node: &Node, requests: &[pb::GenerateRequest]) -> Vec<Output> {
    let calls: Vec<_> = requests.iter().map(|r| tokio::spawn(generate(node.client.clone(), r.clone()))).collect();
    let mut outputs = Vec::new();
    for call in calls {
        outputs.push(call.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_matches_the_single_process_engine_and_hits_its_own_cache() {
    let started = Instant::now();
    let mut node = start(small_pool()).await;
    let vocab = node.layout.vocab;
    let lens = [5usize, 16, 40, 130];
    let requests: Vec<pb::GenerateRequest> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| request(&format!("r{n}"), prompt(i as u64 + 1, n, vocab), 12 + 4 * i as u32))
        .collect();
    let want = reference(smollm2(), &requests);

    // All four at once: the 130-token prompt computes in chunks of 24
    // while the others decode.
    let first = generate_all(&node, &requests).await;
    for ((r, out), want) in requests.iter().zip(&first).zip(&want) {
        assert_eq!(&out.tokens, want, "{}: colocated output differs from Engine::generate", r.request_id);
        assert_eq!((out.finished.reason.as_str(), out.finished.generated), ("length", r.max_tokens));
        let p = &out.prefilled;
        assert_eq!((p.node.as_str(), p.cached_blocks, p.computed_tokens), ("decode-0", 0, r.prompt.len() as u32));
    }
    let after_first = idle(&mut node.client).await;
    assert_eq!(after_first.local_cache_hits, 0, "distinct prompts share no block");
    assert!(after_first.local_cache_blocks > 0, "full blocks went to the local cache: {after_first:?}");
    assert_eq!(after_first.completed_requests, 4);

    // The same prompts again, one by one: their full blocks come from the
    // local cache (a prompt of whole blocks computes only its last token)
    // and the output is the same.
    let mut hits = 0;
    for ((r, want), (cached, computed)) in requests.iter().zip(&want).zip([(0, 5), (1, 1), (2, 8), (8, 2)]) {
        let out = generate(node.client.clone(), r.clone()).await;
        assert_eq!(&out.tokens, want, "{}: output differs on a cache hit", r.request_id);
        let p = &out.prefilled;
        assert_eq!((p.cached_blocks, p.computed_tokens), (cached, computed), "{}", r.request_id);
        hits += cached as u64;
    }
    let after_second = idle(&mut node.client).await;
    assert_eq!(after_second.local_cache_hits, hits, "{after_second:?}");
    eprintln!("{after_second:?}");
    eprintln!("took {:?}", started.elapsed());
    drop(node.client);
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_hits_only_the_shared_blocks() {
    let mut node = start(small_pool()).await;
    let vocab = node.layout.vocab;
    let a = prompt(21, 48, vocab);
    let b = [&a[..32], &prompt(22, 20, vocab)[..]].concat();
    let c = [&a[..20], &prompt(23, 30, vocab)[..]].concat();
    let requests = [request("a", a, 8), request("b", b, 8), request("c", c, 8)];
    let want = reference(smollm2(), &requests);
    let mut seen = Vec::new();
    for r in &requests {
        let out = generate(node.client.clone(), r.clone()).await;
        seen.push((out.prefilled.cached_blocks, out.prefilled.computed_tokens));
        assert_eq!(&out.tokens, &want[seen.len() - 1], "{}", r.request_id);
    }
    // b shares a's first two blocks; c shares one block and four tokens of
    // the next, which is no block.
    assert_eq!(seen, [(0, 48), (2, 20), (1, 34)]);
    assert_eq!(idle(&mut node.client).await.local_cache_hits, 3);
    drop(node.client);
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_matches_and_a_resumed_request_continues_its_sampler() {
    let node = start(small_pool()).await;
    let sampling = pb::SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95, seed: 11, logprobs: None };
    let full =
        pb::GenerateRequest { sampling: Some(sampling), ..request("seeded", prompt(31, 37, node.layout.vocab), 12) };
    let want = reference(smollm2(), std::slice::from_ref(&full)).remove(0);
    let out = generate(node.client.clone(), full.clone()).await;
    assert_eq!(out.tokens, want, "seeded sampling differs from Engine::generate");

    // Moved after four tokens: the prompt carries them and the sampler
    // resumes at step 4, so the rest is drawn as if it never moved.
    let resumed = pb::GenerateRequest {
        prompt: [&full.prompt[..], &want[..4]].concat(),
        max_tokens: 8,
        sampler_step: 4,
        ..full.clone()
    };
    let out = generate(node.client.clone(), resumed).await;
    assert_eq!(out.tokens, want[4..], "the resumed request drew other tokens");
    drop(node.client);
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_and_leave_nothing_behind() {
    let mut node = start(small_pool()).await;
    let vocab = node.layout.vocab;
    let ok = request("bad", prompt(41, 20, vocab), 4);
    let cases = [
        ("empty prompt", pb::GenerateRequest { prompt: vec![], ..ok.clone() }),
        ("token outside the vocabulary", pb::GenerateRequest { prompt: vec![1, vocab as u32], ..ok.clone() }),
        ("max_tokens 0", pb::GenerateRequest { max_tokens: 0, ..ok.clone() }),
        ("sampler_step = prompt length", pb::GenerateRequest { sampler_step: 20, ..ok.clone() }),
        ("no sampling parameters", pb::GenerateRequest { sampling: None, ..ok.clone() }),
        ("prompt fills the context", pb::GenerateRequest { prompt: vec![1; node.layout.context], ..ok.clone() }),
    ];
    for (what, r) in cases {
        let err = node.client.generate(r).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let s = idle(&mut node.client).await;
    assert_eq!((s.completed_requests, s.generated_tokens, s.local_cache_blocks), (0, 0, 0), "{s:?}");
    // The node still serves.
    let out = generate(node.client.clone(), ok).await;
    assert_eq!(out.tokens.len(), 4);
    drop(node.client);
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_generate_frees_its_pages() {
    let mut node = start(small_pool()).await;
    let vocab = node.layout.vocab;

    // Mid-decode: 2000 tokens to go when the stream is dropped.
    let mut events = node.client.generate(request("decoding", prompt(51, 40, vocab), 2000)).await.unwrap().into_inner();
    let mut tokens = 0;
    while tokens < 3 {
        match events.message().await.unwrap().and_then(|e| e.event) {
            Some(Event::Prefilled(_)) => {}
            Some(Event::Tokens(t)) => tokens += t.tokens.len(),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(status(&mut node.client).await.batch_size, 1);
    drop(events);
    idle(&mut node.client).await;

    // Mid-prompt: 700 tokens in chunks of 24, dropped before Prefilled.
    let events = node.client.generate(request("prefilling", prompt(52, 700, vocab), 8)).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut node.client).await.batch_size == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(events);
    let s = idle(&mut node.client).await;
    assert_eq!(s.completed_requests, 0, "both were cancelled: {s:?}");
    drop(node.client);
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_computes_in_chunks_while_the_batch_keeps_decoding() {
    let node = start(small_pool()).await;
    let vocab = node.layout.vocab;
    let mut c = node.client.clone();
    let mut decoding = c.generate(request("decoding", prompt(81, 20, vocab), 16)).await.unwrap().into_inner();
    while !matches!(decoding.message().await.unwrap().and_then(|e| e.event), Some(Event::Tokens(_))) {}
    // 960 prompt tokens are 40 passes of 24; the decoding request has at
    // most 15 tokens to go, one per pass, so it finishes while the prompt
    // still computes. Were the prompt computed in one go, it would stall
    // the batch and the long request (2 tokens) would finish first.
    let long = tokio::spawn({
        let c = node.client.clone();
        let r = request("long", prompt(82, 960, vocab), 2);
        async move {
            let out = generate(c, r).await;
            (Instant::now(), out)
        }
    });
    let mut finished = None;
    while let Some(ev) = decoding.message().await.unwrap() {
        if let Some(Event::Finished(f)) = ev.event {
            finished = Some((Instant::now(), f));
        }
    }
    let (decoded_at, f) = finished.expect("the decoding request finished");
    assert_eq!(f.generated, 16);
    let (long_at, long) = long.await.unwrap();
    assert_eq!((long.prefilled.computed_tokens, long.tokens.len()), (960, 2));
    assert!(decoded_at < long_at, "the decoding request waited for the long prompt");
    drop((c, node.client));
    node.handle.shutdown().await;
}

const HARBOUR: &str = "The old harbour town of Kessel sits where the river meets a cold grey sea. \
For three hundred years its fishermen sailed before dawn, and their wives mended nets on the stone quay \
while children carried baskets of herring to the market hall. In the winter of 1887 a storm broke the \
northern sea wall, and half of the fleet was lost in a single night. The town rebuilt the wall with granite \
from the quarries upstream, and the mayor, a stubborn woman named Ilse Marten, insisted that every boat \
carry a lantern of a different colour so that families watching from the cliffs could tell which crews were \
coming home. Today the lanterns hang in the museum by the lighthouse, and each autumn the town lights them \
again for one evening. Visitors who ask about the custom are usually told the same story by the keeper:";

const ORCHARD: &str = "My grandmother kept an orchard of forty apple trees on the slope behind her farmhouse, \
and every September the whole family came to help with the harvest. We climbed wooden ladders with canvas \
bags over our shoulders, and she walked between the rows telling us which trees were ready and which needed \
another week of sun. The early apples went to the cider press in the village; the late ones, hard and sour, \
were wrapped one by one in newspaper and stored in the cellar, where they slowly turned sweet by Christmas. \
She never wrote any of this down. When she died, my cousins and I tried to remember which tree was which, \
and we argued for an entire afternoon before we found her notebook in the kitchen drawer. The first page said:";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_colocated_sequence_resumes_from_the_local_cache() {
    let loaded = ModelSection::default().load(false).expect("SmolLM2 in the model cache (run scripts/test.sh)");
    let block_bytes = Layout::new(&loaded.model, KvDType::F32, BLOCK_TOKENS, 0).block_bytes as u64;
    // Prose, so what the model writes depends on the whole context (on
    // random tokens it drifts into counting, which hides a wrong block).
    let text = |t: &str| {
        let ids = loaded.tokenizer.encode(t, false).unwrap();
        assert!(ids.len() >= 130, "{} tokens", ids.len());
        ids[..130].to_vec()
    };
    let long = request("long", text(HARBOUR), 200);
    let short = request("short", text(ORCHARD), 120);
    drop(loaded);
    // 24 pages: either request alone fits (21 and 16 pages at most), both
    // together do not.
    let cfg = DecodeConfig { kv_memory: bytesize::ByteSize::b(24 * block_bytes), ..DecodeConfig::default() };
    let mut node = start(cfg).await;
    let want = reference(smollm2(), &[long.clone(), short.clone()]);

    // `short` joins once `long` decodes; both grow until the pool runs out
    // and the youngest (`short`) is preempted, then re-joins when `long`
    // is done, its blocks read back from the local cache.
    let mut c = node.client.clone();
    let mut events = c.generate(long.clone()).await.unwrap().into_inner();
    let mut long_tokens = Vec::new();
    while long_tokens.is_empty() {
        if let Some(Event::Tokens(t)) = events.message().await.unwrap().and_then(|e| e.event) {
            long_tokens.extend(t.tokens.iter().map(|t| t.id));
        }
    }
    let short_call = tokio::spawn(generate(node.client.clone(), short));
    while let Some(ev) = events.message().await.unwrap() {
        match ev.event {
            Some(Event::Tokens(t)) => long_tokens.extend(t.tokens.iter().map(|t| t.id)),
            Some(Event::Finished(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    let short_out = short_call.await.unwrap();
    assert_eq!(long_tokens, want[0], "the long request's output changed");
    assert_eq!(short_out.tokens, want[1], "the preempted request's output changed");
    assert!(short_out.finished.decode.as_ref().unwrap().preemptions > 0, "{short_out:?}");
    let s = idle(&mut node.client).await;
    assert!(s.preemptions > 0 && s.local_cache_hits > 0, "re-joined from the local cache: {s:?}");
    drop((c, node.client));
    node.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cache_keeps_to_its_bound() {
    let model = smollm2();
    let block_bytes = Layout::new(&model, KvDType::F32, BLOCK_TOKENS, 0).block_bytes as u64;
    drop(model);
    let cfg = DecodeConfig { local_cache: bytesize::ByteSize::b(3 * block_bytes), ..small_pool() };
    let mut node = start(cfg).await;
    let r = request("bounded", prompt(71, 130, node.layout.vocab), 20);
    let first = generate(node.client.clone(), r.clone()).await;
    assert_eq!(idle(&mut node.client).await.local_cache_blocks, 3, "three blocks fit");
    // Only the last blocks stayed, so the prompt's first block misses.
    let second = generate(node.client.clone(), r).await;
    assert_eq!(second.tokens, first.tokens);
    assert_eq!(second.prefilled.cached_blocks, 0);
    let s = idle(&mut node.client).await;
    assert_eq!((s.local_cache_blocks, s.local_cache_hits), (3, 0), "{s:?}");
    drop(node.client);
    node.handle.shutdown().await;
}
