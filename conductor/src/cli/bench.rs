//! `tandem bench …`: system benchmarks that report ratios against baselines
//! measured in the same run. The work is in the `tandem-bench` crate.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use tandem_bench::kvstore::{self, KvBenchConfig, Stage};
use tandem_bench::serving::{self, ServingBenchConfig};

use super::bench_harness as harness_cli;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Benchmark the KV block store against physical baselines and Redis.
    ///
    /// Four stages, each a ratio against a baseline measured in the same
    /// run (medians of repetitions):
    ///
    /// shm: shm transport read/write GB/s vs a memcpy loop of the same
    /// bytes, 64 KiB to 4 MiB blocks (target >= 0.7).
    ///
    /// tcp: tcp transport read GB/s vs a raw tcp blast on loopback, 1 and
    /// 4 MiB blocks, 1/2/4 stripes (target >= 0.8).
    ///
    /// redis: store put/get throughput and latency vs redis-server, one key
    /// per call, 256 KiB and 2 MiB values, over shm and tcp (targets: get at
    /// least 3x Redis over shm and 1x over tcp), plus where the store's time
    /// goes.
    ///
    /// eviction: hit ratios of every eviction policy replaying the Mooncake
    /// trace at 1k/10k/30k blocks, DRAM only and with SSD, vs LRU's
    /// published numbers, the infinite cache and Belady.
    ///
    /// The store runs in this process; redis-server is started on a free
    /// loopback port and stopped at the end (without it the store numbers
    /// are reported alone). Progress goes to stderr, the table to stdout,
    /// the JSON to bench/results/kvstore.json (or --json).
    ///
    /// Example: tandem bench kvstore --quick --json /tmp/kvstore.json
    Kvstore(KvstoreBenchArgs),
    /// Benchmark the prefill and decode workers with the KV store.
    ///
    /// Two measurements on the tiny test model (f32 KV, blocks of 16
    /// tokens), every server in this process on loopback with an
    /// in-process store (master + one storage node over shm), each a ratio
    /// against a baseline measured in the same run (medians):
    ///
    /// write overlap: time from sending a 2000-token prompt until its
    /// handoff, on a prefill node that writes every new block to the store
    /// layer by layer while the next layer computes vs a node that only
    /// computes (target <= 1.15); also the prefill speed.
    ///
    /// decode TBT: time between tokens of a full decode batch (4 streams)
    /// while the blocks of 16 prefilled 2000-token prompts are fetched from
    /// the store (handed over again in waves until the window covers 20
    /// decode steps) vs quiet windows of the same streams (median and p90,
    /// targets <= 1.2).
    ///
    /// Progress goes to stderr, the table to stdout, the JSON to
    /// bench/results/serving.json (or --json).
    ///
    /// Example: tandem bench serving --quick --json /tmp/serving.json
    Serving(ServingBenchArgs),
    /// Replay a Mooncake trace through a loopback cluster, once per policy.
    ///
    /// Every policy (or deployment) gets a fresh cluster (`tandem up` as a
    /// child process) and the same requests at the same (scaled) times,
    /// sent through the OpenAI API with streaming and measured at the
    /// client: TTFT, TBT, TPOT, e2e (mean, p50, p90, p99), throughput,
    /// goodput under the SLOs, rejections, the cache hit ratio (tokens and
    /// blocks), KV bytes through the store, node utilisation.
    ///
    /// Tokens are synthesised per hash id (the same id always gives the
    /// same tokens), so the store's hits are real. With --compute modeled
    /// the workers replace forward passes by a cost model of an accelerator
    /// (see the README's roofline) and move KV bytes of the modeled size /
    /// --kv-scale through the real store, so the trace runs at its own
    /// lengths; with --compute real the model runs and lengths are scaled
    /// by --tokens-per-block / 512.
    ///
    /// Writes the JSON (schema-versioned), a Markdown report and SVG plots
    /// next to it.
    ///
    /// Example: tandem bench replay --trace fixtures/traces/synthetic_trace.jsonl
    /// --compute modeled --policies kv-centric,random,colocated --max-requests 200
    /// --time-scale 0.5 --json bench/results/replay.json
    Replay(ReplayArgs),
    /// Synthetic load through a loopback cluster; lists sweep.
    ///
    /// Poisson or fixed-rate arrivals (--rates) or a fixed number of
    /// clients (--concurrency), input/output length ranges, shared system
    /// prompts (--prefix-groups) and multi-turn conversations (--turns:
    /// each turn's prompt extends the last with its answer and new user
    /// tokens). Every combination of --rates/--concurrency, --policies and
    /// --deployments is one run on a fresh cluster, measured in the same
    /// invocation: that is the sweep mode.
    ///
    /// Example: tandem bench run --requests 40 --rates 0.5,1,2 --input 128-384
    /// --output 32 --policies kv-centric --deployments 1P1D,colocatedx2
    #[command(visible_alias = "sweep")]
    Run(RunArgs),
    /// Print the deltas between two bench results (matched by run label).
    ///
    /// Example: tandem bench compare before.json after.json
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
pub struct KvstoreBenchArgs {
    /// Fewer, smaller repetitions: finishes well under a minute, noisier.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON result (default: bench/results/kvstore.json).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Run only these stages (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Stage>,
    /// Mooncake trace for the eviction stage.
    #[arg(long, value_name = "FILE", default_value_os_t = kvstore::default_trace())]
    trace: PathBuf,
    /// Directory for segment files (default: /dev/shm, else a temporary directory).
    #[arg(long, value_name = "DIR")]
    shm_dir: Option<PathBuf>,
    /// Concurrent clients of the redis stage (the same for Redis and the store).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    clients: u16,
    /// Timed repetitions per measurement (default: 5 or 7 full, 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=100))]
    reps: Option<u16>,
}

#[derive(Debug, Args)]
pub struct ServingBenchArgs {
    /// Fewer repetitions (2 prefills per node, 2 decode rounds): noisier.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON result (default: bench/results/serving.json).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The model every node serves (its context must exceed 2000 tokens).
    #[arg(long, value_name = "DIR", default_value_os_t = serving::default_model())]
    model: PathBuf,
    /// Directory for segment files (default: /dev/shm, else a temporary directory).
    #[arg(long, value_name = "DIR")]
    shm_dir: Option<PathBuf>,
}

/// What replay and run share: the cluster, compute, SLOs, output.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// real (the model runs) or modeled (a cost model of --profile).
    #[arg(long, default_value = "real", value_parser = ["real", "modeled"])]
    pub(crate) compute: String,
    /// The modeled accelerator and model (with --compute modeled).
    #[arg(long, default_value = "h100-llama3-8b")]
    pub(crate) profile: String,
    /// Modeled KV bytes are divided by this so the run fits in RAM.
    #[arg(long, default_value_t = 256)]
    pub(crate) kv_scale: u32,
    /// The model served (its tokenizer and vocabulary also serve modeled runs).
    #[arg(long, default_value = "smollm2")]
    pub(crate) model: String,
    /// Tokens per KV block (default: 16 real, 512 modeled = the trace's).
    #[arg(long)]
    pub(crate) block_tokens: Option<u32>,
    /// KV dtype of the workers (default: f32 real, bf16 modeled).
    #[arg(long)]
    pub(crate) kv_dtype: Option<String>,
    /// DRAM of the store's one storage node.
    #[arg(long, default_value = "2GiB")]
    pub(crate) store_dram: String,
    /// Store eviction policy (default: the store's).
    #[arg(long)]
    pub(crate) eviction: Option<String>,
    /// KV transfers between processes: shm or tcp.
    #[arg(long, default_value = "shm", value_parser = ["shm", "tcp"])]
    pub(crate) transport: String,
    /// KV pages of each worker.
    #[arg(long, default_value = "512MiB")]
    pub(crate) kv_memory: String,
    /// Turn the prefix cache off: prefill nodes compute every prompt in
    /// full (colocated nodes get no local cache). The baseline of a cache
    /// comparison.
    #[arg(long)]
    pub(crate) no_cache: bool,
    /// Token budget of one forward pass on every worker: prompt chunks
    /// (and, colocated, the decoding sequences) share it. Default: the
    /// nodes' own (512) with real compute; 8192 modeled, vLLM's default
    /// batch budget for an API server.
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub(crate) chunk_tokens: Option<u32>,
    /// TTFT SLO for goodput and attainment (also the conductor's).
    #[arg(long, default_value_t = 10_000.0)]
    pub(crate) slo_ttft_ms: f64,
    /// TBT SLO, applied to each request's TPOT (also the conductor's).
    #[arg(long, default_value_t = 1_000.0)]
    pub(crate) slo_tbt_ms: f64,
    /// A request without its full answer after this long fails.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout_s: u64,
    /// Policies to compare: kv-centric, random, round-robin, least-loaded,
    /// cache-affinity, colocated.
    #[arg(long, value_delimiter = ',', default_value = "kv-centric")]
    pub(crate) policies: Vec<String>,
    /// Deployments: 1P1D, 2P1D, 1P2D..., colocatedx2 (colocated runs use
    /// their decode count of workers).
    #[arg(long, value_delimiter = ',', default_value = "1P1D")]
    pub(crate) deployments: Vec<String>,
    /// Where to write the JSON (the report and plots go next to it).
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// Keep each run's cluster file and logs under this folder.
    #[arg(long, value_name = "DIR")]
    pub(crate) keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A Mooncake trace (JSON lines: timestamp, input_length, output_length, hash_ids).
    #[arg(long, value_name = "FILE")]
    pub(crate) trace: PathBuf,
    /// Send only the first N requests.
    #[arg(long)]
    pub(crate) max_requests: Option<usize>,
    /// Send only requests arriving in the first S seconds (after scaling).
    #[arg(long, value_name = "S")]
    pub(crate) duration: Option<f64>,
    /// Multiply arrival times (0.5: twice the request rate).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) time_scale: f64,
    /// Ignore the timestamps: N clients each send the next request when
    /// their last one finished (closed loop; 1 replays strictly in order).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) concurrency: Option<u32>,
    /// Cut longer prompts to this many tokens (trailing blocks dropped) so
    /// they fit the served context with their output. Default: 131072
    /// (the modeled models' context) minus the output with --compute
    /// modeled; no cut with real compute.
    #[arg(long, value_name = "TOKENS")]
    pub(crate) max_input: Option<u32>,
    /// Multiply output lengths.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) output_scale: f64,
    /// Tokens synthesised per trace block of 512 (default: the block size;
    /// 512 keeps the trace's own lengths).
    #[arg(long)]
    pub(crate) tokens_per_block: Option<u32>,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Requests per run (turns of all conversations).
    #[arg(long, default_value_t = 40)]
    pub(crate) requests: u32,
    /// Offered loads in conversations per second (one run each).
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub(crate) rates: Vec<f64>,
    /// Fixed numbers of concurrent clients (one run each).
    #[arg(long, value_delimiter = ',')]
    pub(crate) concurrency: Vec<u32>,
    /// Arrival process with --rates.
    #[arg(long, default_value = "poisson", value_parser = ["poisson", "fixed"])]
    pub(crate) arrival: String,
    /// New prompt tokens per turn: N or MIN-MAX.
    #[arg(long, default_value = "256")]
    pub(crate) input: String,
    /// Output tokens per turn: N or MIN-MAX.
    #[arg(long, default_value = "32")]
    pub(crate) output: String,
    /// Distinct shared system prompts (0: none).
    #[arg(long, default_value_t = 0)]
    pub(crate) prefix_groups: u32,
    /// Tokens of each system prompt.
    #[arg(long, default_value_t = 0)]
    pub(crate) prefix_tokens: u32,
    /// Turns per conversation.
    #[arg(long, default_value_t = 1)]
    pub(crate) turns: u32,
    /// Pause between an answer and the next turn.
    #[arg(long, default_value_t = 0)]
    pub(crate) think_ms: u64,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The baseline result.
    pub(crate) a: PathBuf,
    /// The result compared with it.
    pub(crate) b: PathBuf,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Replay(args) => harness_cli::replay(args),
        BenchCommand::Run(args) => harness_cli::synthetic(args),
        BenchCommand::Compare(args) => harness_cli::compare(args),
        BenchCommand::Kvstore(args) => {
            let cfg = KvBenchConfig {
                quick: args.quick,
                stages: args.only,
                trace: args.trace,
                shm_dir: args.shm_dir,
                clients: usize::from(args.clients),
                reps: args.reps.map(usize::from),
            };
            let report = kvstore::run(&cfg)?;
            let path = report.write(args.json.as_deref())?;
            finish(&report.table, &path, &report.failed_stages)
        }
        BenchCommand::Serving(args) => {
            let cfg = ServingBenchConfig { quick: args.quick, model: args.model, shm_dir: args.shm_dir };
            let report = serving::run(&cfg)?;
            let path = report.write(args.json.as_deref())?;
            finish(&report.table, &path, &report.failed_stages)
        }
    }
}

/// Prints a report's table and where it was saved; failed stages fail the
/// command.
fn finish(table: &str, saved: &std::path::Path, failed: &[String]) -> anyhow::Result<()> {
    print!("{table}");
    eprintln!("wrote {}", saved.display());
    if !failed.is_empty() {
        bail!("stages failed: {} (see the report)", failed.join(", "));
    }
    Ok(())
}
