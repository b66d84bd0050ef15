//! `[conductor]` of the cluster file: where the HTTP API and the admin API
//! listen, the scheduling policy and SLOs, and the limits every request is
//! held to.

use crate::schedule::{PolicyKind, Slo};
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConductorConfig {
    pub name: String,
    /// The OpenAI-compatible HTTP API, `/metrics`, `/health`, `/ready`.
    pub listen: SocketAddr,
    /// The admin gRPC API (`tandem ctl`).
    pub admin_listen: SocketAddr,
    /// The model name clients send (`model` in requests, `/v1/models`).
    /// Empty: the `[model]` path's last component.
    pub served_model_name: String,
    /// `disaggregated`: prefill nodes hand off to decode nodes (the
    /// default); `colocated`: every request goes to one decode node that
    /// prefills and decodes it (vLLM-style continuous batching with chunked
    /// prefill and a local prefix cache; the baseline).
    pub mode: Mode,
    pub policy: PolicyKind,
    pub slo: SloConfig,
    /// Largest HTTP request body.
    pub max_body: ByteSize,
    /// A client must send its request headers within this time (ms), or
    /// the connection is closed (slow clients cannot hold connections).
    pub header_timeout_ms: u64,
    /// ... and its whole request body within this time (ms), or it gets 408.
    pub body_timeout_ms: u64,
    /// Longest prompt in tokens (0: the model's context length).
    pub max_prompt_tokens: u32,
    /// Most tokens one request may generate.
    pub max_tokens_limit: u32,
    /// `max_tokens` of a chat request that gives none (completions default
    /// to 16, as OpenAI's do).
    pub default_max_tokens: u32,
    /// Requests in flight (queued, prefilling or decoding) beyond which new
    /// ones get 429 whatever the policy.
    pub max_in_flight: u32,
    /// How often every node's status is read.
    pub status_interval_ms: u64,
    /// A node that does not answer its status for this long is down.
    pub node_timeout_ms: u64,
    /// How many times a request whose node died is placed again.
    pub retries: u32,
    /// A request whose node sends nothing for this long is treated as
    /// failed (and retried).
    pub stall_timeout_ms: u64,
    /// Seed of the random policy (decisions replay for a seed).
    pub seed: u64,
    /// The API keys, resolved from the cluster file's `[auth]` (never read
    /// from `[conductor]`). Empty: the APIs are open.
    #[serde(skip)]
    pub api_keys: Vec<crate::auth::KeySpec>,
    /// The cluster token sent to the workers (from `[auth]`, never read
    /// from `[conductor]`).
    #[serde(skip)]
    pub cluster_token: Option<tandem_proto::cluster_token::ClusterToken>,
}

/// How requests use the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Disaggregated,
    Colocated,
}

/// Service-level objectives, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SloConfig {
    /// Time to first token.
    pub ttft_ms: f64,
    /// Time between tokens.
    pub tbt_ms: f64,
    /// Share of each SLO kept free for prediction error (admission needs
    /// predictions within `(1 - headroom)` of the SLO).
    pub headroom: f64,
}

impl Default for SloConfig {
    fn default() -> Self {
        SloConfig { ttft_ms: 10_000.0, tbt_ms: 1_000.0, headroom: 0.1 }
    }
}

impl From<SloConfig> for Slo {
    fn from(s: SloConfig) -> Slo {
        Slo { ttft_ms: s.ttft_ms, tbt_ms: s.tbt_ms }
    }
}

impl Default for ConductorConfig {
    fn default() -> Self {
        ConductorConfig {
            name: "conductor".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            served_model_name: String::new(),
            mode: Mode::Disaggregated,
            policy: PolicyKind::KvCentric,
            slo: SloConfig::default(),
            max_body: ByteSize::mib(4),
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_prompt_tokens: 0,
            max_tokens_limit: 4096,
            default_max_tokens: 512,
            max_in_flight: 1024,
            status_interval_ms: 250,
            node_timeout_ms: 2_000,
            retries: 2,
            stall_timeout_ms: 60_000,
            seed: 0,
            api_keys: Vec::new(),
            cluster_token: None,
        }
    }
}

impl ConductorConfig {
    pub fn validate(&self) -> Result<(), String> {
        let c = &self;
        if c.name.is_empty() || c.name.len() > 64 {
            return Err("conductor.name must be 1 to 64 characters".into());
        }
        if c.listen == c.admin_listen && c.listen.port() != 0 {
            return Err(format!("conductor.listen and conductor.admin_listen are both {}", c.listen));
        }
        if !(c.slo.ttft_ms.is_finite() && c.slo.ttft_ms > 0.0 && c.slo.tbt_ms.is_finite() && c.slo.tbt_ms > 0.0) {
            return Err("conductor.slo.ttft_ms and tbt_ms must be positive".into());
        }
        if !(0.0..=0.9).contains(&c.slo.headroom) {
            return Err("conductor.slo.headroom must be between 0 and 0.9".into());
        }
        if c.max_body.as_u64() < 1024 || c.max_body.as_u64() > 256 << 20 {
            return Err("conductor.max_body must be between 1KiB and 256MiB".into());
        }
        if c.max_tokens_limit == 0 || c.default_max_tokens == 0 {
            return Err("conductor.max_tokens_limit and default_max_tokens must be at least 1".into());
        }
        if c.max_in_flight == 0 {
            return Err("conductor.max_in_flight must be at least 1".into());
        }
        if c.status_interval_ms == 0 || c.node_timeout_ms < c.status_interval_ms {
            return Err("conductor.status_interval_ms must be ≥ 1 and node_timeout_ms at least as long".into());
        }
        if c.header_timeout_ms < 100 || c.body_timeout_ms < 100 {
            return Err("conductor.header_timeout_ms and body_timeout_ms must be at least 100".into());
        }
        if c.stall_timeout_ms < 1000 {
            return Err("conductor.stall_timeout_ms must be at least 1000".into());
        }
        Ok(())
    }

    /// The model name the API serves under.
    pub fn model_name(&self, model_path: &str) -> String {
        if !self.served_model_name.is_empty() {
            return self.served_model_name.clone();
        }
        let trimmed = model_path.trim_end_matches('/');
        let last = trimmed.rsplit('/').next().unwrap_or(trimmed);
        last.strip_suffix(".gguf").unwrap_or(last).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_mistakes_are_named() {
        ConductorConfig::default().validate().unwrap();
        let c: ConductorConfig = toml::from_str("policy = \"round-robin\"\n[slo]\nttft_ms = 500\n").unwrap();
        assert_eq!(c.policy, PolicyKind::RoundRobin);
        assert_eq!(c.mode, Mode::Disaggregated);
        assert_eq!(c.slo.ttft_ms, 500.0);
        assert_eq!(c.slo.tbt_ms, SloConfig::default().tbt_ms);
        let c: ConductorConfig = toml::from_str("mode = \"colocated\"").unwrap();
        assert_eq!(c.mode, Mode::Colocated);
        assert!(toml::from_str::<ConductorConfig>("mode = \"mixed\"").is_err());
        assert!(toml::from_str::<ConductorConfig>("policy = \"fastest\"").is_err());
        assert!(toml::from_str::<ConductorConfig>("[slo]\nttfb_ms = 1").is_err());
        let bad = |f: fn(&mut ConductorConfig)| {
            let mut c = ConductorConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(bad(|c| c.slo.tbt_ms = 0.0).contains("slo"));
        assert!(bad(|c| c.admin_listen = c.listen).contains("admin_listen"));
        assert!(bad(|c| c.max_in_flight = 0).contains("max_in_flight"));
        assert_eq!(ConductorConfig::default().model_name("/models/Llama-3.2-1B/"), "Llama-3.2-1B");
        assert_eq!(ConductorConfig::default().model_name("smollm2"), "smollm2");
        assert_eq!(ConductorConfig::default().model_name("x/tiny.gguf"), "tiny");
    }
}
