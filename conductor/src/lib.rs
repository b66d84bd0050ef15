//! Tandem's conductor and command-line tool.
//!
//! - [`cli`] — the `tandem` command: argument parsing and one module per
//!   subcommand, each a thin call into the crate that does the work.
//!
//! The scheduler and the OpenAI-compatible API arrive with the conductor
//! issue.

pub mod cli;
