//! From client samples and node counters to a [`Run`].

use super::client::{Sample, Status};
use super::cluster::{label, Setup};
use super::schema::{CacheStats, Counts, Dist, NodeUsage, Run, Throughput};
use super::Case;
use std::collections::BTreeMap;

/// A distribution summary (nearest-rank percentiles).
pub fn dist(xs: &[f64]) -> Dist {
    if xs.is_empty() {
        return Dist::default();
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let pct = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Dist {
        n: n as u64,
        mean: v.iter().sum::<f64>() / n as f64,
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: v[n - 1],
    }
}

/// Per node, what its counters grew by over the run.
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// node → (role, forward-pass seconds).
    pub compute: BTreeMap<String, (String, f64)>,
    /// direction ("put"/"get") → bytes, summed over nodes.
    pub store_bytes: BTreeMap<String, f64>,
}

impl NodeCounters {
    pub fn delta(before: &[(String, f64)], after: &[(String, f64)]) -> NodeCounters {
        let old = |name: &str| before.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| *v);
        let mut c = NodeCounters::default();
        for (name, v) in after {
            let grew = (v - old(name)).max(0.0);
            if name.starts_with("tandem_compute_seconds{") {
                if let (Some(node), Some(role)) = (label(name, "node"), label(name, "role")) {
                    c.compute.insert(node.to_string(), (role.to_string(), grew));
                }
            } else if name.starts_with("tandem_store_bytes{") {
                if let Some(dir) = label(name, "direction") {
                    *c.store_bytes.entry(dir.to_string()).or_default() += grew;
                }
            }
        }
        c
    }
}

/// The run's numbers. `wall_s` is the time from the first send to the
/// last answer.
pub fn summarise(case: &Case, setup: &Setup, samples: &[Sample], nodes: &NodeCounters, wall_s: f64) -> Run {
    let completed: Vec<&Sample> = samples.iter().filter(|s| s.status == Status::Completed).collect();
    let counts = Counts {
        sent: samples.len() as u64,
        completed: completed.len() as u64,
        rejected: samples.iter().filter(|s| s.status == Status::Rejected).count() as u64,
        failed: samples.iter().filter(|s| matches!(s.status, Status::Failed(_))).count() as u64,
    };
    let ms = |x: f64| x * 1000.0;
    let ttft: Vec<f64> = completed.iter().filter_map(|s| s.ttft_s()).map(ms).collect();
    let tbt: Vec<f64> = completed.iter().flat_map(|s| s.token_s.windows(2).map(|w| ms(w[1] - w[0]))).collect();
    let tpot: Vec<f64> = completed.iter().filter_map(|s| s.tpot_s()).map(ms).collect();
    let e2e: Vec<f64> = completed.iter().map(|s| ms(s.e2e_s)).collect();
    let duration = {
        let first = samples.iter().map(|s| s.sent_s).fold(f64::INFINITY, f64::min);
        let last = samples.iter().map(|s| s.sent_s + s.e2e_s).fold(0.0, f64::max);
        if first.is_finite() && last > first {
            last - first
        } else {
            wall_s
        }
    }
    .max(1e-9);
    let good = completed
        .iter()
        .filter(|s| {
            s.ttft_s().is_some_and(|t| ms(t) <= setup.slo_ttft_ms)
                && s.tpot_s().is_none_or(|t| ms(t) <= setup.slo_tbt_ms)
        })
        .count();
    let bt = u64::from(setup.block_tokens.max(1));
    let prompt_tokens: u64 = completed.iter().map(|s| u64::from(s.prompt_tokens)).sum();
    let cached_tokens: u64 = completed.iter().map(|s| u64::from(s.cached_tokens)).sum();
    // A prefill looks up every full block but the one holding the last
    // prompt token (that token is always computed).
    let prompt_blocks: u64 = completed.iter().map(|s| u64::from(s.prompt_tokens.max(1) - 1) / bt).sum();
    let cached_blocks: u64 = completed.iter().map(|s| u64::from(s.cached_tokens) / bt).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let transport = &setup.transport;
    let kv_bytes = nodes.store_bytes.iter().map(|(dir, b)| (format!("{transport}/{dir}"), *b as u64)).collect();
    let node_usage = nodes
        .compute
        .iter()
        .map(|(name, (role, secs))| NodeUsage {
            name: name.clone(),
            role: if case.deployment.colocated { "colocated".into() } else { role.clone() },
            busy: (secs / wall_s.max(1e-9)).clamp(0.0, 1.0),
        })
        .collect();
    let mut ttft_samples = ttft.clone();
    ttft_samples.sort_by(f64::total_cmp);
    let input_tokens: u64 = completed.iter().map(|s| u64::from(s.prompt_tokens)).sum();
    let output_tokens: usize = completed.iter().map(|s| s.token_s.len()).sum();
    Run {
        label: case.label.clone(),
        policy: case.policy.clone(),
        deployment: case.deployment,
        rate_rps: case.arrival.rate(),
        concurrency: case.arrival.concurrency(),
        duration_s: duration,
        requests: counts,
        ttft_ms: dist(&ttft),
        tbt_ms: dist(&tbt),
        tpot_ms: dist(&tpot),
        e2e_ms: dist(&e2e),
        throughput: Throughput {
            requests_per_s: completed.len() as f64 / duration,
            input_tokens_per_s: input_tokens as f64 / duration,
            output_tokens_per_s: output_tokens as f64 / duration,
        },
        goodput_rps: good as f64 / duration,
        slo_attainment: ratio(good as u64, counts.sent),
        cache: CacheStats {
            prompt_tokens,
            cached_tokens,
            hit_ratio_tokens: ratio(cached_tokens, prompt_tokens),
            prompt_blocks,
            cached_blocks,
            hit_ratio_blocks: ratio(cached_blocks, prompt_blocks),
            offline_hit_ratio_blocks: None,
        },
        kv_bytes,
        nodes: node_usage,
        ttft_samples_ms: ttft_samples,
        hit_ratio_timeline: timeline(&completed),
    }
}

/// Cumulative token hit ratio as answers finish, at most 200 points.
fn timeline(completed: &[&Sample]) -> Vec<(f64, f64)> {
    let mut done: Vec<(f64, u64, u64)> = completed
        .iter()
        .map(|s| (s.sent_s + s.e2e_s, u64::from(s.cached_tokens), u64::from(s.prompt_tokens)))
        .collect();
    done.sort_by(|a, b| a.0.total_cmp(&b.0));
    let step = done.len().div_ceil(200).max(1);
    let (mut hit, mut all) = (0u64, 0u64);
    let mut out = Vec::new();
    for (i, (t, c, p)) in done.iter().enumerate() {
        hit += c;
        all += p;
        if (i + 1) % step == 0 || i + 1 == done.len() {
            out.push((*t, if all == 0 { 0.0 } else { hit as f64 / all as f64 }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::cluster::Compute;
    use crate::harness::load::Arrival;
    use crate::harness::schema::Deployment;

    fn sample(status: Status, sent: f64, tokens: &[f64], prompt: u32, cached: u32) -> Sample {
        Sample {
            status,
            sent_s: sent,
            prompt_tokens: prompt,
            cached_tokens: cached,
            token_s: tokens.to_vec(),
            e2e_s: tokens.last().copied().unwrap_or(0.01),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = dist(&xs);
        assert_eq!((d.n, d.p50, d.p90, d.p99, d.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(d.mean, 50.5);
        assert_eq!(dist(&[]).n, 0);
    }

    #[test]
    fn goodput_counts_requests_within_both_slos_and_every_request_is_accounted_for() {
        let setup = Setup {
            tandem: "tandem".into(),
            model: "smollm2".into(),
            compute: Compute::Real,
            block_tokens: 16,
            kv_dtype: "f32".into(),
            store_dram: "1GiB".into(),
            eviction: None,
            transport: "shm".into(),
            kv_memory: "256MiB".into(),
            prefix_reads: true,
            chunk_tokens: None,
            write_back: true,
            slo_ttft_ms: 1000.0,
            slo_tbt_ms: 100.0,
            keep: None,
        };
        let case = Case {
            label: "x".into(),
            policy: "kv-centric".into(),
            deployment: Deployment { prefill: 1, decode: 1, colocated: false },
            arrival: Arrival::Fixed { rate: 1.0 },
        };
        let samples = vec![
            sample(Status::Completed, 0.0, &[0.5, 0.55, 0.6], 33, 16), // good
            sample(Status::Completed, 1.0, &[0.5, 0.9, 1.3], 33, 0),   // TPOT 400 ms: misses TBT
            sample(Status::Completed, 2.0, &[1.2, 1.25], 48, 32),      // TTFT 1.2 s: misses TTFT
            sample(Status::Rejected, 3.0, &[], 10, 0),
            sample(Status::Failed("x".into()), 3.5, &[], 10, 0),
        ];
        let run = summarise(&case, &setup, &samples, &NodeCounters::default(), 4.0);
        assert_eq!(run.requests, Counts { sent: 5, completed: 3, rejected: 1, failed: 1 });
        // From the first send (0 s) to the last reply (the failure's, 3.5 + 0.01 s).
        assert!((run.duration_s - 3.51).abs() < 1e-9, "{}", run.duration_s);
        assert!((run.goodput_rps - 1.0 / run.duration_s).abs() < 1e-9);
        assert!((run.slo_attainment - 0.2).abs() < 1e-9);
        assert_eq!(run.ttft_ms.n, 3);
        assert_eq!(run.tbt_ms.n, 5, "every gap between tokens");
        assert_eq!((run.cache.prompt_tokens, run.cache.cached_tokens), (114, 48));
        // Blocks looked up: (33-1)/16 = 2, 2, (48-1)/16 = 2.
        assert_eq!((run.cache.prompt_blocks, run.cache.cached_blocks), (6, 3));
        assert_eq!(run.ttft_samples_ms, vec![500.0, 500.0, 1200.0]);
        assert_eq!(run.hit_ratio_timeline.last().unwrap().1, 48.0 / 114.0);
    }

    #[test]
    fn node_counters_are_deltas() {
        let before = vec![("tandem_compute_seconds{node=\"p\",role=\"prefill\"}".to_string(), 1.0)];
        let after = vec![
            ("tandem_compute_seconds{node=\"p\",role=\"prefill\"}".to_string(), 3.5),
            ("tandem_store_bytes{node=\"p\",direction=\"put\"}".to_string(), 100.0),
            ("tandem_store_bytes{node=\"d\",direction=\"put\"}".to_string(), 20.0),
        ];
        let c = NodeCounters::delta(&before, &after);
        assert_eq!(c.compute["p"], ("prefill".to_string(), 2.5));
        assert_eq!(c.store_bytes["put"], 120.0);
    }
}
