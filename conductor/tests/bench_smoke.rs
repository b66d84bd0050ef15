//! The serving bench harness, end to end on a small real-compute workload:
//! `tandem bench run` starts a loopback cluster, sends a multi-turn
//! workload through the API, and writes a result whose numbers are sane,
//! a Markdown report and plots; `tandem bench compare` reads two results.

use std::process::Command;
use tandem_bench::harness::schema::BenchResult;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

#[test]
fn a_small_multi_turn_run_accounts_for_every_request_and_its_numbers_are_sane() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("smoke.json");
    let out = tandem()
        .args(["bench", "run", "--requests", "6", "--concurrency", "2", "--turns", "3", "--input", "48-64"])
        .args(["--output", "6", "--prefix-groups", "1", "--prefix-tokens", "64", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench run failed: {stderr}");
    let r = BenchResult::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r.runs.len(), 1);
    let run = &r.runs[0];
    let n = &run.requests;
    assert_eq!(n.sent, 6, "every request of the workload is accounted for");
    assert_eq!(n.completed + n.rejected + n.failed, n.sent);
    assert_eq!(n.completed, 6, "nothing should fail or be refused at this load: {stderr}");
    for d in [&run.ttft_ms, &run.tbt_ms, &run.tpot_ms, &run.e2e_ms] {
        assert!(d.n > 0 && d.p50 > 0.0, "{d:?}");
        assert!(d.p50 <= d.p90 && d.p90 <= d.p99 && d.p99 <= d.max, "percentiles out of order: {d:?}");
    }
    assert!(run.ttft_ms.p50 <= run.e2e_ms.p50);
    assert_eq!(run.tbt_ms.n, 6 * 5, "five gaps between six tokens per request");
    let c = &run.cache;
    assert!((0.0..=1.0).contains(&c.hit_ratio_tokens) && (0.0..=1.0).contains(&c.hit_ratio_blocks));
    // Turns 2 and 3 extend turn 1, and all share a system prompt: the
    // store must have served part of their prompts.
    assert!(c.cached_tokens > 0 && c.cached_blocks > 0, "{c:?}");
    assert!(run.goodput_rps > 0.0 && run.goodput_rps <= run.throughput.requests_per_s + 1e-9);
    assert!((0.0..=1.0).contains(&run.slo_attainment));
    assert!(run.kv_bytes.get("shm/put").is_some_and(|&b| b > 0), "{:?}", run.kv_bytes);
    assert!(run.nodes.iter().any(|x| x.role == "prefill" && x.busy > 0.0), "{:?}", run.nodes);
    assert_eq!(run.ttft_samples_ms.len() as u64, n.completed);
    assert!(run.ttft_samples_ms.windows(2).all(|w| w[0] <= w[1]));
    // The report and its plots lie next to the JSON.
    let md = std::fs::read_to_string(dir.path().join("smoke.md")).unwrap();
    assert!(md.contains("kv-centric"), "{md}");
    let svg = std::fs::read_to_string(dir.path().join("smoke-ttft-cdf.svg")).unwrap();
    assert!(svg.contains("<svg"));

    // compare: a result against itself has no deltas; bad files are named.
    let cmp = tandem().args(["bench", "compare"]).arg(&json).arg(&json).output().unwrap();
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stderr));
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("kv-centric"));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"schema_version": 99}"#).unwrap();
    let cmp = tandem().args(["bench", "compare"]).arg(&json).arg(&bad).output().unwrap();
    assert!(!cmp.status.success());
    assert!(String::from_utf8_lossy(&cmp.stderr).contains("schema version 99"));
}

/// The modeled trace replay, one request at a time, through a store small
/// enough to evict: the block hit ratio the cluster measured must equal an
/// offline replay of the same block sequence through the same eviction
/// policy at the same capacity.
#[test]
fn a_sequential_modeled_replay_hits_exactly_what_the_offline_replay_of_its_policy_gives() {
    use tandem_bench::harness::cluster::{Compute, Setup};
    use tandem_bench::harness::{load, offline};

    let trace = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/traces/synthetic_trace.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("replay.json");
    // 64 tokens per trace block (lengths / 8) in blocks of 64: 32 KiB per
    // modeled Llama-3-8B block (512 B per token after kv_scale 256), so
    // 8 MiB holds 256 blocks. Seven of the first 125 requests reuse an
    // earlier prompt's prefix (the trace's documents asked about again).
    let (requests, store) = (125, "8MiB");
    let out = tandem()
        .args(["bench", "replay", "--trace", trace, "--compute", "modeled", "--concurrency", "1"])
        .args(["--max-requests", &requests.to_string(), "--tokens-per-block", "64", "--block-tokens", "64"])
        .args(["--output-scale", "0.05", "--store-dram", store, "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench replay failed: {stderr}");
    let r = BenchResult::parse(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let run = &r.runs[0];
    let n = &run.requests;
    assert_eq!((n.sent, n.completed), (requests, requests), "every request answered: {stderr}");
    for d in [&run.ttft_ms, &run.tbt_ms, &run.e2e_ms] {
        assert!(d.p50 <= d.p90 && d.p90 <= d.p99 && d.p99 <= d.max, "percentiles out of order: {d:?}");
    }
    let c = &run.cache;
    let offline = c.offline_hit_ratio_blocks.expect("a modeled disaggregated run has the offline figure");
    assert!(c.cached_blocks > 0, "the trace's shared prefixes must hit: {c:?}");
    assert!(
        (c.hit_ratio_blocks - offline).abs() < 1e-12,
        "measured block hit ratio {} ({} of {} blocks) != offline replay {offline}",
        c.hit_ratio_blocks,
        c.cached_blocks,
        c.prompt_blocks
    );

    // The store was small enough to matter: unbounded, the same prompts
    // would hit more.
    let setup = Setup {
        tandem: env!("CARGO_BIN_EXE_tandem").into(),
        model: "smollm2".into(),
        compute: Compute::Modeled { profile: "h100-llama3-8b".into(), kv_scale: 256 },
        block_tokens: 64,
        kv_dtype: "bf16".into(),
        store_dram: "64GiB".into(),
        eviction: None,
        transport: "shm".into(),
        kv_memory: "512MiB".into(),
        prefix_reads: true,
        chunk_tokens: None,
        write_back: false,
        slo_ttft_ms: 1e4,
        slo_tbt_ms: 1e3,
        keep: None,
    };
    let opts = tandem_kvstore::trace::TraceOptions::default();
    let mut lines = tandem_kvstore::trace::load_trace(trace, &opts).unwrap();
    lines.truncate(requests as usize);
    let synth = tandem_bench::workload::Synth {
        trace_block_tokens: 512,
        block_tokens: 64,
        output_scale: 0.05,
        time_scale: 1.0,
        vocab_lo: 256,
        vocab_hi: 32_000,
    };
    let unbounded = offline::hit_ratio_blocks(&setup, &load::from_trace(&lines, &synth)).unwrap().unwrap();
    assert!(unbounded > offline + 0.01, "eviction must have cost hits: unbounded {unbounded}, {store} {offline}");
}
