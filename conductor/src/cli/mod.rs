//! The `tandem` command line: one module per subcommand, each a thin layer
//! over the crate that does the work.

mod bench;
mod bench_harness;
mod check;
pub mod cluster;
mod conductor;
mod ctl;
mod generate;
pub mod kvstore;
mod model;
mod remote;
mod up;
mod worker;

use clap::{Parser, Subcommand};

/// Tandem serves large language models with prefill and decode
/// disaggregated over a shared KV-cache store.
///
/// Start a local cluster:  tandem up   (then use http://127.0.0.1:8000/v1)
/// Run a model locally:   tandem generate --model smollm2 --chat --prompt "Hi!"
/// Fetch a known model:   tandem model fetch smollm2
/// Run a KV store:        tandem kvstore master --config etc/cluster.toml
/// Run workers:           tandem prefill --config etc/cluster.toml --node prefill-0
/// Benchmark the store:   tandem bench kvstore --quick
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// Log filter (e.g. `info`, `tandem_model=debug`); also `RUST_LOG`.
    #[arg(long, global = true, env = "TANDEM_LOG", default_value = "warn")]
    pub log: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text with a model in this process (no cluster): streams
    /// tokens and reports prefill and decode speed.
    Generate(Box<generate::GenerateArgs>),
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run and inspect the KV block store (master, storage nodes, keys).
    #[command(subcommand)]
    Kvstore(kvstore::KvstoreCommand),
    /// Run a prefill node of a cluster file: computes prompts, writes their
    /// KV blocks to the store layer by layer, hands off to decode nodes.
    ///
    /// Example: tandem prefill --config etc/cluster.toml --node prefill-0
    Prefill(worker::WorkerArgs),
    /// Run a decode node of a cluster file: takes handoffs, fetches their
    /// blocks from the store and streams tokens from a continuous batch.
    ///
    /// Example: tandem decode --config etc/cluster.toml --node decode-0
    Decode(worker::WorkerArgs),
    /// Start a whole cluster on this machine (store master, storage node,
    /// prefill and decode workers, conductor; each a child process) and
    /// serve the OpenAI API until Ctrl-C.
    ///
    /// Example: tandem up --http-port 8000 --model smollm2
    Up(up::UpArgs),
    /// Run the conductor of a cluster file: the OpenAI-compatible HTTP API
    /// (`/v1/chat/completions`, `/v1/completions`, `/v1/models`), `/metrics`,
    /// `/health`, `/ready`, and the scheduler that places each request on a
    /// prefill and a decode node (or refuses it early with 429).
    ///
    /// Example: tandem conductor --config etc/cluster.toml
    Conductor(conductor::ConductorArgs),
    /// Operate a running conductor through its admin API: nodes and their
    /// load, drain and undrain, requests in flight, the KV cache, the
    /// scheduling policy and SLOs.
    ///
    /// Example: tandem ctl --config etc/cluster.toml nodes
    Ctl(ctl::CtlArgs),
    /// Validate a cluster file (every section, names, addresses, sizes)
    /// without starting anything, and list its nodes.
    ///
    /// Example: tandem check-config --config etc/cluster.toml
    CheckConfig(check::CheckArgs),
    /// Benchmarks reported as ratios against same-run baselines.
    #[command(subcommand)]
    Bench(Box<bench::BenchCommand>),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing(&cli.log);
    match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Model(cmd) => model::run(cmd),
        Command::Kvstore(cmd) => kvstore::run(cmd),
        Command::Prefill(args) => worker::run_prefill(args),
        Command::Decode(args) => worker::run_decode(args),
        Command::Up(args) => up::run(args),
        Command::Conductor(args) => conductor::run(args),
        Command::Ctl(args) => ctl::run(args),
        Command::CheckConfig(args) => check::run(args),
        Command::Bench(cmd) => bench::run(*cmd),
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second initialisation (tests) is harmless.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Sizes the global compute pool; 0 keeps rayon's default (all cores).
pub(crate) fn set_threads(threads: usize) -> anyhow::Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot size the thread pool: {e}"))?;
    }
    Ok(())
}
