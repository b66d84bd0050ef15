//! The result of `tandem bench replay|run|sweep`: one JSON schema,
//! versioned. A reader refuses a file whose `schema_version` it does not
//! know rather than guessing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bumped on any change a reader of version N could misread.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole invocation: one or more runs measured in the same session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub schema_version: u32,
    /// `tandem` version that produced it.
    pub tandem_version: String,
    /// The command line that produced it (program name first).
    pub command: String,
    /// Seconds since the Unix epoch when the invocation started.
    pub started_unix_s: u64,
    /// CPU model, threads, SIMD level (free-form).
    pub machine: serde_json::Value,
    pub workload: WorkloadInfo,
    /// "real" (the model runs) or "modeled:<profile>" (a cost model of an
    /// accelerator; see the README's roofline).
    pub compute: String,
    pub slo: Slo,
    pub runs: Vec<Run>,
}

/// What was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// "trace" or "synthetic".
    pub kind: String,
    /// One line a person reads: the trace file and its scaling, or the
    /// synthetic parameters.
    pub description: String,
    /// Requests in the workload (each run sends all of them).
    pub requests: u64,
    pub input_tokens_mean: f64,
    pub output_tokens_mean: f64,
}

/// The service-level objectives goodput and attainment are measured against.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: f64,
    /// Applied to each request's mean time between tokens (its TPOT), as
    /// DistServe's goodput does.
    pub tbt_ms: f64,
}

/// One deployment and policy under one offered load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Unique within the result, e.g. "kv-centric", "1P1D colocated @ 2 rps".
    pub label: String,
    /// kv-centric, random, round-robin, least-loaded, cache-affinity or
    /// colocated.
    pub policy: String,
    pub deployment: Deployment,
    /// Offered load: requests per second (trace: its own rate after
    /// time scaling), or `None` with fixed concurrency.
    pub rate_rps: Option<f64>,
    pub concurrency: Option<u32>,
    /// From the first request sent to the last one finished.
    pub duration_s: f64,
    pub requests: Counts,
    pub ttft_ms: Dist,
    /// Inter-token latency: every gap between consecutive tokens of every
    /// request.
    pub tbt_ms: Dist,
    /// Time per output token after the first, per request: (e2e - TTFT) /
    /// (tokens - 1).
    pub tpot_ms: Dist,
    pub e2e_ms: Dist,
    pub throughput: Throughput,
    /// Completed requests per second that met both SLOs (TTFT, and TPOT
    /// under the TBT SLO), over the run's duration.
    pub goodput_rps: f64,
    /// Share of sent requests that completed within both SLOs.
    pub slo_attainment: f64,
    pub cache: CacheStats,
    /// KV bytes moved through the store, by transport ("shm", "tcp"...)
    /// and direction ("write", "read").
    pub kv_bytes: BTreeMap<String, u64>,
    pub nodes: Vec<NodeUsage>,
    /// Every completed request's TTFT (ms), ascending: the CDF.
    pub ttft_samples_ms: Vec<f64>,
    /// (seconds into the run, cumulative token cache hit ratio).
    pub hit_ratio_timeline: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub prefill: u32,
    pub decode: u32,
    /// Every worker prefills and decodes (`decode` counts them).
    pub colocated: bool,
}

impl Deployment {
    /// "1P1D", "2P1D", "colocated×2".
    pub fn name(&self) -> String {
        if self.colocated {
            format!("colocated×{}", self.decode)
        } else {
            format!("{}P{}D", self.prefill, self.decode)
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub sent: u64,
    pub completed: u64,
    /// Refused at admission (HTTP 429).
    pub rejected: u64,
    /// Any other error, or a stream that ended without its answer.
    pub failed: u64,
}

/// A distribution summary; all zero when there were no samples (`n` = 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Dist {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub requests_per_s: f64,
    pub input_tokens_per_s: f64,
    pub output_tokens_per_s: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    pub prompt_tokens: u64,
    /// Prompt tokens read from the store (or a colocated node's local
    /// cache) instead of computed.
    pub cached_tokens: u64,
    pub hit_ratio_tokens: f64,
    /// Prompt blocks looked up, and found, as the prefill nodes counted.
    pub prompt_blocks: u64,
    pub cached_blocks: u64,
    pub hit_ratio_blocks: f64,
    /// The block hit ratio of the same prompts replayed offline, one at a
    /// time, through the store's eviction policy at its capacity (a run
    /// that sends one request at a time measures exactly this); absent
    /// where the harness cannot size the store's blocks (real compute) or
    /// no store serves the run (colocated, cache off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline_hit_ratio_blocks: Option<f64>,
}

/// How busy a node was over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeUsage {
    pub name: String,
    /// "prefill", "decode" (or "colocated").
    pub role: String,
    /// Share of the run's wall time spent in forward passes (0..=1).
    pub busy: f64,
}

impl BenchResult {
    /// Parses a result file, refusing other schema versions.
    pub fn parse(text: &str) -> Result<BenchResult, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("schema_version").and_then(|x| x.as_u64()) {
            Some(n) if n == u64::from(SCHEMA_VERSION) => {}
            Some(n) => return Err(format!("schema version {n}; this tandem reads version {SCHEMA_VERSION}")),
            None => return Err("no schema_version: not a tandem bench result".into()),
        }
        serde_json::from_value(v).map_err(|e| format!("malformed bench result: {e}"))
    }

    pub fn run(&self, label: &str) -> Option<&Run> {
        self.runs.iter().find(|r| r.label == label)
    }
}
