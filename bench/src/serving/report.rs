//! The serving bench's report: each ratio with its target (an upper
//! bound: the cost of the store on the worker's critical path), the raw
//! numbers behind them, the machine and the settings — as a printed table
//! and as JSON.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::overlap::OverlapResult;
use super::tbt::TbtResult;
use super::{Outcome, ServingBenchConfig, Settings};
use crate::stats;

/// Version of the JSON layout.
const SCHEMA: &str = "tandem-bench-serving/1";
/// Prefill wall time with layer-wise store writes vs compute only.
const OVERLAP_TARGET: f64 = 1.15;
/// Decode TBT (median and p90) while other requests are fetched vs quiet.
const TBT_TARGET: f64 = 1.2;

/// One line of the ratio table.
#[derive(Debug, Clone)]
struct Item {
    key: &'static str,
    value: f64,
    /// The most the ratio may be.
    target_max: Option<f64>,
    detail: String,
}

impl Item {
    fn met(&self) -> Option<bool> {
        self.target_max.map(|t| self.value <= t)
    }
}

pub use crate::stats::Report;

/// The report of a finished run.
pub(crate) fn build(cfg: &ServingBenchConfig, settings: &Settings, out: Outcome) -> Report {
    let mut items = Vec::new();
    if let Some(o) = &out.overlap {
        items.push(overlap_item(o, settings));
    }
    if let Some(t) = &out.tbt {
        items.extend(tbt_items(t));
    }
    let targeted: Vec<&Item> = items.iter().filter(|i| i.target_max.is_some()).collect();
    let targets_met = targeted.iter().filter(|i| i.met() == Some(true)).count();
    let targets_total = targeted.len();
    let mut notes = out.notes.clone();
    notes.extend(standard_notes(settings));
    if let Some(t) = &out.tbt {
        notes.extend(t.notes.iter().cloned());
    }
    let table = render(cfg, settings, &out, &items, targets_met, targets_total);
    let json = to_json(cfg, settings, &out, &items, (targets_met, targets_total), notes);
    Report {
        json,
        table,
        failed_stages: out.errors.iter().map(|(s, _)| (*s).to_owned()).collect(),
        targets_met,
        targets_total,
        file_name: "serving.json",
    }
}

fn overlap_item(o: &OverlapResult, settings: &Settings) -> Item {
    let s = &settings.overlap;
    Item {
        key: "prefill_with_layerwise_writes_vs_compute_only",
        value: o.wall_ratio,
        target_max: Some(OVERLAP_TARGET),
        detail: format!(
            "{}-token prompt to handoff: {:.1} vs {:.1} ms (medians of {}), {} blocks ({:.1} MiB) stored per prompt",
            s.prompt_tokens,
            o.with_writes_wall_ms,
            o.compute_only_wall_ms,
            s.reps,
            o.blocks_stored_per_run,
            o.bytes_stored_per_run as f64 / (1 << 20) as f64
        ),
    }
}

fn tbt_items(t: &TbtResult) -> [Item; 4] {
    let fetched: u64 = t.rounds.iter().map(|r| r.fetched_blocks).sum();
    let windows = t.rounds.len();
    [
        Item {
            key: "decode_tbt_p50_prefetch_vs_quiet",
            value: t.p50_ratio,
            target_max: Some(TBT_TARGET),
            detail: format!(
                "{:.3} vs {:.3} ms; {windows} prefetch windows of {:.1} ms (median), >= {} steps, {} blocks fetched in all",
                t.prefetch_tbt_p50_ms, t.quiet_tbt_p50_ms, t.prefetch_window_ms, t.prefetch_window_steps_min, fetched
            ),
        },
        Item {
            key: "decode_tbt_p90_prefetch_vs_quiet",
            value: t.p90_ratio,
            target_max: Some(TBT_TARGET),
            detail: format!("{:.3} vs {:.3} ms", t.prefetch_tbt_p90_ms, t.quiet_tbt_p90_ms),
        },
        Item {
            key: "decode_tbt_mean_prefetch_vs_quiet",
            value: t.mean_ratio,
            target_max: None,
            detail: format!("{:.2} vs {:.2} ms", t.prefetch_tbt_mean_ms, t.quiet_tbt_mean_ms),
        },
        Item {
            key: "decode_step_prefetch_vs_quiet",
            value: t.step_ratio,
            target_max: None,
            detail: format!(
                "{:.2} vs {:.2} ms per step (window length / steps, the node's view){}",
                t.prefetch_step_ms,
                t.quiet_step_ms,
                if t.bursty_delivery { "; tokens arrive in bursts, see the notes" } else { "" }
            ),
        },
    ]
}

fn standard_notes(settings: &Settings) -> Vec<String> {
    let t = &settings.tbt;
    vec![
        "Everything runs in this process on loopback: the store's master and one storage node (shm transport), \
         the prefill nodes, the decode node and their gRPC clients share one tokio runtime; the model's compute \
         runs on the engines' threads and the global rayon pool. Times are client side."
            .to_owned(),
        "write overlap: both prefill nodes have the store attached and look up the cached prefix (always empty: \
         every prompt is new); only one writes. A run is timed from sending the request (empty decode_addr) to \
         the Handoff event, which the writing node sends only after the store committed the blocks. Runs \
         alternate between the nodes; ratio = median with writes / median without. tokens/s = computed tokens \
         / the node's prefill time (admission to finish); *_forward_tokens_per_s counts forward passes alone."
            .to_owned(),
        format!(
            "decode TBT: {} streams of {}-token prompts decode without stop ids (a full batch: max_batch {}). \
             Each round times a quiet window of {} decode steps, then a prefetch window: {} prompts of {} tokens \
             (prefilled beforehand, blocks in the store) are handed to the decode node at once (a wave); when all \
             their blocks are fetched (the node's store client counted the hits) and fewer than {} decode steps \
             have passed, the next wave hands them over again and cancels the previous one (fetched, waiting: \
             they cannot join the full batch), up to {} waves. The window ends when the last wave is waiting in \
             the node, every fetch done; it is cancelled and the next round starts. TBT = gap between consecutive tokens of one running \
             stream ending at a token the engine produced in the window (each step gives every running stream one \
             token, so a window of n steps owns each stream's next n tokens from when it opened, however late \
             they are delivered: tokens held up and then delivered in a burst count as one long gap and several \
             near-zero ones, which is why p90 has a target too); p50/p90/mean over every gap of every window of \
             a kind. Blocks fetched = the decode node's store client hits in the window.",
            t.max_batch,
            t.short_prompt_tokens,
            t.max_batch,
            t.quiet_steps,
            t.long_prompts,
            t.long_prompt_tokens,
            t.min_window_steps,
            t.max_waves
        ),
    ]
}

fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1e4).round() / 1e4)
    } else {
        Value::Null
    }
}

fn to_json(
    cfg: &ServingBenchConfig,
    settings: &Settings,
    out: &Outcome,
    items: &[Item],
    (met, total): (usize, usize),
    notes: Vec<String>,
) -> Value {
    let mut ratios = Map::new();
    let mut targets = Map::new();
    for i in items {
        ratios.insert(i.key.to_owned(), round(i.value));
        if let (Some(t), Some(ok)) = (i.target_max, i.met()) {
            targets.insert(i.key.to_owned(), json!({ "target_max": t, "value": round(i.value), "met": ok }));
        }
    }
    let mut machine = stats::machine();
    if let Value::Object(m) = &mut machine {
        m.insert("load_average_before".into(), json!(out.load_before));
        m.insert("load_average_after".into(), json!(out.load_after));
        m.insert("machine_busy_cpu_secs".into(), json!(out.machine_busy_cpu_secs.map(round)));
        m.insert("bench_cpu_secs".into(), round(out.bench_cpu_secs));
        m.insert("other_processes_cpu_secs".into(), json!(out.other_cpu_secs.map(round)));
    }
    let errors: Map<String, Value> = out.errors.iter().map(|(s, e)| ((*s).to_owned(), json!(e))).collect();
    json!({
        "bench": "serving",
        "schema": SCHEMA,
        "mode": if cfg.quick { "quick" } else { "full" },
        "ratios": ratios,
        "targets": targets,
        "targets_met": met,
        "targets_total": total,
        "errors": errors,
        "write_overlap": out.overlap.as_ref().map(|o| json!({ "settings": settings.overlap, "result": o })),
        "decode_tbt": out.tbt.as_ref().map(|t| json!({ "settings": settings.tbt, "result": t })),
        "machine": machine,
        "settings": {
            "quick": cfg.quick,
            "model": stats::repo_relative(&cfg.model),
            "block_tokens": settings.block_tokens,
            "kv_dtype": settings.kv_dtype,
            "store_dram": settings.store_dram.to_string(),
            "transport": settings.transport,
            "shm_dir": out.shm_dir.display().to_string(),
            "tokio_worker_threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "seconds": round(out.secs),
        },
        "notes": notes,
    })
}

fn render(
    cfg: &ServingBenchConfig,
    settings: &Settings,
    out: &Outcome,
    items: &[Item],
    met: usize,
    total: usize,
) -> String {
    let mut s = String::new();
    let load = |l: Option<[f64; 3]>| l.map_or("?".to_owned(), |l| format!("{:.2}", l[0]));
    let other = out.other_cpu_secs.map_or("?".to_owned(), |o| format!("{o:.1}"));
    let model = cfg.model.file_name().map_or_else(|| cfg.model.display().to_string(), |n| n.to_string_lossy().into());
    let _ = writeln!(
        s,
        "serving bench ({}), {:.0} s, load {} -> {} (1 min), other processes' CPU {} s",
        if cfg.quick { "quick" } else { "full" },
        out.secs,
        load(out.load_before),
        load(out.load_after),
        other
    );
    let _ = writeln!(
        s,
        "{model}, {} KV in blocks of {} tokens; store: master + one node over {} ({} DRAM)",
        settings.kv_dtype, settings.block_tokens, settings.transport, settings.store_dram
    );
    let _ = writeln!(s, "\n{:<46} {:>7}  {:>8}  {:<3} details", "ratio", "value", "target", "met");
    for i in items {
        let target = i.target_max.map_or(String::new(), |t| format!("<= {t}"));
        let met = match i.met() {
            Some(true) => "✔",
            Some(false) => "✘",
            None => "",
        };
        let _ = writeln!(s, "{:<46} {:>7.3}  {:>8}  {:<3} {}", i.key, i.value, target, met, i.detail);
    }
    if let Some(o) = &out.overlap {
        let _ = writeln!(
            s,
            "\nprefill speed (computed tokens / node prefill time): with writes {:.0} tok/s, compute only {:.0} tok/s \
             (forward passes alone: {:.0} and {:.0} tok/s)",
            o.with_writes_tokens_per_s,
            o.compute_only_tokens_per_s,
            o.with_writes_forward_tokens_per_s,
            o.compute_only_forward_tokens_per_s
        );
    }
    if let Some(t) = &out.tbt {
        let _ = writeln!(
            s,
            "\ndecode windows, TBT in ms: quiet, then while waves of {} prompts of {} blocks x {} KiB are fetched \
             (long prefill {:.1} ms median):",
            settings.tbt.long_prompts,
            t.blocks_per_long_prompt,
            t.block_bytes >> 10,
            t.long_prefill_ms
        );
        let _ = writeln!(
            s,
            "  {:<5} | {:>8} {:>5} {:>6} {:>5} {:>6} {:>6} {:>6} | {:>8} {:>5} {:>6} {:>5} {:>6} {:>6} {:>6} {:>7} {:>5} {:>5}",
            "round",
            "quiet ms",
            "steps",
            "step",
            "gaps",
            "p50",
            "p90",
            "mean",
            "fetch ms",
            "steps",
            "step",
            "gaps",
            "p50",
            "p90",
            "mean",
            "blocks",
            "waves",
            "GB/s"
        );
        for (i, r) in t.rounds.iter().enumerate() {
            let (q, p) = (&r.quiet, &r.prefetch);
            let _ = writeln!(
                s,
                "  {:<5} | {:>8.1} {:>5} {:>6.2} {:>5} {:>6.2} {:>6.2} {:>6.2} | {:>8.1} {:>5} {:>6.2} {:>5} {:>6.2} {:>6.2} {:>6.2} {:>7} {:>5} {:>5.2}",
                i + 1,
                q.ms,
                q.steps,
                q.step_ms,
                q.gaps,
                q.tbt_p50_ms,
                q.tbt_p90_ms,
                q.tbt_mean_ms,
                p.ms,
                p.steps,
                p.step_ms,
                p.gaps,
                p.tbt_p50_ms,
                p.tbt_p90_ms,
                p.tbt_mean_ms,
                r.fetched_blocks,
                r.waves,
                r.fetch_gbps
            );
        }
        for note in &t.notes {
            let _ = writeln!(s, "  note: {note}");
        }
        let _ = writeln!(s, "  (step = window ms / decode steps; p50/p90/mean = inter-token gaps at the client)");
    }
    for (stage, e) in &out.errors {
        let _ = writeln!(s, "stage {stage} FAILED: {e}");
    }
    let _ = writeln!(s, "\ntargets met: {met} of {total}");
    s
}
