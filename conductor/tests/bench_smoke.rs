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
