//! `tandem bench compare A.json B.json`: two results side by side.
//!
//! Runs are matched by label; each matched pair gets a table of the key
//! metrics with A, B, the absolute and relative change and whether the
//! change is better or worse. Runs only one side has are listed. A warning
//! heads the output when the two were measured under different compute
//! modes, workloads or SLOs.

use super::report::{load, ms, utc};
use super::schema::{BenchResult, Dist, Run, Slo};
use std::fmt::Write as _;

/// Which direction of change is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// How a metric's values and changes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Two decimals.
    Real,
    /// A 0..1 share: percent, its change in percentage points.
    Share,
    /// Whole numbers.
    Count,
}

struct Metric {
    name: &'static str,
    unit: Unit,
    better: Better,
    /// `None` when the run has no value (no samples, nothing looked up).
    get: fn(&Run) -> Option<f64>,
}

fn latency(d: &Dist, pick: fn(&Dist) -> f64) -> Option<f64> {
    (d.n > 0).then(|| pick(d))
}

const METRICS: [Metric; 13] = [
    Metric {
        name: "TTFT mean (ms)",
        unit: Unit::Real,
        better: Better::Lower,
        get: |r| latency(&r.ttft_ms, |d| d.mean),
    },
    Metric { name: "TTFT p99 (ms)", unit: Unit::Real, better: Better::Lower, get: |r| latency(&r.ttft_ms, |d| d.p99) },
    Metric { name: "TBT p99 (ms)", unit: Unit::Real, better: Better::Lower, get: |r| latency(&r.tbt_ms, |d| d.p99) },
    Metric {
        name: "TPOT mean (ms)",
        unit: Unit::Real,
        better: Better::Lower,
        get: |r| latency(&r.tpot_ms, |d| d.mean),
    },
    Metric { name: "E2E p99 (ms)", unit: Unit::Real, better: Better::Lower, get: |r| latency(&r.e2e_ms, |d| d.p99) },
    Metric { name: "Goodput (req/s)", unit: Unit::Real, better: Better::Higher, get: |r| Some(r.goodput_rps) },
    Metric {
        name: "SLO attainment",
        unit: Unit::Share,
        better: Better::Higher,
        get: |r| (r.requests.sent > 0).then_some(r.slo_attainment),
    },
    Metric {
        name: "Throughput (req/s)",
        unit: Unit::Real,
        better: Better::Higher,
        get: |r| Some(r.throughput.requests_per_s),
    },
    Metric {
        name: "Output (tok/s)",
        unit: Unit::Real,
        better: Better::Higher,
        get: |r| Some(r.throughput.output_tokens_per_s),
    },
    Metric {
        name: "Token hit ratio",
        unit: Unit::Share,
        better: Better::Higher,
        get: |r| (r.cache.prompt_tokens > 0).then_some(r.cache.hit_ratio_tokens),
    },
    Metric {
        name: "Block hit ratio",
        unit: Unit::Share,
        better: Better::Higher,
        get: |r| (r.cache.prompt_blocks > 0).then_some(r.cache.hit_ratio_blocks),
    },
    Metric { name: "Rejected", unit: Unit::Count, better: Better::Lower, get: |r| Some(r.requests.rejected as f64) },
    Metric { name: "Failed", unit: Unit::Count, better: Better::Lower, get: |r| Some(r.requests.failed as f64) },
];

/// The verdict on one metric's change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Better,
    Worse,
    Same,
    /// One side has no value.
    NotComparable,
}

impl Verdict {
    fn marker(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "WORSE",
            Verdict::Same => "same",
            Verdict::NotComparable => "n/a",
        }
    }
}

fn verdict(a: Option<f64>, b: Option<f64>, better: Better) -> Verdict {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
            if (b - a).abs() <= 1e-12 * a.abs().max(b.abs()) {
                Verdict::Same
            } else if (b < a) == (better == Better::Lower) {
                Verdict::Better
            } else {
                Verdict::Worse
            }
        }
        _ => Verdict::NotComparable,
    }
}

/// The comparison table `tandem bench compare A.json B.json` prints.
pub fn compare(a: &BenchResult, b: &BenchResult) -> String {
    let mut out = String::new();
    for (name, r) in [("A", a), ("B", b)] {
        let _ = writeln!(
            out,
            "{name}: {} (tandem {}, {}, compute {})",
            r.command.trim(),
            r.tandem_version,
            utc(r.started_unix_s),
            r.compute
        );
    }
    let mut warnings = Vec::new();
    if a.compute != b.compute {
        warnings
            .push(format!("compute mode differs (A: {}, B: {}): latencies are not comparable", a.compute, b.compute));
    }
    if a.workload.description != b.workload.description {
        warnings.push(format!(
            "workload differs (A: {}, B: {})",
            a.workload.description.trim(),
            b.workload.description.trim()
        ));
    }
    if a.slo != b.slo {
        warnings.push(format!(
            "SLOs differ (A: {}; B: {}): goodput and attainment use different targets",
            slo(&a.slo),
            slo(&b.slo)
        ));
    }
    if !warnings.is_empty() {
        out.push('\n');
        for w in &warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
    }

    let (mut better, mut worse, mut matched) = (0usize, 0usize, 0usize);
    for ra in &a.runs {
        let Some(rb) = b.run(&ra.label) else { continue };
        matched += 1;
        let _ = writeln!(out, "\n== {} ==", ra.label);
        let (da, db) = (describe(ra), describe(rb));
        if da == db {
            let _ = writeln!(out, "{da}");
        } else {
            let _ = writeln!(out, "note: A ran {da}, B ran {db}");
        }
        let mut rows = vec![["metric", "A", "B", "delta", "delta %", ""].map(String::from)];
        for m in &METRICS {
            let (va, vb) = ((m.get)(ra), (m.get)(rb));
            let v = verdict(va, vb, m.better);
            match v {
                Verdict::Better => better += 1,
                Verdict::Worse => worse += 1,
                Verdict::Same | Verdict::NotComparable => {}
            }
            rows.push([
                m.name.to_string(),
                value(va, m.unit),
                value(vb, m.unit),
                delta(va, vb, m.unit),
                relative(va, vb),
                v.marker().to_string(),
            ]);
        }
        table(&mut out, &rows);
    }

    let only = |x: &BenchResult, y: &BenchResult| -> Vec<String> {
        x.runs.iter().filter(|r| y.run(&r.label).is_none()).map(|r| format!("\"{}\"", r.label)).collect()
    };
    let (only_a, only_b) = (only(a, b), only(b, a));
    if !only_a.is_empty() || !only_b.is_empty() {
        out.push('\n');
    }
    if !only_a.is_empty() {
        let _ = writeln!(out, "Only in A: {}", only_a.join(", "));
    }
    if !only_b.is_empty() {
        let _ = writeln!(out, "Only in B: {}", only_b.join(", "));
    }
    out.push('\n');
    if matched == 0 {
        out.push_str("No runs in common.\n");
    } else {
        let _ = writeln!(
            out,
            "{matched} run{} compared: {better} metric{} better, {worse} worse in B.",
            if matched == 1 { "" } else { "s" },
            if better == 1 { "" } else { "s" }
        );
    }
    out
}

fn slo(s: &Slo) -> String {
    format!("TTFT ≤ {}, TBT ≤ {}", ms(s.ttft_ms), ms(s.tbt_ms))
}

/// "kv-centric on 1P1D at 2 rps".
fn describe(r: &Run) -> String {
    format!("{} on {} at {}", r.policy, r.deployment.name(), load(r))
}

const MISSING: &str = "-";

fn value(v: Option<f64>, unit: Unit) -> String {
    match v {
        Some(v) if v.is_finite() => match unit {
            Unit::Real => format!("{v:.2}"),
            Unit::Share => format!("{:.1}%", v * 100.0),
            Unit::Count => format!("{v:.0}"),
        },
        _ => MISSING.into(),
    }
}

fn delta(a: Option<f64>, b: Option<f64>, unit: Unit) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
            let d = b - a;
            match unit {
                Unit::Real => format!("{d:+.2}"),
                Unit::Share => format!("{:+.1} pp", d * 100.0),
                Unit::Count => format!("{d:+.0}"),
            }
        }
        _ => MISSING.into(),
    }
}

/// (B - A) / |A| in percent; undefined from zero unless nothing changed.
fn relative(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
            if a != 0.0 {
                format!("{:+.1}%", (b - a) / a.abs() * 100.0)
            } else if b == 0.0 {
                "+0.0%".into()
            } else {
                MISSING.into()
            }
        }
        _ => MISSING.into(),
    }
}

/// Rows as aligned columns: the first left-aligned, the rest right-aligned
/// but the last (the marker), indented by two spaces.
fn table(out: &mut String, rows: &[[String; 6]]) {
    let mut widths = [0usize; 6];
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in rows {
        let mut line = String::from(" ");
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w - c.chars().count());
            line.push(' ');
            if i == 0 || i == row.len() - 1 {
                line.push_str(c);
                line.push_str(&pad);
            } else {
                line.push_str(&pad);
                line.push_str(c);
            }
            line.push(' ');
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::tests::{empty_run, sample};

    /// The line of `metric` in the section of run `label`, split on
    /// whitespace runs of two or more.
    fn line<'a>(out: &'a str, label: &str, metric: &str) -> Vec<&'a str> {
        let section = out.split(&format!("== {label} ==")).nth(1).unwrap();
        let section = section.split("\n== ").next().unwrap();
        let l = section.lines().find(|l| l.trim_start().starts_with(metric)).unwrap();
        l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect()
    }

    #[test]
    fn latency_up_is_worse_and_goodput_up_is_better() {
        let a = sample();
        let mut b = a.clone();
        b.runs[0].ttft_ms.p99 = 400.0; // from 310
        b.runs[0].goodput_rps = 1.21; // from 0.97
        b.runs[0].slo_attainment = 0.9; // from 0.9833
        b.runs[0].requests.rejected = 2; // from 0
        let out = compare(&a, &b);
        assert!(!out.contains("WARNING"), "{out}");
        let label = &a.runs[0].label;
        assert_eq!(line(&out, label, "TTFT p99"), ["TTFT p99 (ms)", "310.00", "400.00", "+90.00", "+29.0%", "WORSE"]);
        assert_eq!(line(&out, label, "Goodput"), ["Goodput (req/s)", "0.97", "1.21", "+0.24", "+24.7%", "better"]);
        assert_eq!(
            line(&out, label, "SLO attainment"),
            ["SLO attainment", "98.3%", "90.0%", "-8.3 pp", "-8.5%", "WORSE"]
        );
        assert_eq!(line(&out, label, "Rejected"), ["Rejected", "0", "2", "+2", "-", "WORSE"]);
        assert_eq!(line(&out, label, "TTFT mean"), ["TTFT mean (ms)", "85.27", "85.27", "+0.00", "+0.0%", "same"]);
        // Lower latency is better.
        let out = compare(&b, &a);
        assert_eq!(line(&out, label, "TTFT p99"), ["TTFT p99 (ms)", "400.00", "310.00", "-90.00", "-22.5%", "better"]);
        assert_eq!(line(&out, label, "Goodput")[5], "WORSE");
        assert!(out.contains("4 runs compared: 3 metrics better, 1 worse in B."), "{out}");
        // Every matched run gets every metric.
        for r in &a.runs {
            for m in &METRICS {
                assert_eq!(line(&out, &r.label, m.name).len(), 6, "{} {}", r.label, m.name);
            }
        }
    }

    #[test]
    fn unmatched_runs_are_listed() {
        let a = sample();
        let mut b = a.clone();
        b.runs.remove(1);
        b.runs.push(empty_run("cache-affinity @ 4 rps"));
        let out = compare(&a, &b);
        assert!(out.contains("Only in A: \"kv-centric @ 4 rps\"\n"), "{out}");
        assert!(out.contains("Only in B: \"cache-affinity @ 4 rps\"\n"), "{out}");
        assert!(!out.contains("== kv-centric @ 4 rps =="));
        assert!(out.contains("3 runs compared"));
    }

    #[test]
    fn warns_when_conditions_differ() {
        let a = sample();
        let mut b = a.clone();
        b.compute = "modeled:h100".into();
        b.workload.description = "trace: mooncake.jsonl ×2".into();
        b.slo.ttft_ms = 1000.0;
        b.runs[0].deployment.prefill = 2;
        let out = compare(&a, &b);
        let head: Vec<&str> = out.lines().filter(|l| l.starts_with("WARNING")).collect();
        assert_eq!(head.len(), 3, "{out}");
        assert!(head[0].contains("A: real, B: modeled:h100"));
        assert!(head[1].contains("mooncake"));
        assert!(head[2].contains("A: TTFT ≤ 2.00 s, TBT ≤ 100 ms; B: TTFT ≤ 1.00 s"));
        // Warnings come before any run.
        assert!(out.find("WARNING").unwrap() < out.find("==").unwrap());
        assert!(out.contains("note: A ran kv-centric on 1P1D at 1 rps, B ran kv-centric on 2P1D at 1 rps"));
    }

    #[test]
    fn empty_and_sampleless_results_compare() {
        let mut a = sample();
        a.runs.clear();
        let out = compare(&a, &a);
        assert!(out.contains("No runs in common."));
        a.runs = vec![empty_run("idle")];
        let mut b = a.clone();
        b.runs[0].ttft_ms = Dist { n: 3, mean: 5.0, p50: 5.0, p90: 6.0, p99: 6.0, max: 6.0 };
        let out = compare(&a, &b);
        assert_eq!(line(&out, "idle", "TTFT mean"), ["TTFT mean (ms)", "-", "5.00", "-", "-", "n/a"]);
        assert_eq!(line(&out, "idle", "Goodput"), ["Goodput (req/s)", "0.00", "0.00", "+0.00", "+0.0%", "same"]);
        assert_eq!(line(&out, "idle", "SLO attainment")[5], "n/a");
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(Some(1.0), Some(2.0), Better::Lower), Verdict::Worse);
        assert_eq!(verdict(Some(1.0), Some(2.0), Better::Higher), Verdict::Better);
        assert_eq!(verdict(Some(2.0), Some(2.0), Better::Higher), Verdict::Same);
        assert_eq!(verdict(None, Some(2.0), Better::Higher), Verdict::NotComparable);
        assert_eq!(verdict(Some(f64::NAN), Some(2.0), Better::Lower), Verdict::NotComparable);
    }
}
