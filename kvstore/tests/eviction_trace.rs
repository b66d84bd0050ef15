//! Eviction policies replayed over the Mooncake synthetic trace
//! (`fixtures/traces/synthetic_trace.jsonl`), checked against the numbers
//! its README publishes. Run with `--nocapture` for the table of every policy
//! at every capacity.

use std::path::PathBuf;
use std::sync::OnceLock;

use tandem_kvstore::policy::PolicyKind;
use tandem_kvstore::sim::{ideal, optimal, simulate, PrefixHits, SimConfig, SimResult};
use tandem_kvstore::trace::{load_trace, summarize, TraceOptions, TraceRequest};

/// DRAM capacities (blocks) the README publishes numbers for.
const CAPACITIES: [usize; 3] = [1_000, 10_000, 30_000];
/// SSD tier size as a multiple of DRAM.
const SSD_FACTOR: usize = 4;
/// Published ratios are given to three decimals.
const TOLERANCE: f64 = 0.001;

fn trace() -> &'static [TraceRequest] {
    static TRACE: OnceLock<Vec<TraceRequest>> = OnceLock::new();
    TRACE.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/traces/synthetic_trace.jsonl");
        load_trace(&path, &TraceOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// Every replay the tests look at, computed once.
struct Results {
    ideal: PrefixHits,
    /// Belady at each of [`CAPACITIES`].
    optimal: Vec<PrefixHits>,
    /// (policy, DRAM-only at each capacity, DRAM + SSD at each capacity).
    policies: Vec<(PolicyKind, Vec<SimResult>, Vec<SimResult>)>,
}

impl Results {
    fn dram(&self, kind: PolicyKind) -> &[SimResult] {
        self.policies.iter().find(|p| p.0 == kind).map(|p| p.1.as_slice()).unwrap_or_default()
    }

    fn tiered(&self, kind: PolicyKind) -> &[SimResult] {
        self.policies.iter().find(|p| p.0 == kind).map(|p| p.2.as_slice()).unwrap_or_default()
    }
}

fn results() -> &'static Results {
    static RESULTS: OnceLock<Results> = OnceLock::new();
    RESULTS.get_or_init(|| {
        let trace = trace();
        let policies = PolicyKind::ALL
            .iter()
            .map(|&kind| {
                let dram = CAPACITIES.iter().map(|&n| simulate(trace, &SimConfig::dram(n, kind))).collect();
                let tiered =
                    CAPACITIES.iter().map(|&n| simulate(trace, &SimConfig::tiered(n, SSD_FACTOR * n, kind))).collect();
                (kind, dram, tiered)
            })
            .collect();
        Results { ideal: ideal(trace), optimal: CAPACITIES.iter().map(|&n| optimal(trace, n)).collect(), policies }
    })
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() <= TOLERANCE, "{what}: {got:.4}, published {want:.3}");
}

#[test]
fn trace_matches_its_readme() {
    let s = summarize(trace());
    assert_eq!(s.requests, 3_993);
    assert_eq!(s.block_refs, 121_877);
    assert_eq!(s.unique_blocks, 43_924);
    // Means: 15,325.5 and 149.1 tokens (the README rounds the first to 15,326, the paper to 15,325).
    let mean = |tokens: u64| tokens as f64 / s.requests as f64;
    assert!((mean(s.input_tokens) - 15_326.0).abs() < 1.0, "mean input {}", mean(s.input_tokens));
    assert!((mean(s.output_tokens) - 149.0).abs() < 0.5, "mean output {}", mean(s.output_tokens));
    assert!((1_021_000..1_023_000).contains(&s.duration_ms), "duration {} ms", s.duration_ms);
    let ideal = &results().ideal;
    assert_eq!((ideal.refs, ideal.unique_blocks), (121_877, 43_924));
    assert_close(ideal.hit_ratio, 0.640, "ideal hit ratio");
}

#[test]
fn lru_reproduces_published_ratios() {
    for (r, want) in results().dram(PolicyKind::Lru).iter().zip([0.083, 0.424, 0.624]) {
        assert_eq!(r.refs, 121_877);
        assert_close(r.hit_ratio, want, &format!("lru at {} blocks", r.config.dram_blocks));
    }
    let at_50k = simulate(trace(), &SimConfig::dram(50_000, PolicyKind::Lru));
    assert_close(at_50k.hit_ratio, 0.640, "lru at 50000 blocks");
}

#[test]
fn optimal_reproduces_published_ceiling() {
    for (r, want) in results().optimal.iter().zip([0.277, 0.618, 0.640]) {
        assert_close(r.hit_ratio, want, &format!("belady at {:?} blocks", r.capacity_blocks));
    }
}

#[test]
fn default_policy_beats_lru() {
    let results = results();
    let (lru, default) = (results.dram(PolicyKind::Lru), results.dram(PolicyKind::DEFAULT));
    assert_eq!(default.len(), CAPACITIES.len());
    for ((l, d), best) in lru.iter().zip(default).zip(&results.optimal) {
        let n = l.config.dram_blocks;
        assert!(d.hit_ratio <= best.hit_ratio + 1e-9, "{} beats Belady at {n}", PolicyKind::DEFAULT);
        if n < 30_000 {
            assert!(
                d.hit_ratio > l.hit_ratio,
                "{} {:.4} <= lru {:.4} at {n}",
                PolicyKind::DEFAULT,
                d.hit_ratio,
                l.hit_ratio
            );
        } else {
            // LRU is already near the ceiling here.
            assert!(d.hit_ratio >= l.hit_ratio - TOLERANCE, "{} far below lru at {n}", PolicyKind::DEFAULT);
        }
    }
}

#[test]
fn ssd_tier_adds_hits() {
    let results = results();
    for &kind in PolicyKind::ALL {
        for (dram, tiered) in results.dram(kind).iter().zip(results.tiered(kind)) {
            let n = dram.config.dram_blocks;
            assert!(tiered.ssd_hits > 0, "{kind} at {n}: no SSD hits");
            assert!(tiered.hit_ratio > dram.hit_ratio || n >= 30_000, "{kind} at {n}: SSD tier added nothing");
            assert!(tiered.hit_ratio >= dram.hit_ratio, "{kind} at {n}: SSD tier lost hits");
            assert!(tiered.hit_ratio <= results.ideal.hit_ratio + 1e-9);
            assert_eq!(tiered.promotions, tiered.ssd_hits);
        }
    }
}

#[test]
fn print_table() {
    let results = results();
    let header: String = CAPACITIES.iter().map(|n| format!("{:>10}", format!("{}k", n / 1_000))).collect();
    println!("\nPrefix-hit ratio on synthetic_trace.jsonl (DRAM only; gap closed = share of LRU→Belady gap)");
    println!("{:<12}{header}", "policy");
    let lru = results.dram(PolicyKind::Lru);
    for (kind, dram, _) in &results.policies {
        let row: String = dram.iter().map(|r| format!("{:>10.4}", r.hit_ratio)).collect();
        let gap: String = dram
            .iter()
            .zip(lru)
            .zip(&results.optimal)
            .map(|((r, l), b)| format!("{:>7.1}%", 100.0 * (r.hit_ratio - l.hit_ratio) / (b.hit_ratio - l.hit_ratio)))
            .collect();
        println!("{:<12}{row}   gap closed:{gap}", kind.name());
    }
    let row: String = results.optimal.iter().map(|r| format!("{:>10.4}", r.hit_ratio)).collect();
    println!("{:<12}{row}", "belady");
    println!("{:<12}{:>10.4} (any capacity)", "ideal", results.ideal.hit_ratio);

    println!("\nDRAM + SSD ({SSD_FACTOR}x DRAM), same policy in both tiers: DRAM + SSD hit ratios, combined");
    let header: String = CAPACITIES.iter().map(|n| format!("{:>14}", format!("{}k", n / 1_000))).collect();
    println!("{:<12}{header}", "policy");
    for (kind, _, tiered) in &results.policies {
        let row: String = tiered
            .iter()
            .map(|r| format!("{:>14}", format!("{:.3}+{:.3}", r.dram_hit_ratio, r.ssd_hit_ratio)))
            .collect();
        let combined: String = tiered.iter().map(|r| format!("{:>8.4}", r.hit_ratio)).collect();
        println!("{:<12}{row}   combined:{combined}", kind.name());
    }
}
