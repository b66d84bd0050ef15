//! The `tandem` command line.

use clap::{Parser, Subcommand};

/// Tandem serves LLMs with prefill and decode disaggregated over a shared
/// KV-cache store.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {}
}
