//! Disaggregated serving as users run it: a store master, storage nodes,
//! prefill and decode nodes, each its own `tandem` process on loopback.
//! Greedy output must equal the single-process engine's token for token,
//! whatever the node counts, KV dtype, block size, transport or cache
//! hits; nothing may be left behind; dead nodes give clear errors.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_kernels::Precision;
use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::kv_cache::KvDType;
use tandem_proto::worker as pb;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_client::PrefillClient;
use tonic::transport::Channel;

mod common;
use common::{spawn_until, tandem, Proc};

fn tiny_model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llama-bf16").display().to_string()
}

/// SmolLM2 from the model cache (`scripts/test.sh` fetches it first).
fn smollm2() -> String {
    tandem_model::fetch::resolve("smollm2", false).expect("SmolLM2 in the model cache").display().to_string()
}

struct Spec {
    model: String,
    kv_dtype: &'static str,
    block: usize,
    transport: &'static str,
    storage: usize,
    prefill: usize,
    decode: usize,
    decode_kv: &'static str,
    max_batch: usize,
}

impl Spec {
    fn new(model: String, kv_dtype: &'static str, block: usize, transport: &'static str) -> Spec {
        Spec {
            model,
            kv_dtype,
            block,
            transport,
            storage: 1,
            prefill: 1,
            decode: 1,
            decode_kv: "256MiB",
            max_batch: 64,
        }
    }
}

struct Worker {
    name: String,
    addr: String,
    proc: Option<Proc>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    master_addr: String,
    _master: Proc,
    storage: Vec<Option<Proc>>,
    prefill: Vec<Worker>,
    decode: Vec<Worker>,
}

impl Cluster {
    fn start(spec: &Spec) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("cluster.toml");
        write_config(&config, spec, "127.0.0.1:0");
        let mut cmd = tandem();
        cmd.args(["kvstore", "master", "--config"]).arg(&config);
        let (master, line) = spawn_until(cmd, "master", "kvstore master listening on");
        let master_addr = line.rsplit(' ').next().unwrap().trim().to_owned();
        write_config(&config, spec, &master_addr);
        let mut storage = Vec::new();
        for i in 0..spec.storage {
            let mut cmd = tandem();
            cmd.args(["kvstore", "storage", "--config"]).arg(&config).args(["--node", &format!("store-{i}")]);
            storage.push(Some(spawn_until(cmd, &format!("store-{i}"), "listening: control").0));
        }
        let worker = |role: &str, i: usize| {
            let name = format!("{role}-{i}");
            let mut cmd = tandem();
            cmd.arg(role).arg("--config").arg(&config).args(["--node", &name]);
            let (proc, line) = spawn_until(cmd, &name, "listening on");
            let addr = line.rsplit(' ').next().unwrap().trim().to_owned();
            Worker { name, addr, proc: Some(proc) }
        };
        let prefill = (0..spec.prefill).map(|i| worker("prefill", i)).collect();
        let decode = (0..spec.decode).map(|i| worker("decode", i)).collect();
        let c = Cluster { _dir: dir, master_addr, _master: master, storage, prefill, decode };
        c.wait_storage(spec.storage);
        c
    }

    fn store(&self) -> StoreClient {
        StoreClient::new(ClientConfig { master: self.master_addr.clone(), ..ClientConfig::default() }).unwrap()
    }

    fn wait_storage(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while block_on(async { self.store().stats().await }).unwrap().nodes.len() != n {
            assert!(Instant::now() < deadline, "storage nodes did not register");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_storage(&mut self, i: usize) {
        if let Some(mut p) = self.storage[i].take() {
            p.kill9();
        }
    }

    fn kill_decode(&mut self, i: usize) {
        if let Some(mut p) = self.decode[i].proc.take() {
            p.kill9();
        }
    }

    /// Every node's pages, queues, leases and reservations are back to
    /// their idle values.
    fn assert_back_to_baseline(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut dirty = Vec::new();
            for w in self.prefill.iter().filter(|w| w.proc.is_some()) {
                let s = block_on(async { prefill_client(&w.addr).status(pb::StatusRequest {}).await })
                    .unwrap()
                    .into_inner();
                if s.queued_requests != 0 || s.kv_pages_free != s.kv_pages_total {
                    dirty.push(format!("{}: {s:?}", w.name));
                }
            }
            for w in self.decode.iter().filter(|w| w.proc.is_some()) {
                let s =
                    block_on(async { decode_client(&w.addr).status(pb::StatusRequest {}).await }).unwrap().into_inner();
                if s.batch_size != 0 || s.waiting != 0 || s.kv_pages_free != s.kv_pages_total {
                    dirty.push(format!("{}: {s:?}", w.name));
                }
            }
            let st = block_on(async { self.store().stats().await }).unwrap();
            if st.pending_puts != 0 || st.active_leases != 0 {
                dirty.push(format!("store: {} pending puts, {} leases", st.pending_puts, st.active_leases));
            }
            if dirty.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "not back to baseline: {dirty:#?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn write_config(path: &Path, s: &Spec, master: &str) {
    let d = path.parent().unwrap();
    let mut t = format!(
        "[model]\npath = \"{}\"\nkv_dtype = \"{}\"\nblock_tokens = {}\n\n\
         [kvstore.master]\nlisten = \"{master}\"\nheartbeat_interval_ms = 100\nnode_timeout_ms = 1500\ntick_ms = 20\n\n\
         [kvstore.client.transport]\nprefer = \"{}\"\n",
        s.model, s.kv_dtype, s.block, s.transport
    );
    for i in 0..s.storage {
        t += &format!(
            "\n[[kvstore.storage]]\nname = \"store-{i}\"\nlisten = \"127.0.0.1:0\"\ndata_listen = \"127.0.0.1:0\"\n\
             dram = \"256MiB\"\nsegment_size = \"128MiB\"\nshm_dir = \"{}\"\n",
            d.display()
        );
    }
    for i in 0..s.prefill {
        // No conductor here: the profile would only slow the start.
        t += &format!(
            "\n[[prefill]]\nname = \"prefill-{i}\"\nlisten = \"127.0.0.1:0\"\nkv_memory = \"256MiB\"\nprofile = false\n"
        );
    }
    for i in 0..s.decode {
        t += &format!(
            "\n[[decode]]\nname = \"decode-{i}\"\nlisten = \"127.0.0.1:0\"\nkv_memory = \"{}\"\nmax_batch = {}\nprofile = false\n",
            s.decode_kv, s.max_batch
        );
    }
    std::fs::write(path, t).unwrap();
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy()
}

fn prefill_client(addr: &str) -> PrefillClient<Channel> {
    PrefillClient::new(channel(addr)).max_decoding_message_size(64 << 20)
}

fn decode_client(addr: &str) -> DecodeClient<Channel> {
    DecodeClient::new(channel(addr)).max_encoding_message_size(64 << 20)
}

/// Deterministic prompt tokens in `3..vocab`.
fn prompt(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % (vocab as u64 - 3)) as u32
        })
        .collect()
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt,
        max_tokens,
        sampling: Some(pb::SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }),
        stop_ids: vec![],
        sampler_step: 0,
        tenant: String::new(),
    }
}

#[derive(Debug, Default)]
struct Outcome {
    tokens: Vec<u32>,
    prefilled: Option<pb::PrefillStats>,
    finished: Option<pb::Finished>,
}

/// Runs one request through `prefill` → `decode` and collects its events.
async fn generate(prefill: &str, decode: &str, r: pb::GenerateRequest) -> Result<Outcome, tonic::Status> {
    let req = pb::PrefillRequest { request: Some(r), decode_addr: decode.into(), cached_blocks: 0 };
    let mut stream = prefill_client(prefill).prefill(req).await?.into_inner();
    let mut out = Outcome::default();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Prefilled(p)) => out.prefilled = Some(p),
            Some(Event::Tokens(t)) => out.tokens.extend(t.tokens.iter().map(|t| t.id)),
            Some(Event::Finished(f)) => out.finished = Some(f),
            Some(Event::Handoff(_)) | None => panic!("unexpected event"),
        }
    }
    Ok(out)
}

/// The single-process reference: the same engine `tandem generate` runs,
/// all requests in one batch (batch-invariant).
struct Reference {
    engine: Engine,
}

impl Reference {
    fn new(model: &str, kv_dtype: &str, block: usize) -> Reference {
        let loaded = engine::load(Path::new(model), Precision::Fast).unwrap();
        let options = EngineOptions {
            page_tokens: block,
            kv_dtype: kv_dtype.parse::<KvDType>().unwrap(),
            num_pages: 4096,
            chunk_tokens: 512,
        };
        Reference { engine: Engine::new(loaded.model, options).unwrap() }
    }

    fn vocab(&self) -> u32 {
        self.engine.model().config().vocab_size as u32
    }

    fn generate(&mut self, reqs: &[pb::GenerateRequest]) -> Vec<Vec<u32>> {
        let reqs: Vec<Request> = reqs
            .iter()
            .map(|r| Request {
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens as usize,
                sampling: r.sampling.as_ref().map(tandem_decode::wire::sampling_params).unwrap_or_default(),
                stop_ids: r.stop_ids.clone(),
            })
            .collect();
        let (gens, _) = self.engine.generate(&reqs, |_, _| Flow::Continue).unwrap();
        gens.iter().map(|g| g.ids()).collect()
    }
}

/// Greedy equality over a set of prompt lengths, every (prefill, decode)
/// pair used; a warm shared prefix that skips compute; a multi-turn
/// conversation hitting turn 1's decode-written blocks.
fn check_equivalence_and_cache(c: &Cluster, reference: &mut Reference, block: usize, seed: u64) {
    let vocab = reference.vocab();
    let lens = [1usize, 5, block, block + 3, 2 * block + 7, 100];
    let reqs: Vec<pb::GenerateRequest> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| request(&format!("eq-{i}"), prompt(seed + i as u64, n, vocab), 12))
        .collect();
    // Seeded sampling continues on the decode node exactly as in one process.
    let mut seeded = request("seeded", prompt(seed + 50, block + 5, vocab), 16);
    seeded.sampling = Some(pb::SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, seed: 42, logprobs: None });
    let reqs: Vec<pb::GenerateRequest> = reqs.into_iter().chain([seeded]).collect();
    let want = reference.generate(&reqs);
    for (i, r) in reqs.iter().enumerate() {
        let p = &c.prefill[i % c.prefill.len()];
        let d = &c.decode[(i / c.prefill.len()) % c.decode.len()];
        let got = block_on(generate(&p.addr, &d.addr, r.clone())).unwrap();
        assert_eq!(got.tokens, want[i], "prompt of {} tokens via {} → {}", r.prompt.len(), p.name, d.name);
        assert_eq!(got.finished.as_ref().unwrap().reason, "length");
    }
    assert_ne!(
        want[want.len() - 1],
        reference.generate(&[request("greedy", reqs[reqs.len() - 1].prompt.clone(), 16)])[0]
    );

    // Warm prefix: the second request shares 6 blocks with the first and
    // must read them from the store instead of computing them.
    let base = prompt(seed + 100, 6 * block, vocab);
    let a: Vec<u32> = base.iter().copied().chain(prompt(seed + 101, 20, vocab)).collect();
    let b: Vec<u32> = base.iter().copied().chain(prompt(seed + 102, 33, vocab)).collect();
    let (ra, rb) = (request("warm-a", a, 10), request("warm-b", b.clone(), 10));
    let want = reference.generate(&[ra.clone(), rb.clone()]);
    let (p0, p1) = (&c.prefill[0].addr, &c.prefill[c.prefill.len() - 1].addr);
    let d = &c.decode[c.decode.len() - 1].addr;
    let got_a = block_on(generate(p0, d, ra)).unwrap();
    assert_eq!(got_a.tokens, want[0]);
    let pa = got_a.prefilled.unwrap();
    assert_eq!(pa.cached_blocks, 0, "a cold prompt");
    assert_eq!(pa.stored_blocks as usize, (6 * block + 20) / block, "every full block stored");
    let got_b = block_on(generate(p1, d, rb)).unwrap();
    assert_eq!(got_b.tokens, want[1], "warm prefix output");
    let pb_ = got_b.prefilled.unwrap();
    assert_eq!(pb_.cached_blocks, 6, "the shared prefix hits the store");
    assert_eq!(pb_.computed_tokens as usize, b.len() - 6 * block, "only the new tokens are computed");

    // Multi-turn: turn 2 = turn 1's prompt + answer + a new message. The
    // answer's blocks were written back by the decode node.
    let p1_len = 3 * block + 2;
    let turn1 = request("turn-1", prompt(seed + 200, p1_len, vocab), (2 * block) as u32 + 5);
    let out1 = block_on(generate(p0, d, turn1.clone())).unwrap();
    assert_eq!(out1.tokens, reference.generate(std::slice::from_ref(&turn1))[0]);
    let kv_tokens = p1_len + out1.tokens.len() - 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut turn2_prompt = turn1.prompt.clone();
    turn2_prompt.extend(&out1.tokens);
    turn2_prompt.extend(prompt(seed + 201, 9, vocab));
    let turn2 = request("turn-2", turn2_prompt, 8);
    // Write-backs are asynchronous: retry until the store has them.
    loop {
        let got = block_on(generate(p1, d, turn2.clone())).unwrap();
        let cached = got.prefilled.as_ref().unwrap().cached_blocks as usize;
        if cached == kv_tokens / block || Instant::now() > deadline {
            assert_eq!(cached, kv_tokens / block, "turn 2 reuses turn 1's prompt and answer blocks");
            assert!(cached > p1_len / block, "blocks written during decode are hit");
            assert_eq!(got.tokens, reference.generate(std::slice::from_ref(&turn2))[0]);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 32 concurrent requests of mixed lengths, spread over every node pair.
fn check_concurrent(c: &Cluster, reference: &mut Reference, seed: u64) {
    let vocab = reference.vocab();
    let reqs: Vec<pb::GenerateRequest> = (0..32)
        .map(|i| {
            request(
                &format!("c-{i}"),
                prompt(seed + 300 + i, 1 + (i as usize * 37) % 180, vocab),
                4 + (i as u32 * 7) % 24,
            )
        })
        .collect();
    let want = reference.generate(&reqs);
    let got = concurrently(c, &reqs, |i| (i % c.prefill.len(), (i / 2) % c.decode.len()));
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.tokens, want[i], "concurrent request {i}");
    }
}

/// Runs every request at once, request `i` on the node pair `route(i)`.
fn concurrently(c: &Cluster, reqs: &[pb::GenerateRequest], route: impl Fn(usize) -> (usize, usize)) -> Vec<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let tasks: Vec<_> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (p, d) = route(i);
                let (p, d, r) = (c.prefill[p].addr.clone(), c.decode[d].addr.clone(), r.clone());
                tokio::spawn(async move { generate(&p, &d, r).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap());
        }
        out
    })
}

/// A caller that goes away mid-stream cancels its sequence.
fn check_cancellation(c: &Cluster, vocab: u32) {
    block_on(async {
        let req = pb::PrefillRequest {
            request: Some(request("cancel", prompt(7, 40, vocab), 1500)),
            decode_addr: c.decode[0].addr.clone(),
            cached_blocks: 0,
        };
        let mut stream = prefill_client(&c.prefill[0].addr).prefill(req).await.unwrap().into_inner();
        let mut tokens = 0;
        while tokens < 3 {
            if let Some(Event::Tokens(t)) = stream.message().await.unwrap().unwrap().event {
                tokens += t.tokens.len();
            }
        }
    });
}

#[test]
fn tiny_f32_blocks_of_16_over_shm_with_two_prefill_and_two_decode_nodes() {
    let spec = Spec { prefill: 2, decode: 2, ..Spec::new(tiny_model(), "f32", 16, "shm") };
    let c = Cluster::start(&spec);
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    check_equivalence_and_cache(&c, &mut reference, 16, 1_000);
    check_concurrent(&c, &mut reference, 1_000);
    check_cancellation(&c, reference.vocab());
    c.assert_back_to_baseline();
}

#[test]
fn tiny_bf16_blocks_of_64_over_tcp_with_one_node_each_and_preemption() {
    // 8 pages of 64 tokens on the decode node: 8 sequences that each grow
    // to 4 pages cannot all fit, so it must preempt and resume them.
    let spec = Spec { decode_kv: "512KiB", max_batch: 32, ..Spec::new(tiny_model(), "bf16", 64, "tcp") };
    let c = Cluster::start(&spec);
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    check_equivalence_and_cache(&c, &mut reference, 64, 2_000);
    check_concurrent(&c, &mut reference, 2_000);
    let reqs: Vec<pb::GenerateRequest> =
        (0..8).map(|i| request(&format!("grow-{i}"), prompt(2_500 + i, 60, 4096), 140)).collect();
    let want = reference.generate(&reqs);
    let got = concurrently(&c, &reqs, |_| (0, 0));
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.tokens, want[i], "sequence {i} through preemption");
    }
    let preempted: u32 = got.iter().map(|g| g.finished.as_ref().unwrap().decode.as_ref().unwrap().preemptions).sum();
    let s =
        block_on(async { decode_client(&c.decode[0].addr).status(pb::StatusRequest {}).await }).unwrap().into_inner();
    assert!(preempted > 0 && s.preemptions > 0, "the small pool forced preemptions: {s:?}");
    check_cancellation(&c, reference.vocab());
    c.assert_back_to_baseline();
}

#[test]
fn smollm2_f32_blocks_of_16_over_tcp() {
    let spec = Spec::new(smollm2(), "f32", 16, "tcp");
    let c = Cluster::start(&spec);
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    check_equivalence_and_cache(&c, &mut reference, 16, 3_000);
    c.assert_back_to_baseline();
}

#[test]
fn smollm2_bf16_blocks_of_64_over_shm_with_two_prefill_and_two_decode_nodes() {
    let spec = Spec { prefill: 2, decode: 2, ..Spec::new(smollm2(), "bf16", 64, "shm") };
    let c = Cluster::start(&spec);
    // The reference here is the `tandem generate` command itself.
    let vocab = 49152;
    let r = request("cli", prompt(4_000, 70, vocab), 10);
    let ids: Vec<String> = r.prompt.iter().map(u32::to_string).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["generate", "--model", &spec.model, "--kv-dtype", "bf16", "--page-tokens", "64", "--max-tokens", "10"])
        .args(["--ignore-eos", "--json", "--prompt-ids", &ids.join(",")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Vec<u32> = doc["generated_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    for (p, d) in [(0, 1), (1, 0)] {
        let got = block_on(generate(&c.prefill[p].addr, &c.decode[d].addr, r.clone())).unwrap();
        assert_eq!(got.tokens, want, "prefill-{p} → decode-{d} vs tandem generate");
    }
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    check_equivalence_and_cache(&c, &mut reference, 64, 4_100);
    c.assert_back_to_baseline();
}

#[test]
fn malformed_requests_and_handoffs_are_refused_and_the_nodes_keep_serving() {
    let spec = Spec::new(tiny_model(), "f32", 16, "tcp");
    let c = Cluster::start(&spec);
    let (p, d) = (&c.prefill[0].addr, &c.decode[0].addr);
    let code = |r: Result<Outcome, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        block_on(generate(p, d, request("empty", vec![], 4))).map(|_| ()).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(code(block_on(generate(p, d, request("vocab", vec![5, 4096], 4)))), tonic::Code::InvalidArgument);
    assert_eq!(code(block_on(generate(p, d, request("ctx", vec![5; 2048], 4)))), tonic::Code::InvalidArgument);
    assert_eq!(code(block_on(generate(p, d, request("zero", vec![5], 0)))), tonic::Code::InvalidArgument);
    let mut nan = request("nan", vec![5], 4);
    nan.sampling.as_mut().unwrap().temperature = f32::NAN;
    assert_eq!(code(block_on(generate(p, d, nan))), tonic::Code::InvalidArgument);
    // An unreachable decode node is a clear `unavailable`, not a hang.
    let err = block_on(generate(p, "127.0.0.1:1", request("nowhere", vec![5, 6, 7], 4))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");

    // A real handoff, then corrupted copies of it sent straight to decode.
    let handoff = block_on(async {
        let req = pb::PrefillRequest {
            request: Some(request("h", prompt(9, 40, 4096), 6)),
            decode_addr: String::new(),
            cached_blocks: 0,
        };
        let mut s = prefill_client(p).prefill(req).await.unwrap().into_inner();
        match s.message().await.unwrap().unwrap().event {
            Some(Event::Handoff(h)) => h,
            other => panic!("expected a handoff, got {other:?}"),
        }
    });
    let send = |h: pb::Handoff| block_on(async { decode_client(d).decode(h).await.map(|_| ()) });
    let mut bad = handoff.clone();
    bad.block_keys[1] ^= 1;
    assert_eq!(send(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "keys that do not match the prompt");
    let mut bad = handoff.clone();
    bad.partial_block.truncate(100);
    assert_eq!(send(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "a short partial block");
    let mut bad = handoff.clone();
    bad.model_fingerprint = "another-model".into();
    assert_eq!(send(bad).unwrap_err().code(), tonic::Code::FailedPrecondition, "another model's KV");
    let mut bad = handoff.clone();
    bad.partial_tokens = 3;
    assert_eq!(send(bad).unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut bad = handoff.clone();
    bad.first_token.as_mut().unwrap().id = 99_999;
    assert_eq!(send(bad).unwrap_err().code(), tonic::Code::InvalidArgument);

    // Still serving, and the two-step path (handoff returned, then sent to
    // decode by the caller) gives the reference output.
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    let want = reference.generate(std::slice::from_ref(handoff.request.as_ref().unwrap()));
    let tokens = block_on(async {
        let mut s = decode_client(d).decode(handoff).await.unwrap().into_inner();
        let mut t = Vec::new();
        while let Some(ev) = s.message().await.unwrap() {
            if let Some(Event::Tokens(x)) = ev.event {
                t.extend(x.tokens.iter().map(|t| t.id));
            }
        }
        t
    });
    assert_eq!(tokens, want[0]);
    c.assert_back_to_baseline();
}

#[test]
fn a_decode_node_killed_mid_stream_is_a_prompt_error() {
    let spec = Spec::new(tiny_model(), "f32", 16, "shm");
    let mut c = Cluster::start(&spec);
    let (p, d) = (c.prefill[0].addr.clone(), c.decode[0].addr.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let req = pb::PrefillRequest {
        request: Some(request("kill", prompt(11, 30, 4096), 2000)),
        decode_addr: d,
        cached_blocks: 0,
    };
    let mut stream = rt.block_on(async { prefill_client(&p).prefill(req).await.unwrap().into_inner() });
    let mut tokens = 0;
    while tokens < 5 {
        if let Some(Event::Tokens(t)) = rt.block_on(stream.message()).unwrap().unwrap().event {
            tokens += t.tokens.len();
        }
    }
    c.kill_decode(0);
    let killed = Instant::now();
    let err = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended as if complete"),
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("an error within 10 s, not a hang")
    });
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("decode node"), "{err}");
    eprintln!("error {:?} after the kill: {err}", killed.elapsed());
    // The prefill node is unharmed.
    let s = rt.block_on(async { prefill_client(&p).status(pb::StatusRequest {}).await }).unwrap().into_inner();
    assert_eq!((s.queued_requests, s.kv_pages_free), (0, s.kv_pages_total));
}

#[test]
fn a_storage_node_killed_between_prefill_and_decode_means_recompute_not_wrong_output() {
    let spec = Spec::new(tiny_model(), "f32", 16, "tcp");
    let mut c = Cluster::start(&spec);
    let (p, d) = (c.prefill[0].addr.clone(), c.decode[0].addr.clone());
    let r = request("lost", prompt(13, 150, 4096), 12);
    let handoff = block_on(async {
        let req = pb::PrefillRequest { request: Some(r.clone()), decode_addr: String::new(), cached_blocks: 0 };
        let mut s = prefill_client(&p).prefill(req).await.unwrap().into_inner();
        match s.message().await.unwrap().unwrap().event {
            Some(Event::Handoff(h)) => h,
            other => panic!("expected a handoff, got {other:?}"),
        }
    });
    assert_eq!(handoff.prefill.as_ref().unwrap().stored_blocks, 9);
    c.kill_storage(0);
    let (tokens, finished) = block_on(async {
        let mut s = decode_client(&d).decode(handoff).await.unwrap().into_inner();
        let (mut t, mut f) = (Vec::new(), None);
        while let Some(ev) = s.message().await.unwrap() {
            match ev.event {
                Some(Event::Tokens(x)) => t.extend(x.tokens.iter().map(|t| t.id)),
                Some(Event::Finished(x)) => f = Some(x),
                _ => {}
            }
        }
        (t, f.unwrap())
    });
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    assert_eq!(tokens, reference.generate(&[r])[0], "recomputed output equals the reference");
    let stats = finished.decode.unwrap();
    assert_eq!(stats.fetched_blocks, 0, "the store lost every block");
    assert_eq!(stats.recomputed_tokens, 150, "the lost blocks (and the partial one after them) were recomputed");
}

#[test]
fn a_decode_node_told_to_stop_finishes_its_streams_first() {
    let spec = Spec::new(tiny_model(), "f32", 16, "shm");
    let mut c = Cluster::start(&spec);
    let (p, d) = (c.prefill[0].addr.clone(), c.decode[0].addr.clone());
    let r = request("drain", prompt(17, 30, 4096), 1500);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let req = pb::PrefillRequest { request: Some(r.clone()), decode_addr: d, cached_blocks: 0 };
    let mut stream = rt.block_on(async { prefill_client(&p).prefill(req).await.unwrap().into_inner() });
    let mut tokens = Vec::new();
    let mut finished = None;
    let mut signalled = false;
    while let Some(ev) = rt.block_on(stream.message()).expect("the stream completes despite SIGTERM") {
        match ev.event {
            Some(Event::Tokens(t)) => tokens.extend(t.tokens.iter().map(|t| t.id)),
            Some(Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
        if tokens.len() >= 3 && !signalled {
            let pid = c.decode[0].proc.as_ref().unwrap().child.id();
            let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
            assert!(status.success());
            signalled = true;
        }
    }
    assert!(signalled);
    let mut reference = Reference::new(&spec.model, spec.kv_dtype, spec.block);
    assert_eq!(tokens, reference.generate(&[r])[0], "the in-flight request ran to the end");
    assert_eq!(finished.unwrap().reason, "length");
    // Then the node exits on its own.
    let child = &mut c.decode[0].proc.as_mut().unwrap().child;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the drained decode node did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_config_lists_the_example_cluster_and_names_mistakes() {
    let run = |path: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["check-config", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let etc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../etc");
    let out = run(&etc.join("cluster.toml"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("valid"), "{text}");
    assert!(text.contains("prefill-0") && text.contains("decode-0") && text.contains("store-b"), "{text}");
    assert!(text.contains("conductor conductor on http://127.0.0.1:8000"), "{text}");
    // Every example in etc/ is valid.
    for e in std::fs::read_dir(&etc).unwrap().flatten() {
        let out = run(&e.path());
        assert!(out.status.success(), "{}: {}", e.path().display(), String::from_utf8_lossy(&out.stderr));
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    for (body, named) in [
        ("[[decode]]\nname = \"d\"\nmax_batchh = 3\n", "max_batchh"),
        ("[[decode]]\nname = \"d\"\nprefetch_duty = 0\n", "prefetch_duty"),
        ("[model]\nblock_tokens = 0\n", "block_tokens"),
        ("[[prefill]]\nname = \"x\"\n[[decode]]\nname = \"x\"\n", "used twice"),
    ] {
        std::fs::write(&bad, body).unwrap();
        let out = run(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(named), "{body:?}: {err}");
    }
}
