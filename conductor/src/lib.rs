//! Tandem's conductor and command-line tool.
//!
//! - [`service`] — the conductor: the workers polled for health and load,
//!   cost models fitted from their profiles, the requests in flight.
//! - [`dispatch`] — a request's way through the cluster: admission (early
//!   rejection), prefill → decode, token relay, retries on dead nodes.
//! - [`api`] — the OpenAI-compatible HTTP API, `/metrics`, `/health`,
//!   `/ready`.
//! - [`admin`] — the admin gRPC API `tandem ctl` talks to: nodes, drain,
//!   requests in flight, the KV cache, policy and SLOs changed live.
//! - [`auth`] — API keys: tenants, admin rights, per-key limits.
//! - [`schedule`] — the scheduling policies (Mooncake's Algorithm 1 and
//!   the baselines), pure and synchronous with the clock passed in.
//! - [`discovery`] — optional etcd membership.
//! - [`cli`] — the `tandem` command: argument parsing and one module per
//!   subcommand, each a thin call into the crate that does the work.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod dispatch;
pub mod metrics;
pub mod nodes;
pub mod schedule;
pub mod service;
pub mod text;
