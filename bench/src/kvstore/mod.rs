//! `tandem bench kvstore`: the KV store against physical baselines and
//! Redis, every number a ratio to a baseline measured in the same run
//! (medians of repetitions).
//!
//! - [`shm`] — stage 1: shm transport vs `memcpy` of the same bytes.
//! - [`tcp`] — stage 2: tcp transport vs a raw tcp blast on loopback.
//! - [`versus`] — stage 3: the store (in this process) vs `redis-server`,
//!   one key per call at the same concurrency; [`workers`] are the client
//!   tasks, [`breakdown`] times each phase of one call, [`cluster`] starts
//!   the in-process store and [`redis`] the Redis server and client.
//! - [`eviction`] — stage 4: policies replaying the Mooncake trace vs the
//!   README's LRU numbers, the infinite cache and Belady.
//! - [`report`] — the ratio table and the JSON result file.
//! - [`sys`] — shared memory location, CPU time, load, small helpers.

pub mod breakdown;
pub mod cluster;
pub mod eviction;
pub mod redis;
pub mod report;
pub mod shm;
pub mod sys;
pub mod tcp;
pub mod versus;
pub mod workers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use bytesize::ByteSize;
use tandem_kvstore::transport::TcpConfig;

pub use report::Report;

/// The stages of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// shm transport vs memcpy.
    Shm,
    /// tcp transport vs raw tcp.
    Tcp,
    /// store vs Redis (and where the store's time goes).
    Redis,
    /// eviction policies on the Mooncake trace.
    Eviction,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Shm, Stage::Tcp, Stage::Redis, Stage::Eviction];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Shm => "shm",
            Stage::Tcp => "tcp",
            Stage::Redis => "redis",
            Stage::Eviction => "eviction",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct KvBenchConfig {
    /// Fewer and smaller repetitions: well under a minute, noisier.
    pub quick: bool,
    /// Stages to run; empty = all.
    pub stages: Vec<Stage>,
    /// The Mooncake trace of stage 4.
    pub trace: PathBuf,
    /// Where segment files go; `None` = `/dev/shm`, or a temporary
    /// directory when that is not usable.
    pub shm_dir: Option<PathBuf>,
    /// Concurrent clients of stage 3.
    pub clients: usize,
    /// Timed repetitions of every stage (`None` = 7/7/5 full, 3 quick).
    pub reps: Option<usize>,
}

impl Default for KvBenchConfig {
    fn default() -> Self {
        KvBenchConfig {
            quick: false,
            stages: Vec::new(),
            trace: default_trace(),
            shm_dir: None,
            clients: 8,
            reps: None,
        }
    }
}

/// `fixtures/traces/synthetic_trace.jsonl` of this source tree.
pub fn default_trace() -> PathBuf {
    let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
    bench.parent().unwrap_or(bench).join("fixtures/traces/synthetic_trace.jsonl")
}

/// The settings of every stage for `cfg`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub shm: shm::ShmSettings,
    pub tcp: tcp::TcpSettings,
    pub versus: versus::VersusSettings,
}

impl Settings {
    pub fn for_config(cfg: &KvBenchConfig) -> Settings {
        let reps = |full: usize, quick: usize| cfg.reps.unwrap_or(if cfg.quick { quick } else { full }).max(1);
        let q = cfg.quick;
        Settings {
            shm: shm::ShmSettings {
                region_bytes: if q { 64 << 20 } else { 256 << 20 },
                batch_bytes: 16 << 20,
                block_sizes: vec![64 << 10, 256 << 10, 1 << 20, 4 << 20],
                reps: reps(7, 3),
            },
            tcp: tcp::TcpSettings {
                batch_bytes: 64 << 20,
                batches_per_rep: if q { 1 } else { 2 },
                block_sizes: vec![1 << 20, 4 << 20],
                stripes: vec![1, 2, 4],
                socket_buffers: vec![TcpConfig::default().socket_buffer_bytes.as_u64(), 0],
                reps: reps(7, 3),
            },
            versus: versus::VersusSettings {
                value_sizes: vec![256 << 10, 2 << 20],
                clients: cfg.clients.max(1),
                rep_bytes: if q { 64 << 20 } else { 384 << 20 },
                get_set_bytes: if q { 32 << 20 } else { 128 << 20 },
                reps: reps(5, 3),
                dram: if q { ByteSize::mib(512) } else { ByteSize::gib(1) },
                breakdown_ops: if q { 30 } else { 200 },
                redis_benchmark: !q,
                redis_benchmark_bytes: 512 << 20,
            },
        }
    }
}

/// What ran, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    pub shm: Option<Vec<shm::ShmPoint>>,
    pub tcp: Option<tcp::TcpResult>,
    pub versus: Option<versus::VersusResult>,
    pub eviction: Option<eviction::EvictionResult>,
    /// Stage name → why it failed.
    pub errors: Vec<(&'static str, String)>,
    pub notes: Vec<String>,
    pub shm_dir: PathBuf,
    pub load_before: Option<[f64; 3]>,
    pub load_after: Option<[f64; 3]>,
    pub secs: f64,
    /// CPU seconds the whole machine was busy during the bench and this
    /// process's share of it (with its children: redis-server,
    /// redis-benchmark); the rest is other work that competed with it.
    pub machine_busy_cpu_secs: Option<f64>,
    pub bench_cpu_secs: f64,
    pub other_cpu_secs: Option<f64>,
}

/// Runs the selected stages on a tokio runtime of its own. A stage that
/// fails is recorded in the report and the others still run; only a bench
/// that cannot start at all is an error.
pub fn run(cfg: &KvBenchConfig) -> anyhow::Result<Report> {
    let settings = Settings::for_config(cfg);
    let stages: Vec<Stage> = if cfg.stages.is_empty() { Stage::ALL.to_vec() } else { cfg.stages.clone() };
    let shm_dir = sys::ShmDir::pick(cfg.shm_dir.as_deref())?;
    let work = tempfile::tempdir().context("creating a working directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let mut out = Outcome { shm_dir: shm_dir.path.clone(), load_before: sys::load_average(), ..Outcome::default() };
    if let Some(note) = &shm_dir.note {
        eprintln!("[kvstore bench] note: {note}");
        out.notes.push(note.clone());
    }
    let start = Instant::now();
    let bench_cpu = || sys::self_cpu_secs() + sys::children_cpu_secs();
    let (busy_before, bench_before) = (sys::machine_busy_secs(), bench_cpu());
    for (i, stage) in stages.iter().enumerate() {
        eprintln!("[kvstore bench] stage {}/{}: {}", i + 1, stages.len(), describe(*stage));
        let result = match stage {
            Stage::Shm => runtime.block_on(shm::run(&settings.shm, &shm_dir.path)).map(|r| out.shm = Some(r)),
            Stage::Tcp => {
                // On a worker, where a node's store client runs (see `tcp`).
                let (tcp_settings, dir) = (settings.tcp.clone(), shm_dir.path.clone());
                runtime
                    .block_on(runtime.spawn(async move { tcp::run(&tcp_settings, &dir).await }))
                    .context("the tcp stage's task")
                    .and_then(|r| r)
                    .map(|r| out.tcp = Some(r))
            }
            Stage::Redis => runtime
                .block_on(versus::run(&settings.versus, &shm_dir.path, work.path()))
                .map(|r| out.versus = Some(r)),
            Stage::Eviction => eviction::run(&cfg.trace).map(|r| out.eviction = Some(r)),
        };
        if let Err(e) = result {
            eprintln!("[kvstore bench] stage {} failed: {e:#}", stage.name());
            out.errors.push((stage.name(), format!("{e:#}")));
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    out.load_after = sys::load_average();
    out.bench_cpu_secs = bench_cpu() - bench_before;
    let (busy, other, note) = sys::other_cpu("kvstore", out.secs, busy_before, out.bench_cpu_secs);
    (out.machine_busy_cpu_secs, out.other_cpu_secs) = (busy, other);
    out.notes.extend(note);
    drop(runtime);
    Ok(report::build(cfg, &settings, out))
}

fn describe(stage: Stage) -> &'static str {
    match stage {
        Stage::Shm => "shm transport vs memcpy",
        Stage::Tcp => "tcp transport vs raw tcp on loopback",
        Stage::Redis => "store vs redis (one key per call)",
        Stage::Eviction => "eviction policies on the Mooncake trace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stage at toy sizes: the code paths (and their built-in
    /// round-trip checks) work and the report has its line items. Speed
    /// is not asserted; Redis is used when installed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_stage_runs_at_toy_size_and_reports_its_items() {
        let cfg = KvBenchConfig { quick: true, ..KvBenchConfig::default() };
        let mut settings = Settings::for_config(&cfg);
        settings.shm = shm::ShmSettings {
            region_bytes: 4 << 20,
            batch_bytes: 1 << 20,
            block_sizes: vec![64 << 10, 1 << 20],
            reps: 1,
        };
        settings.tcp = tcp::TcpSettings {
            batch_bytes: 4 << 20,
            batches_per_rep: 1,
            block_sizes: vec![1 << 20],
            stripes: vec![1, 2],
            socket_buffers: vec![4 << 20, 0],
            reps: 1,
        };
        settings.versus = versus::VersusSettings {
            value_sizes: vec![64 << 10],
            clients: 2,
            rep_bytes: 1 << 20,
            get_set_bytes: 1 << 20,
            reps: 1,
            dram: ByteSize::mib(64),
            breakdown_ops: 3,
            redis_benchmark: false,
            redis_benchmark_bytes: 0,
        };
        let dir = sys::ShmDir::pick(None).unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut out = Outcome { shm_dir: dir.path.clone(), ..Outcome::default() };
        out.shm = Some(shm::run(&settings.shm, &dir.path).await.unwrap());
        out.tcp = Some(tcp::run(&settings.tcp, &dir.path).await.unwrap());
        let v = versus::run(&settings.versus, &dir.path, work.path()).await.unwrap();
        let with_redis = v.redis_unavailable.is_none();
        out.versus = Some(v);
        out.eviction = Some(tokio::task::spawn_blocking(|| eviction::run(&default_trace())).await.unwrap().unwrap());

        let report = report::build(&cfg, &settings, out);
        let ratios = &report.json["ratios"];
        for key in ["shm_read_vs_memcpy_64k", "shm_write_vs_memcpy_1m", "tcp_read_vs_raw_tcp_1m"] {
            assert!(ratios[key].as_f64().is_some_and(|r| r > 0.0), "{key}: {}", ratios[key]);
        }
        assert_eq!(report.json["tcp"]["result"]["runs"].as_array().map(Vec::len), Some(4));
        assert!(ratios["tcp_read_vs_raw_tcp_1m_autotuned_buffers"].as_f64().is_some());
        let workloads = report.json["store_vs_redis"]["result"]["workloads"].as_array().unwrap();
        assert!(workloads.iter().any(|w| w["system"] == "store_shm" && w["op"] == "get"));
        if with_redis {
            assert!(ratios["get_vs_redis_shm_64k"].as_f64().is_some_and(|r| r > 0.0));
        }
        assert_eq!(report.json["checks"]["lru_reproduces_readme"], true);
        assert!(report.failed_stages.is_empty());
        assert!(report.table.contains("shm_read_vs_memcpy_64k"));
    }
}
