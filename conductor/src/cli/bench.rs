//! `tandem bench …`: system benchmarks that report ratios against baselines
//! measured in the same run. The work is in the `tandem-bench` crate.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use tandem_bench::kvstore::{self, KvBenchConfig, Stage};
use tandem_bench::serving::{self, ServingBenchConfig};

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

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
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
