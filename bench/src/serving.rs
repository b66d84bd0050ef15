//! `tandem bench serving`: prefill and decode nodes with the KV store, all
//! in this process on loopback, each number a ratio to a baseline measured
//! in the same run (medians).
//!
//! - [`overlap`] — stage 1: a prefill node writing every new block to the
//!   store layer by layer while the next layer computes, against a node
//!   that only computes (wall time until the handoff).
//! - [`tbt`] — stage 2: the time between tokens of a running decode batch
//!   while other requests' blocks are fetched from the store (prefetch),
//!   against quiet windows of the same streams.
//! - [`nodes`] — starting the store and the workers, prompts, gRPC calls.
//! - [`report`] — the ratio table and the JSON result file.

pub mod nodes;
pub mod overlap;
pub mod report;
pub mod tbt;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use bytesize::ByteSize;
use serde::Serialize;

use crate::kvstore::sys;
pub use report::Report;

/// What to run.
#[derive(Debug, Clone)]
pub struct ServingBenchConfig {
    /// Fewer repetitions: about a minute, noisier.
    pub quick: bool,
    /// The model every node serves (a Hugging Face directory or GGUF file).
    pub model: PathBuf,
    /// Where segment files go; `None` = `/dev/shm`, or a temporary
    /// directory when that is not usable.
    pub shm_dir: Option<PathBuf>,
}

impl Default for ServingBenchConfig {
    fn default() -> Self {
        ServingBenchConfig { quick: false, model: default_model(), shm_dir: None }
    }
}

/// `fixtures/tiny-llama-bf16` of this source tree.
pub fn default_model() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).join("fixtures/tiny-llama-bf16")
}

/// The settings of both stages for a config.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub block_tokens: usize,
    pub kv_dtype: &'static str,
    pub store_dram: ByteSize,
    pub transport: &'static str,
    pub overlap: overlap::OverlapSettings,
    pub tbt: tbt::TbtSettings,
}

impl Settings {
    pub fn for_config(cfg: &ServingBenchConfig) -> Settings {
        let q = cfg.quick;
        Settings {
            block_tokens: 16,
            kv_dtype: nodes::KV_DTYPE.name(),
            store_dram: ByteSize::gib(1),
            transport: "shm",
            overlap: overlap::OverlapSettings { prompt_tokens: 2000, chunk_tokens: 512, reps: if q { 2 } else { 5 } },
            // The decode node paces prefetch (`prefetch_duty`, 0.2 by
            // default) while its batch decodes: a wave of 4 prompts of 2000
            // tokens (500 blocks, 15.6 MiB) then spans ~70 decode steps on a
            // 2-core machine; waves repeat until a window has 20 steps.
            // Running streams may take 2000 tokens (the tiny model's
            // context is 2048), room for every round's windows.
            tbt: tbt::TbtSettings {
                max_batch: 4,
                long_prompts: 4,
                long_prompt_tokens: 2000,
                short_prompt_tokens: 32,
                max_tokens: 2000,
                warmup_steps: 8,
                quiet_steps: 40,
                rounds: if q { 2 } else { 5 },
                min_window_steps: 20,
                max_waves: 8,
            },
        }
    }
}

/// What ran, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    pub overlap: Option<overlap::OverlapResult>,
    pub tbt: Option<tbt::TbtResult>,
    /// Stage name → why it failed.
    pub errors: Vec<(&'static str, String)>,
    pub notes: Vec<String>,
    pub shm_dir: PathBuf,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub secs: f64,
    /// CPU seconds the whole machine was busy during the bench, and the
    /// part other processes used.
    pub machine_busy_cpu_secs: Option<f64>,
    pub bench_cpu_secs: f64,
    pub other_cpu_secs: Option<f64>,
}

/// Runs both stages on a tokio runtime of its own. A stage that fails is
/// recorded in the report and the other still runs; only a bench that
/// cannot start (no model, no store) is an error.
pub fn run(cfg: &ServingBenchConfig) -> anyhow::Result<Report> {
    let settings = Settings::for_config(cfg);
    let shm_dir = sys::ShmDir::pick(cfg.shm_dir.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let mut out = Outcome { shm_dir: shm_dir.path.clone(), load_before: sys::load_average(), ..Outcome::default() };
    if let Some(note) = &shm_dir.note {
        eprintln!("[serving bench] note: {note}");
        out.notes.push(note.clone());
    }
    let start = Instant::now();
    let (busy_before, bench_before) = (sys::machine_busy_secs(), sys::self_cpu_secs());
    runtime.block_on(run_stages(cfg, &settings, &shm_dir.path, &mut out))?;
    drop(runtime);
    out.secs = start.elapsed().as_secs_f64();
    out.load_after = sys::load_average();
    out.bench_cpu_secs = sys::self_cpu_secs() - bench_before;
    let (busy, other, note) = sys::other_cpu("serving", out.secs, busy_before, out.bench_cpu_secs);
    (out.machine_busy_cpu_secs, out.other_cpu_secs) = (busy, other);
    out.notes.extend(note);
    Ok(report::build(cfg, &settings, out))
}

/// Starts the store, runs the stages with the nodes each needs, and shuts
/// everything down whether or not a stage failed.
async fn run_stages(
    cfg: &ServingBenchConfig,
    settings: &Settings,
    shm_dir: &Path,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    eprintln!("[serving bench] starting the store (master + one storage node, {} DRAM)", settings.store_dram);
    let store = nodes::StoreNode::start(shm_dir, settings.store_dram).await.context("starting the in-process store")?;
    let stages = async {
        eprintln!("[serving bench] stage 1/2: prefill with layer-wise store writes vs compute only");
        let writer = nodes::PrefillNode::start("prefill-writes", &cfg.model, settings, true, &store).await?;
        let result = async {
            let baseline = nodes::PrefillNode::start("prefill-compute", &cfg.model, settings, false, &store).await?;
            let r = overlap::run(&settings.overlap, &writer, &baseline).await;
            baseline.shutdown().await;
            r
        }
        .await;
        match result {
            Ok(r) => out.overlap = Some(r),
            Err(e) => stage_failed(out, "write_overlap", e),
        }

        eprintln!("[serving bench] stage 2/2: decode TBT, quiet vs while other requests' blocks are fetched");
        let result = async {
            let decode = nodes::DecodeNode::start("decode-tbt", &cfg.model, settings, &store).await?;
            let r = tbt::run(&settings.tbt, &writer, &decode).await;
            decode.shutdown().await;
            r
        }
        .await;
        match result {
            Ok(r) => out.tbt = Some(r),
            Err(e) => stage_failed(out, "decode_tbt", e),
        }
        writer.shutdown().await;
        anyhow::Ok(())
    }
    .await;
    store.shutdown().await;
    stages
}

fn stage_failed(out: &mut Outcome, stage: &'static str, e: anyhow::Error) {
    eprintln!("[serving bench] stage {stage} failed: {e:#}");
    out.errors.push((stage, format!("{e:#}")));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both stages at toy sizes against the tiny model: the servers start
    /// and stop, the built-in checks hold (fresh prompts, blocks stored and
    /// fetched, a full batch) and the report has its line items. Speed is
    /// not asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_stages_run_at_toy_size_and_report_their_items() {
        let cfg = ServingBenchConfig { quick: true, ..ServingBenchConfig::default() };
        let mut settings = Settings::for_config(&cfg);
        settings.store_dram = ByteSize::mib(64);
        settings.overlap = overlap::OverlapSettings { prompt_tokens: 64, chunk_tokens: 32, reps: 1 };
        settings.tbt = tbt::TbtSettings {
            max_batch: 2,
            long_prompts: 2,
            long_prompt_tokens: 100,
            short_prompt_tokens: 32,
            max_tokens: 400,
            warmup_steps: 2,
            quiet_steps: 5,
            rounds: 1,
            min_window_steps: 1,
            max_waves: 3,
        };
        let dir = sys::ShmDir::pick(None).unwrap();
        let mut out = Outcome { shm_dir: dir.path.clone(), ..Outcome::default() };
        run_stages(&cfg, &settings, &dir.path, &mut out).await.unwrap();
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let o = out.overlap.as_ref().unwrap();
        assert!(o.runs.iter().all(|r| r.computed_tokens == 64));
        assert!(o.runs.iter().filter(|r| r.store_writes).all(|r| r.stored_blocks == 4));
        let t = out.tbt.as_ref().unwrap();
        let round = &t.rounds[0];
        assert_eq!(round.fetched_blocks, round.waves as u64 * 2 * 6);
        assert!(round.quiet.steps >= 5);

        let report = report::build(&cfg, &settings, out);
        let ratios = &report.json["ratios"];
        for key in ["prefill_with_layerwise_writes_vs_compute_only", "decode_step_prefetch_vs_quiet"] {
            assert!(ratios[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {}", ratios[key]);
        }
        // Null when tokens arrived in bursts (a median gap of zero).
        assert!(ratios.get("decode_tbt_p50_prefetch_vs_quiet").is_some());
        assert_eq!(report.targets_total, 3);
        assert!(report.failed_stages.is_empty());
        assert!(report.table.contains("decode_tbt_p90_prefetch_vs_quiet"));
    }
}
