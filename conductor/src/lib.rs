//! Tandem's conductor and command-line tool.
//!
//! - [`cli`] — the `tandem` command: argument parsing and one module per
//!   subcommand, each a thin call into the crate that does the work.
//! - [`schedule`] — the scheduling policies (Mooncake's Algorithm 1 and
//!   the baselines), pure and synchronous with the clock passed in.
//!
//! The OpenAI-compatible API and the conductor service arrive with the
//! conductor issue.

pub mod cli;
pub mod schedule;
