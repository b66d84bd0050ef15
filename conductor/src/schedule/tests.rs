//! Policy tests on hand-built cluster views.

use super::*;

/// 0.5 ms per uncached token plus a small attention term; reading the
/// store at 1 MB/ms.
fn prefill_node(name: &str, queued_ms: f64) -> PrefillView {
    let points: Vec<(u32, u32, f64)> = [(16, 0), (256, 0), (1024, 0), (2048, 0), (256, 2048), (1024, 4096)]
        .iter()
        .map(|&(u, c)| (u, c, 2.0 + 0.5 * u as f64 + 1e-5 * (u as f64) * (c as f64)))
        .collect();
    PrefillView {
        name: name.into(),
        accepting: true,
        queued_ms,
        cost: PrefillCost::fit(&points).unwrap(),
        read_bytes_per_ms: 1e6,
    }
}

/// 2 ms + 0.5 ms per sequence + 1 µs per context token.
fn decode_node(name: &str, seqs: Vec<SeqLoad>) -> DecodeView {
    let points: Vec<(u32, u64, f64)> = [(1, 100), (4, 4000), (16, 20000), (32, 60000), (8, 1000)]
        .iter()
        .map(|&(b, c)| (b, c, 2.0 + 0.5 * b as f64 + 0.001 * c as f64))
        .collect();
    DecodeView {
        name: name.into(),
        accepting: true,
        max_batch: 64,
        kv_capacity_tokens: 100_000,
        cost: DecodeCost::fit(&points).unwrap(),
        seqs,
    }
}

fn request(prompt: u32, cached: Vec<u32>) -> RequestInfo {
    RequestInfo {
        prompt_tokens: prompt,
        max_tokens: 64,
        block_tokens: 16,
        block_bytes: 64 << 10,
        cached_blocks: cached,
    }
}

fn running(n: usize, context: u32, remaining: u32) -> Vec<SeqLoad> {
    vec![SeqLoad { context, remaining, joins_at_ms: 0 }; n]
}

const SLO: Slo = Slo { ttft_ms: 2000.0, tbt_ms: 50.0 };

fn placed(v: Verdict) -> Placement {
    match v {
        Verdict::Accept(p) => p,
        Verdict::Reject { reason, .. } => panic!("rejected: {reason}"),
    }
}

#[test]
fn a_long_cached_prefix_draws_the_request_unless_the_queue_makes_ttft_worse() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    let decode = [decode_node("d0", vec![])];
    // A holds 60 of the prompt's 64 blocks; B holds none.
    let req = request(1024, vec![60, 0]);
    let p = placed(s.schedule(0, &req, &[prefill_node("A", 0.0), prefill_node("B", 0.0)], &decode));
    assert_eq!(p.prefill, 0, "the cache saves ~480 ms of compute on A");
    assert!(p.predicted_ttft_ms < 100.0, "{}", p.predicted_ttft_ms);
    // A queue longer than the saving sends it to B after all.
    let p = placed(s.schedule(0, &req, &[prefill_node("A", 700.0), prefill_node("B", 0.0)], &decode));
    assert_eq!(p.prefill, 1);
    // Cache affinity ignores the queue; least-loaded ignores the cache.
    let views = [prefill_node("A", 700.0), prefill_node("B", 0.0)];
    let mut affinity = Scheduler::new(PolicyKind::CacheAffinity, SLO, 1);
    assert_eq!(placed(affinity.schedule(0, &req, &views, &decode)).prefill, 0);
    let mut least = Scheduler::new(PolicyKind::LeastLoaded, SLO, 1);
    assert_eq!(placed(least.schedule(0, &req, &views, &decode)).prefill, 1);
}

#[test]
fn the_decode_node_with_the_lowest_predicted_step_and_room_wins() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    let prefill = [prefill_node("p", 0.0)];
    let busy = decode_node("busy", running(30, 1000, 1000));
    let light = decode_node("light", running(2, 1000, 1000));
    let p = placed(s.schedule(0, &request(100, vec![0]), &prefill, &[busy.clone(), light.clone()]));
    assert_eq!(p.decode, 1);
    // No KV room on the light node: the busy one, still within the SLO.
    let full = DecodeView { kv_capacity_tokens: 2050, ..light.clone() };
    let p = placed(s.schedule(0, &request(100, vec![0]), &prefill, &[busy.clone(), full]));
    assert_eq!(p.decode, 0);
    assert!(p.predicted_tbt_ms <= SLO.tbt_ms);
    // Draining nodes get nothing.
    let draining = DecodeView { accepting: false, ..light };
    assert_eq!(placed(s.schedule(0, &request(100, vec![0]), &prefill, &[busy, draining])).decode, 0);
}

#[test]
fn decode_load_is_judged_when_the_prefill_ends_not_now() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    // A long prompt: its prefill ends ~1 s from now.
    let req = request(2000, vec![0]);
    let prefill = [prefill_node("p", 0.0)];
    // "now-light" is idle but 40 sequences are assigned to join it in
    // 500 ms; "now-heavy" runs 40 sequences that finish within 100 ms.
    let joining = vec![SeqLoad { context: 3000, remaining: 500, joins_at_ms: 500 }; 40];
    let now_light = decode_node("now-light", joining);
    let now_heavy = decode_node("now-heavy", running(40, 3000, 2));
    let p = placed(s.schedule(0, &req, &prefill, &[now_light, now_heavy]));
    assert_eq!(p.decode, 1, "the node that will be free when the prefill ends");
    assert!(p.predicted_ttft_ms > 900.0);
}

#[test]
fn requests_that_would_miss_an_slo_are_rejected_at_arrival() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    let decode = [decode_node("d", vec![])];
    let req = request(1024, vec![0]);
    match s.schedule(0, &req, &[prefill_node("p", 1900.0)], &decode) {
        Verdict::Reject { reason, retry_after_ms } => {
            assert!(reason.contains("TTFT"), "{reason}");
            assert!((400..=500).contains(&retry_after_ms), "{retry_after_ms}");
        }
        other => panic!("{other:?}"),
    }
    // A decode node whose step would exceed the TBT SLO.
    let crowded = decode_node("d", running(60, 1000, 10_000));
    match s.schedule(0, &request(64, vec![0]), &[prefill_node("p", 0.0)], std::slice::from_ref(&crowded)) {
        Verdict::Reject { reason, .. } => assert!(reason.contains("TBT"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // The baselines never reject for SLOs (that is what they are compared on).
    let mut rr = Scheduler::new(PolicyKind::RoundRobin, SLO, 1);
    assert!(matches!(rr.schedule(0, &req, &[prefill_node("p", 1900.0)], &[crowded]), Verdict::Accept(_)));
    // Nothing accepting: a clear rejection.
    let down = PrefillView { accepting: false, ..prefill_node("p", 0.0) };
    assert!(matches!(s.schedule(0, &req, &[down], &decode), Verdict::Reject { .. }));
}

#[test]
fn simple_policies_spread_work_deterministically() {
    let prefill: Vec<PrefillView> = (0..3).map(|i| prefill_node(&format!("p{i}"), 0.0)).collect();
    let decode: Vec<DecodeView> = (0..2).map(|i| decode_node(&format!("d{i}"), vec![])).collect();
    let req = request(64, vec![0, 0, 0]);
    let mut rr = Scheduler::new(PolicyKind::RoundRobin, SLO, 1);
    let picks: Vec<(usize, usize)> = (0..6)
        .map(|_| {
            let p = placed(rr.schedule(0, &req, &prefill, &decode));
            (p.prefill, p.decode)
        })
        .collect();
    assert_eq!(picks, [(0, 0), (1, 1), (2, 0), (0, 1), (1, 0), (2, 1)]);
    let run = |seed| {
        let mut r = Scheduler::new(PolicyKind::Random, SLO, seed);
        (0..20).map(|_| placed(r.schedule(0, &req, &prefill, &decode)).prefill).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7), "a seed replays");
    let picks = run(7);
    assert!((0..3).all(|i| picks.contains(&i)), "random uses every node: {picks:?}");
}

#[test]
fn colocated_placement_and_retries_skip_the_slo_checks() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    // Colocated: the emptier node, and nothing rejected for SLOs even when
    // every node is crowded.
    let decode = [decode_node("busy", running(30, 2000, 100)), decode_node("idle", vec![])];
    let p = placed(s.schedule_colocated(0, &request(64, vec![]), &decode));
    assert_eq!((p.prefill, p.decode), (1, 1), "the worker prefills and decodes it");
    let crowded = [decode_node("d", running(60, 1000, 10_000))];
    assert!(matches!(s.schedule_colocated(0, &request(64, vec![]), &crowded), Verdict::Accept(_)));
    // Full: refused.
    let full = [DecodeView { max_batch: 60, ..decode_node("d", running(60, 100, 10_000)) }];
    assert!(matches!(s.schedule_colocated(0, &request(64, vec![]), &full), Verdict::Reject { .. }));
    // A retry (`place`) of an accepted request is never refused for an SLO.
    let req = request(1024, vec![0]);
    assert!(matches!(s.schedule(0, &req, &[prefill_node("p", 1900.0)], &crowded), Verdict::Reject { .. }));
    assert!(matches!(s.place(0, &req, &[prefill_node("p", 1900.0)], &crowded), Verdict::Accept(_)));
}

#[test]
fn headroom_keeps_a_share_of_the_slo_for_prediction_error() {
    let mut s = Scheduler::new(PolicyKind::KvCentric, SLO, 1);
    let decode = [decode_node("d", vec![])];
    // ~1880 ms predicted: within the 2000 ms SLO, not within 90% of it.
    let req = request(256, vec![0]);
    let p = [prefill_node("p", 1750.0)];
    assert!(matches!(s.schedule(0, &req, &p, &decode), Verdict::Accept(_)));
    s.headroom = 0.1;
    assert!(matches!(s.schedule(0, &req, &p, &decode), Verdict::Reject { .. }));
    assert!(matches!(s.place(0, &req, &p, &decode), Verdict::Accept(_)), "retries ignore it");
}
