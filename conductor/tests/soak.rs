//! Soak: a `tandem up --config` cluster (store master, storage node, a
//! prefill and a decode worker, the conductor) under a steady request rate
//! through the HTTP API for `TANDEM_SOAK_SECS` (default 120; the
//! documented long run is 1800). Every process's resident memory and open
//! file descriptors are sampled, and latency percentiles are taken per
//! window; it prints a table and asserts:
//!
//! - zero errors: every request completes with the single-process engine's
//!   exact text;
//! - open fds of every process end within `FD_SLACK` of their count after
//!   the warm-up (the first window);
//! - resident memory of every process grows less than `RSS_GROWTH` (plus
//!   `RSS_SLACK_MIB`) after the warm-up;
//! - the last window's p99 latency is within `P99_FACTOR` of the first
//!   post-warm-up window's (plus `P99_SLACK_MS`: this machine is shared).
//!
//! `TANDEM_SOAK_RPS` sets the rate (default 2 requests/s),
//! `TANDEM_SOAK_WINDOW_SECS` the window (default 60, or a quarter of the
//! run when shorter than 8 minutes).

use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::http::{cluster_file, Up};
use common::procs::{children_of, reference_texts, rss_kib_and_fds, stream_completion, tokenize, Outcome};

const MAX_TOKENS: usize = 16;
const FD_SLACK: usize = 8;
const RSS_GROWTH: f64 = 0.10;
const RSS_SLACK_MIB: f64 = 32.0;
const P99_FACTOR: f64 = 3.0;
const P99_SLACK_MS: f64 = 250.0;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One sample of every process: name → (RSS KiB, fds).
type Sample = BTreeMap<String, (u64, usize)>;

fn sample(up: &Up) -> Sample {
    let mut s = Sample::new();
    for (name, pid) in children_of(up.proc.child.id()) {
        if let Some(v) = rss_kib_and_fds(pid) {
            s.insert(name, v);
        }
    }
    s
}

#[test]
fn a_steady_load_keeps_memory_fds_and_latency_flat_with_zero_errors() {
    let secs: u64 = env("TANDEM_SOAK_SECS", 120);
    let rps: f64 = env("TANDEM_SOAK_RPS", 2.0);
    let window = Duration::from_secs(env("TANDEM_SOAK_WINDOW_SECS", if secs >= 480 { 60 } else { secs / 4 }).max(1));
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| {
            tokenize(&match i % 4 {
                0 => format!("Question {i}: why is the sky blue during the day but red at sunset? Answer:"),
                1 => format!("List {i}: apples, pears, plums, cherries, and"),
                2 => "The museum opened its new wing in spring, and the first visitors ".repeat(3) + &format!("({i})"),
                _ => format!("Dear diary, day {i}. Today I"),
            })
        })
        .collect();
    let want = reference_texts(&prompts, MAX_TOKENS);
    let dir = tempfile::tempdir().unwrap();
    let cfg = cluster_file(dir.path(), 1, 1, "policy = \"round-robin\"");
    let up = Up::start(&cfg, &dir.path().join("logs"));
    let http = up.http;
    eprintln!("soak: {secs} s at {rps} requests/s, windows of {window:?}");

    // Arrivals at a fixed rate, served by a few client threads.
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let next = Arc::new(Mutex::new(0u64));
    // (window index, latency ms, error)
    let results = Arc::new(Mutex::new(Vec::<(usize, f64, Option<String>)>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (next, results, prompts, want) = (next.clone(), results.clone(), prompts.clone(), want.clone());
            std::thread::spawn(move || loop {
                let k = {
                    let mut n = next.lock().unwrap();
                    *n += 1;
                    *n - 1
                };
                let at = start + Duration::from_secs_f64(k as f64 / rps);
                if at >= end {
                    return;
                }
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let p = k as usize % prompts.len();
                let body = json!({"prompt": prompts[p], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": true, "stream": true});
                let t = Instant::now();
                let outcome = stream_completion(http, &body, Duration::from_secs(60));
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let error = match outcome {
                    Outcome::Completed { text, .. } if text == want[p] => None,
                    o => Some(format!("prompt {p}: {o:?}")),
                };
                let w = (t.duration_since(start).as_secs_f64() / window.as_secs_f64()) as usize;
                results.lock().unwrap().push((w, ms, error));
            })
        })
        .collect();

    // Resource samples at each window's end.
    let mut samples: Vec<Sample> = vec![sample(&up)];
    let windows = (secs as f64 / window.as_secs_f64()).ceil() as usize;
    for w in 1..=windows {
        let at = start + window * w as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        samples.push(sample(&up));
    }
    for c in clients {
        c.join().unwrap();
    }
    let last = sample(&up);

    let results = std::mem::take(&mut *results.lock().unwrap());
    let errors: Vec<&String> = results.iter().filter_map(|r| r.2.as_ref()).collect();
    eprintln!(
        "\n{:>6} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8}",
        "window", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let mut p99s = Vec::new();
    for w in 0..windows {
        let mut lat: Vec<f64> = results.iter().filter(|r| r.0 == w).map(|r| r.1).collect();
        lat.sort_by(f64::total_cmp);
        let errs = results.iter().filter(|r| r.0 == w && r.2.is_some()).count();
        let p99 = percentile(&lat, 0.99);
        p99s.push(p99);
        eprintln!(
            "{w:>6} {:>8} {errs:>6} {:>8.0} {:>8.0} {p99:>8.0} {:>8.0}",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            lat.last().copied().unwrap_or(f64::NAN)
        );
    }
    eprintln!("\n{:<12} RSS MiB / open fds at each window's end (first column: before the load)", "process");
    for name in last.keys() {
        let row: Vec<String> = samples
            .iter()
            .map(|s| s.get(name).map_or("-".into(), |(rss, fds)| format!("{:.0}/{fds}", *rss as f64 / 1024.0)))
            .collect();
        eprintln!("{name:<12} {}", row.join("  "));
    }

    assert!(!results.is_empty(), "no request was sent");
    assert!(
        errors.is_empty(),
        "{} of {} requests failed: {:#?}",
        errors.len(),
        results.len(),
        &errors[..errors.len().min(5)]
    );
    // After the warm-up (the first window) nothing may keep growing.
    let warm = &samples[1.min(samples.len() - 1)];
    for (name, &(rss, fds)) in &last {
        let Some(&(rss0, fds0)) = warm.get(name) else { continue };
        assert!(fds <= fds0 + FD_SLACK, "{name}: open fds went from {fds0} to {fds}");
        let limit = rss0 as f64 * (1.0 + RSS_GROWTH) + RSS_SLACK_MIB * 1024.0;
        assert!(
            (rss as f64) <= limit,
            "{name}: resident memory grew from {:.0} MiB to {:.0} MiB",
            rss0 as f64 / 1024.0,
            rss as f64 / 1024.0
        );
    }
    assert_eq!(last.len(), 5, "every process of the cluster is still running: {:?}", last.keys());
    if p99s.len() >= 3 {
        let (first, final_) = (p99s[1], p99s[p99s.len() - 1]);
        assert!(
            final_ <= first * P99_FACTOR + P99_SLACK_MS,
            "p99 latency went from {first:.0} ms (after the warm-up) to {final_:.0} ms"
        );
    }
}
