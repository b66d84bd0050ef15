//! A Markdown report of a [`BenchResult`], with its SVG plots, written
//! next to the result's JSON file.
//!
//! [`write_report`] turns `run.json` into `run.md`, `run-ttft-cdf.svg`,
//! `run-goodput.svg` (only for a load sweep, see
//! [`plot::has_load_sweep`]) and `run-hit-ratio.svg`; [`markdown`] alone
//! renders the text.

use super::plot;
use super::schema::{BenchResult, Dist, Run};
use anyhow::{anyhow, Context};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A plot linked from the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlotFile {
    /// The image's alt text, e.g. "TTFT CDF".
    pub title: String,
    /// The file, relative to the Markdown report's directory (as linked).
    pub path: PathBuf,
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportFiles {
    /// `<stem>.md`
    pub markdown: PathBuf,
    /// `<stem>-ttft-cdf.svg`
    pub ttft_cdf: PathBuf,
    /// `<stem>-goodput.svg`, only when the runs sweep load for some policy.
    pub goodput: Option<PathBuf>,
    /// `<stem>-hit-ratio.svg`
    pub hit_ratio: PathBuf,
}

impl ReportFiles {
    /// Every file written, the report first.
    pub fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.markdown.as_path(), self.ttft_cdf.as_path()];
        v.extend(self.goodput.as_deref());
        v.push(self.hit_ratio.as_path());
        v
    }
}

/// Writes the Markdown report and its plots next to `json_path` (which
/// need not exist), named after its stem: `<stem>.md`,
/// `<stem>-ttft-cdf.svg`, `<stem>-goodput.svg` (when ≥ 2 runs of one
/// policy differ in rate or concurrency) and `<stem>-hit-ratio.svg`.
pub fn write_report(result: &BenchResult, json_path: &Path) -> anyhow::Result<ReportFiles> {
    let stem = json_path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("no usable file name in {}", json_path.display()))?;
    let dir = json_path.parent().unwrap_or(Path::new(""));
    let mut plots = Vec::new();
    let mut add = |title: &str, suffix: &str, draw: &dyn Fn(&[Run], &Path) -> anyhow::Result<()>| {
        let name = PathBuf::from(format!("{stem}-{suffix}.svg"));
        let full = dir.join(&name);
        draw(&result.runs, &full)?;
        plots.push(PlotFile { title: title.to_string(), path: name });
        anyhow::Ok(full)
    };
    let ttft_cdf = add("TTFT CDF", "ttft-cdf", &plot::ttft_cdf)?;
    let goodput = if plot::has_load_sweep(&result.runs) {
        Some(add("Goodput vs offered load", "goodput", &plot::goodput_vs_load)?)
    } else {
        None
    };
    let hit_ratio = add("Cache hit ratio over time", "hit-ratio", &plot::hit_ratio_timeline)?;
    let markdown_path = dir.join(format!("{stem}.md"));
    std::fs::write(&markdown_path, markdown(result, &plots))
        .with_context(|| format!("writing report {}", markdown_path.display()))?;
    Ok(ReportFiles { markdown: markdown_path, ttft_cdf, goodput, hit_ratio })
}

/// The report a person reads: what was run and on what, one table row per
/// run, KV traffic and node utilisation, then `plots` as images (their
/// paths relative to the report).
pub fn markdown(result: &BenchResult, plots: &[PlotFile]) -> String {
    let mut md = String::new();
    header(&mut md, result);
    runs_table(&mut md, &result.runs);
    kv_and_nodes(&mut md, &result.runs);
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
        for p in plots {
            let _ = writeln!(md, "![{}]({})\n", cell(&p.title), link(&p.path));
        }
    }
    md
}

fn header(md: &mut String, r: &BenchResult) {
    let w = &r.workload;
    let _ = writeln!(md, "# Tandem bench report\n");
    let _ = writeln!(md, "- **Command:** {}", code_span(&r.command));
    let _ = writeln!(md, "- **Tandem:** {}", inline(&r.tandem_version));
    let _ = writeln!(md, "- **Started:** {}", utc(r.started_unix_s));
    let _ = writeln!(md, "- **Machine:** {}", inline(&machine(&r.machine)));
    let _ = writeln!(md, "- **Compute:** {}", inline(&r.compute));
    let _ = writeln!(
        md,
        "- **Workload:** {} — {} ({} requests, mean {:.1} input / {:.1} output tokens)",
        inline(&w.kind),
        inline(&w.description),
        w.requests,
        w.input_tokens_mean,
        w.output_tokens_mean
    );
    let _ = writeln!(
        md,
        "- **SLOs:** TTFT ≤ {}, TBT ≤ {} (applied to each request's TPOT)",
        ms(r.slo.ttft_ms),
        ms(r.slo.tbt_ms)
    );
}

fn runs_table(md: &mut String, runs: &[Run]) {
    md.push_str("\n## Runs\n\n");
    if runs.is_empty() {
        md.push_str("_No runs._\n");
        return;
    }
    const COLUMNS: [&str; 25] = [
        "Run",
        "Policy",
        "Deployment",
        "Load",
        "Duration",
        "Sent",
        "Completed",
        "Rejected",
        "Failed",
        "TTFT mean",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "TBT p50",
        "TBT p99",
        "TPOT mean",
        "E2E p50",
        "E2E p99",
        "req/s",
        "out tok/s",
        "Goodput (req/s)",
        "SLO attainment",
        "Token hit",
        "Block hit",
        "Prompt tokens",
    ];
    table_head(md, &COLUMNS, 4);
    for r in runs {
        let c = &r.requests;
        let cells = [
            cell(&r.label),
            cell(&r.policy),
            cell(&r.deployment.name()),
            load(r),
            seconds(r.duration_s),
            c.sent.to_string(),
            c.completed.to_string(),
            c.rejected.to_string(),
            c.failed.to_string(),
            dist(&r.ttft_ms, |d| d.mean),
            dist(&r.ttft_ms, |d| d.p50),
            dist(&r.ttft_ms, |d| d.p90),
            dist(&r.ttft_ms, |d| d.p99),
            dist(&r.tbt_ms, |d| d.p50),
            dist(&r.tbt_ms, |d| d.p99),
            dist(&r.tpot_ms, |d| d.mean),
            dist(&r.e2e_ms, |d| d.p50),
            dist(&r.e2e_ms, |d| d.p99),
            fixed(r.throughput.requests_per_s, 2),
            fixed(r.throughput.output_tokens_per_s, 1),
            fixed(r.goodput_rps, 2),
            if c.sent == 0 { NONE.into() } else { percent(r.slo_attainment) },
            if r.cache.prompt_tokens == 0 { NONE.into() } else { percent(r.cache.hit_ratio_tokens) },
            match (r.cache.prompt_blocks, r.cache.offline_hit_ratio_blocks) {
                (0, _) => NONE.into(),
                (_, None) => percent(r.cache.hit_ratio_blocks),
                (_, Some(o)) => format!("{} (offline {})", percent(r.cache.hit_ratio_blocks), percent(o)),
            },
            r.cache.prompt_tokens.to_string(),
        ];
        table_row(md, &cells);
    }
    let _ = writeln!(
        md,
        "\nLatencies are measured at the client; `{NONE}` means no samples. TBT is every gap between \
         consecutive tokens; TPOT is per request. Goodput counts completed requests within both SLOs \
         per second; SLO attainment is their share of the requests sent. The block hit ratio's \
         `offline` figure replays the same prompts one at a time through the store's eviction policy \
         at its capacity: a run sending one request at a time measures exactly it."
    );
}

fn kv_and_nodes(md: &mut String, runs: &[Run]) {
    md.push_str("\n## KV bytes and node utilisation\n\n");
    let keys: BTreeSet<&str> = runs.iter().flat_map(|r| r.kv_bytes.keys().map(String::as_str)).collect();
    md.push_str("### KV bytes moved through the store\n\n");
    if keys.is_empty() {
        md.push_str("_No KV traffic recorded._\n");
    } else {
        let mut head = vec!["Run"];
        head.extend(keys.iter().copied());
        head.push("Total");
        head.push("Per completed request");
        table_head(md, &head, 1);
        for r in runs {
            let mut cells = vec![cell(&r.label)];
            cells.extend(keys.iter().map(|k| r.kv_bytes.get(*k).map_or(NONE.into(), |b| bytes(*b))));
            let total: u64 = r.kv_bytes.values().fold(0u64, |a, b| a.saturating_add(*b));
            cells.push(bytes(total));
            cells.push(total.checked_div(r.requests.completed).map_or(NONE.into(), bytes));
            table_row(md, &cells);
        }
    }
    md.push_str("\n### Node utilisation\n\n");
    if runs.iter().all(|r| r.nodes.is_empty()) {
        md.push_str("_No node usage recorded._\n");
    } else {
        md.push_str("Share of the run's wall time each node spent in forward passes.\n\n");
        table_head(md, &["Run", "Node", "Role", "Busy"], 3);
        for r in runs {
            for n in &r.nodes {
                table_row(md, &[cell(&r.label), cell(&n.name), cell(&n.role), percent(n.busy)]);
            }
        }
    }
}

/// Shown where there is no value.
const NONE: &str = "—";

/// A table's header: the first `text` columns left-aligned, the rest
/// (numbers) right-aligned.
fn table_head(md: &mut String, cols: &[&str], text: usize) {
    let _ = writeln!(md, "| {} |", cols.join(" | "));
    let aligns: Vec<&str> = (0..cols.len()).map(|i| if i < text { ":---" } else { "---:" }).collect();
    let _ = writeln!(md, "|{}|", aligns.join("|"));
}

fn table_row(md: &mut String, cells: &[String]) {
    let _ = writeln!(md, "| {} |", cells.join(" | "));
}

/// Text made safe for a table cell: no pipes, no line breaks.
fn cell(s: &str) -> String {
    inline(s).replace('|', "\\|")
}

/// Text on one line.
fn inline(s: &str) -> String {
    s.split(['\n', '\r']).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// An inline code span that survives backticks in `s`.
fn code_span(s: &str) -> String {
    let s = inline(s);
    let mut longest = 0;
    let mut run = 0;
    for ch in s.chars() {
        run = if ch == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    if longest > 0 {
        format!("{fence} {s} {fence}")
    } else {
        format!("{fence}{s}{fence}")
    }
}

/// A relative link target: forward slashes, angle brackets when it has
/// spaces or parentheses.
fn link(p: &Path) -> String {
    let s = p.to_string_lossy().replace('\\', "/");
    if s.contains([' ', '(', ')']) {
        format!("<{s}>")
    } else {
        s
    }
}

/// A latency: seconds with 2 decimals from 1 s up, else milliseconds
/// (fewer decimals as they grow).
pub(crate) fn ms(v: f64) -> String {
    if !v.is_finite() {
        NONE.into()
    } else if v.abs() >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v.abs() >= 100.0 {
        format!("{v:.0} ms")
    } else if v.abs() >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn dist(d: &Dist, pick: impl Fn(&Dist) -> f64) -> String {
    if d.n == 0 {
        NONE.into()
    } else {
        ms(pick(d))
    }
}

fn seconds(s: f64) -> String {
    if s.is_finite() {
        format!("{s:.1} s")
    } else {
        NONE.into()
    }
}

fn fixed(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        NONE.into()
    }
}

/// A 0..1 share as a percentage with one decimal.
fn percent(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}%", v * 100.0)
    } else {
        NONE.into()
    }
}

/// Up to 2 decimals, trailing zeros dropped: "2", "0.5", "1.25".
fn short(v: f64) -> String {
    let s = format!("{v:.2}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Offered load: "2 rps", "c=8", both, or none.
pub(crate) fn load(r: &Run) -> String {
    match (r.rate_rps, r.concurrency) {
        (Some(rate), Some(c)) => format!("{} rps, c={c}", short(rate)),
        (Some(rate), None) => format!("{} rps", short(rate)),
        (None, Some(c)) => format!("c={c}"),
        (None, None) => NONE.into(),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The machine description: an object's fields as `key: value`.
fn machine(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "unknown".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc(unix_s: u64) -> String {
    let (year, month, day) = tandem_model::chat::civil_date(unix_s);
    let secs = unix_s % 86_400;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::harness::schema::{
        CacheStats, Counts, Deployment, NodeUsage, Slo, Throughput, WorkloadInfo, SCHEMA_VERSION,
    };
    use std::collections::BTreeMap;

    /// A run with nothing measured.
    pub(crate) fn empty_run(label: &str) -> Run {
        Run {
            label: label.into(),
            policy: "kv-centric".into(),
            deployment: Deployment { prefill: 1, decode: 1, colocated: false },
            rate_rps: None,
            concurrency: None,
            duration_s: 0.0,
            requests: Counts::default(),
            ttft_ms: Dist::default(),
            tbt_ms: Dist::default(),
            tpot_ms: Dist::default(),
            e2e_ms: Dist::default(),
            throughput: Throughput::default(),
            goodput_rps: 0.0,
            slo_attainment: 0.0,
            cache: CacheStats::default(),
            kv_bytes: BTreeMap::new(),
            nodes: Vec::new(),
            ttft_samples_ms: Vec::new(),
            hit_ratio_timeline: Vec::new(),
        }
    }

    fn d(n: u64, mean: f64, p50: f64, p90: f64, p99: f64, max: f64) -> Dist {
        Dist { n, mean, p50, p90, p99, max }
    }

    /// `n` ascending samples spread geometrically over `lo..=hi` ms.
    fn samples(n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|i| lo * (hi / lo).powf(i as f64 / (n - 1) as f64)).collect()
    }

    /// A cumulative hit ratio rising towards `last` over `secs`.
    fn timeline(secs: u32, last: f64) -> Vec<(f64, f64)> {
        (1..=secs).map(|t| (f64::from(t), last * (1.0 - (-f64::from(t) / 8.0).exp()))).collect()
    }

    fn node(name: &str, role: &str, busy: f64) -> NodeUsage {
        NodeUsage { name: name.into(), role: role.into(), busy }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        label: &str,
        policy: &str,
        deployment: Deployment,
        rate_rps: Option<f64>,
        concurrency: Option<u32>,
        requests: Counts,
        ttft: Dist,
        goodput_rps: f64,
        slo_attainment: f64,
    ) -> Run {
        Run {
            label: label.into(),
            policy: policy.into(),
            deployment,
            rate_rps,
            concurrency,
            duration_s: 61.2,
            requests,
            ttft_ms: ttft,
            tbt_ms: d(9000, 24.0, 22.5, 35.0, 48.3, 120.0),
            tpot_ms: d(requests.completed, 24.1, 23.8, 30.0, 41.0, 55.0),
            e2e_ms: d(requests.completed, 3300.0, 3100.0, 4400.0, 5230.0, 6100.0),
            throughput: Throughput {
                requests_per_s: requests.completed as f64 / 61.2,
                input_tokens_per_s: 512.0 * requests.completed as f64 / 61.2,
                output_tokens_per_s: 128.0 * requests.completed as f64 / 61.2,
            },
            goodput_rps,
            slo_attainment,
            cache: CacheStats {
                prompt_tokens: 30_720,
                cached_tokens: 12_288,
                hit_ratio_tokens: 0.4,
                prompt_blocks: 1920,
                cached_blocks: 768,
                hit_ratio_blocks: 0.4,
                offline_hit_ratio_blocks: Some(0.45),
            },
            kv_bytes: BTreeMap::from([("shm.read".into(), 3 << 30), ("shm.write".into(), 5 << 29)]),
            nodes: vec![node("prefill-0", "prefill", 0.632), node("decode-0", "decode", 0.41)],
            ttft_samples_ms: Vec::new(),
            hit_ratio_timeline: timeline(60, 0.4),
        }
    }

    /// A realistic sweep: kv-centric at two rates, colocated, and
    /// round-robin at fixed concurrency.
    pub(crate) fn sample() -> BenchResult {
        let p1d1 = Deployment { prefill: 1, decode: 1, colocated: false };
        let counts = |sent, completed, rejected, failed| Counts { sent, completed, rejected, failed };
        let mut runs = vec![
            run(
                "kv-centric @ 1 rps",
                "kv-centric",
                p1d1,
                Some(1.0),
                None,
                counts(60, 60, 0, 0),
                d(60, 85.27, 72.4, 140.0, 310.0, 420.0),
                0.97,
                0.9833,
            ),
            run(
                "kv-centric @ 4 rps",
                "kv-centric",
                p1d1,
                Some(4.0),
                None,
                counts(240, 236, 3, 1),
                d(236, 1250.0, 980.0, 2400.0, 4870.0, 6000.0),
                2.5,
                0.625,
            ),
            run(
                "colocated @ 4 rps",
                "colocated",
                Deployment { prefill: 0, decode: 2, colocated: true },
                Some(4.0),
                None,
                counts(240, 240, 0, 0),
                d(240, 640.0, 512.0, 1300.0, 2950.0, 3000.0),
                3.1,
                0.79,
            ),
            run(
                "round-robin c=8",
                "round-robin",
                Deployment { prefill: 2, decode: 1, colocated: false },
                None,
                Some(8),
                counts(120, 120, 0, 0),
                d(120, 9.5, 8.25, 12.0, 15.0, 16.0),
                1.9,
                0.95,
            ),
        ];
        runs[0].ttft_samples_ms = samples(60, 40.0, 420.0);
        runs[1].ttft_samples_ms = samples(236, 300.0, 6000.0);
        runs[2].ttft_samples_ms = samples(240, 20.0, 3000.0);
        runs[3].ttft_samples_ms = samples(120, 5.0, 16.0);
        runs[2].cache.prompt_blocks = 0;
        runs[2].nodes = vec![node("worker-0", "colocated", 0.88), node("worker-1", "colocated", 0.86)];
        runs[2].kv_bytes.clear();
        runs[1].hit_ratio_timeline = timeline(60, 0.28);
        runs[2].hit_ratio_timeline = timeline(60, 0.55);
        runs[3].hit_ratio_timeline.clear();
        runs[3].kv_bytes = BTreeMap::from([("tcp.read".into(), 1536)]);
        BenchResult {
            schema_version: SCHEMA_VERSION,
            tandem_version: "0.1.0".into(),
            command: "tandem bench sweep --rates 1,4 --policies kv-centric,colocated".into(),
            started_unix_s: 1_735_689_600, // 2025-01-01 00:00:00 UTC
            machine: serde_json::json!({"cpu": "AMD EPYC 7B13", "threads": 16, "simd": "Avx2"}),
            workload: WorkloadInfo {
                kind: "synthetic".into(),
                description: "synthetic: 512 input / 128 output tokens, 40% shared prefix".into(),
                requests: 240,
                input_tokens_mean: 512.0,
                output_tokens_mean: 128.0,
            },
            compute: "real".into(),
            slo: Slo { ttft_ms: 2000.0, tbt_ms: 100.0 },
            runs,
        }
    }

    /// The cells of the row whose first cell is `label`, keyed by the
    /// table's header.
    fn row<'a>(md: &'a str, label: &str) -> BTreeMap<&'a str, &'a str> {
        let split = |l: &'a str| l.trim().trim_matches('|').split(" | ").map(str::trim).collect::<Vec<_>>();
        let lines: Vec<&str> = md.lines().collect();
        let i = lines.iter().position(|l| l.starts_with(&format!("| {label} |"))).unwrap();
        let head = lines[..i].iter().rev().find(|l| l.starts_with("| Run |")).unwrap();
        split(head).into_iter().zip(split(lines[i])).collect()
    }

    #[test]
    fn markdown_has_header_and_every_run() {
        let r = sample();
        let md = markdown(&r, &[]);
        assert!(md.contains("`tandem bench sweep --rates 1,4 --policies kv-centric,colocated`"));
        assert!(md.contains("- **Tandem:** 0.1.0"));
        assert!(md.contains("2025-01-01 00:00:00 UTC"));
        assert!(md.contains("cpu: AMD EPYC 7B13") && md.contains("threads: 16") && md.contains("simd: Avx2"));
        assert!(md.contains("- **Compute:** real"));
        assert!(md.contains("40% shared prefix (240 requests"));
        assert!(md.contains("TTFT ≤ 2.00 s, TBT ≤ 100 ms"));
        for run in &r.runs {
            assert!(md.contains(&format!("| {} |", run.label)), "missing {}", run.label);
        }
        assert!(!md.contains("## Plots"));
    }

    #[test]
    fn markdown_formats_numbers() {
        let md = markdown(&sample(), &[]);
        let slow = row(&md, "kv-centric @ 4 rps");
        assert_eq!(slow["Deployment"], "1P1D");
        assert_eq!(slow["Load"], "4 rps");
        assert_eq!((slow["Sent"], slow["Completed"], slow["Rejected"], slow["Failed"]), ("240", "236", "3", "1"));
        assert_eq!(slow["TTFT mean"], "1.25 s");
        assert_eq!(slow["TTFT p50"], "980 ms");
        assert_eq!(slow["TTFT p90"], "2.40 s");
        assert_eq!(slow["TTFT p99"], "4.87 s");
        assert_eq!(slow["TBT p50"], "22.5 ms");
        assert_eq!(slow["TBT p99"], "48.3 ms");
        assert_eq!(slow["TPOT mean"], "24.1 ms");
        assert_eq!(slow["E2E p50"], "3.10 s");
        assert_eq!(slow["E2E p99"], "5.23 s");
        assert_eq!(slow["req/s"], "3.86");
        assert_eq!(slow["out tok/s"], "493.6");
        assert_eq!(slow["Goodput (req/s)"], "2.50");
        assert_eq!(slow["SLO attainment"], "62.5%");
        assert_eq!(slow["Token hit"], "40.0%");
        assert_eq!(slow["Block hit"], "40.0% (offline 45.0%)");

        let fast = row(&md, "kv-centric @ 1 rps");
        assert_eq!(fast["TTFT mean"], "85.3 ms");
        assert_eq!(fast["SLO attainment"], "98.3%");
        let coloc = row(&md, "colocated @ 4 rps");
        assert_eq!(coloc["Deployment"], "colocated×2");
        assert_eq!(coloc["Block hit"], "—");
        let rr = row(&md, "round-robin c=8");
        assert_eq!(rr["Deployment"], "2P1D");
        assert_eq!(rr["Load"], "c=8");
        assert_eq!(rr["TTFT mean"], "9.50 ms");
    }

    #[test]
    fn markdown_has_kv_bytes_nodes_and_plots() {
        let plots = [
            PlotFile { title: "TTFT CDF".into(), path: "r-ttft-cdf.svg".into() },
            PlotFile { title: "Hit ratio".into(), path: "my plots/r (1).svg".into() },
        ];
        let md = markdown(&sample(), &plots);
        let kv = md.lines().find(|l| l.starts_with("| kv-centric @ 1 rps | 3.0 GiB")).unwrap();
        assert_eq!(kv, "| kv-centric @ 1 rps | 3.0 GiB | 2.5 GiB | — | 5.5 GiB | 93.9 MiB |");
        assert!(md.contains("| round-robin c=8 | — | — | 1.5 KiB | 1.5 KiB | 12 B |"));
        assert!(md.contains("| colocated @ 4 rps | worker-1 | colocated | 86.0% |"));
        assert!(md.contains("| kv-centric @ 4 rps | prefill-0 | prefill | 63.2% |"));
        assert!(md.contains("![TTFT CDF](r-ttft-cdf.svg)"));
        assert!(md.contains("![Hit ratio](<my plots/r (1).svg>)"));
    }

    #[test]
    fn markdown_of_nothing_does_not_panic() {
        let mut r = sample();
        r.runs.clear();
        r.machine = serde_json::Value::Null;
        let md = markdown(&r, &[]);
        assert!(md.contains("_No runs._"));
        assert!(md.contains("_No KV traffic recorded._"));
        assert!(md.contains("_No node usage recorded._"));

        r.runs = vec![empty_run("idle"), empty_run("a|b")];
        let md = markdown(&r, &[]);
        let idle = row(&md, "idle");
        assert_eq!(idle["TTFT mean"], "—");
        assert_eq!(idle["SLO attainment"], "—");
        assert_eq!(idle["Load"], "—");
        assert!(md.contains("| a\\|b |"));
    }

    #[test]
    fn write_report_writes_markdown_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("sweep.json");
        let r = sample();
        let files = write_report(&r, &json).unwrap();
        assert_eq!(files.markdown, dir.path().join("sweep.md"));
        assert_eq!(files.ttft_cdf, dir.path().join("sweep-ttft-cdf.svg"));
        assert_eq!(files.goodput.as_deref(), Some(dir.path().join("sweep-goodput.svg").as_path()));
        assert_eq!(files.hit_ratio, dir.path().join("sweep-hit-ratio.svg"));
        assert_eq!(files.paths().len(), 4);
        let series = crate::harness::plot::tests::series_lines;
        let expect = [(&files.ttft_cdf, 4), (&files.hit_ratio, 3)];
        for (path, n) in expect {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{}", path.display());
            assert!(svg.trim_end().ends_with("</svg>"));
            assert_eq!(series(&svg), n, "{}", path.display());
        }
        // kv-centric 1P1D, colocated colocated×2 (round-robin has no rate).
        let goodput = std::fs::read_to_string(dir.path().join("sweep-goodput.svg")).unwrap();
        assert_eq!(series(&goodput), 2);
        let md = std::fs::read_to_string(&files.markdown).unwrap();
        assert!(md.contains("![TTFT CDF](sweep-ttft-cdf.svg)"));
        assert!(md.contains("(sweep-goodput.svg)"));
        assert!(md.contains("(sweep-hit-ratio.svg)"));
    }

    #[test]
    fn write_report_skips_goodput_without_a_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = sample();
        r.runs.truncate(1);
        let files = write_report(&r, &dir.path().join("one.json")).unwrap();
        assert_eq!(files.goodput, None);
        assert!(!dir.path().join("one-goodput.svg").exists());
        let md = std::fs::read_to_string(&files.markdown).unwrap();
        assert!(!md.contains("goodput.svg"));

        r.runs.clear();
        let files = write_report(&r, &dir.path().join("none.json")).unwrap();
        assert!(std::fs::read_to_string(files.ttft_cdf).unwrap().contains("no data"));
        r.runs = vec![empty_run("idle")];
        let files = write_report(&r, &dir.path().join("idle.json")).unwrap();
        assert!(std::fs::read_to_string(files.hit_ratio).unwrap().contains("no data"));
    }

    #[test]
    fn write_report_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(&sample(), &dir.path().join("no-such-dir").join("x.json")).unwrap_err();
        assert!(format!("{err:#}").contains("x-ttft-cdf.svg"), "{err:#}");
        assert!(write_report(&sample(), Path::new("/")).is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(ms(999.4), "999 ms");
        assert_eq!(ms(1000.0), "1.00 s");
        assert_eq!(ms(0.25), "0.25 ms");
        assert_eq!(ms(f64::NAN), "—");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1 << 20), "1.0 MiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400 + 3661), "2000-02-29 01:01:01 UTC");
        assert_eq!(code_span("a `b` c"), "`` a `b` c ``");
        let mut r = empty_run("x");
        r.rate_rps = Some(0.5);
        r.concurrency = Some(4);
        assert_eq!(load(&r), "0.5 rps, c=4");
    }
}
