//! The conductor's Prometheus metrics (`GET /metrics`, text format): the
//! latencies users graph (TTFT, TBT, end-to-end) per node, request and
//! token counters, rejections, and each node's load as last polled.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeRoleLabel {
    pub node: String,
    pub role: Role,
}

/// A node's store client reads, by what they met.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeEventLabel {
    pub node: String,
    pub event: &'static str,
}

/// A node's store traffic, by direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeDirectionLabel {
    pub node: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
}

/// How a request ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Finished (stop, length or context).
    Completed,
    /// Refused at arrival (429).
    Rejected,
    /// Ended with an error after it was accepted.
    Failed,
    /// The client went away.
    Cancelled,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl EncodeLabelValue for Role {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 5 ms .. ~80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

fn step_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ttft: HistogramFamily<NodeLabel>,
    pub tbt: HistogramFamily<NodeLabel>,
    pub e2e: HistogramFamily<NodeLabel>,
    pub requests: Family<OutcomeLabel, Counter>,
    pub retries: Counter,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub generated_tokens: Family<NodeLabel, Counter>,
    pub in_flight: Gauge,
    pub cache_hit_ratio: Gauge<f64, AtomicU64>,
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    pub node_up: Family<NodeRoleLabel, Gauge>,
    pub node_draining: Family<NodeRoleLabel, Gauge>,
    pub prefill_queue: Family<NodeLabel, Gauge>,
    pub prefill_tokens: Family<NodeLabel, Gauge>,
    pub compute: Family<NodeRoleLabel, Gauge<f64, AtomicU64>>,
    pub store_bytes: Family<NodeDirectionLabel, Gauge>,
    pub store_client_reads: Family<NodeEventLabel, Gauge>,
    pub ttft_prediction: Histogram,
    pub decode_batch: Family<NodeLabel, Gauge>,
    pub decode_waiting: Family<NodeLabel, Gauge>,
    pub kv_usage: Family<NodeRoleLabel, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("tandem");
        let m = Metrics {
            ttft: Family::new_with_constructor(latency_histogram),
            tbt: Family::new_with_constructor(step_histogram),
            e2e: Family::new_with_constructor(latency_histogram),
            requests: Family::default(),
            retries: Counter::default(),
            prompt_tokens: Counter::default(),
            cached_prompt_tokens: Counter::default(),
            generated_tokens: Family::default(),
            in_flight: Gauge::default(),
            cache_hit_ratio: Gauge::default(),
            tokens_per_second: Gauge::default(),
            node_up: Family::default(),
            node_draining: Family::default(),
            prefill_queue: Family::default(),
            prefill_tokens: Family::default(),
            compute: Family::default(),
            store_bytes: Family::default(),
            store_client_reads: Family::default(),
            ttft_prediction: Histogram::new([0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0, 8.0]),
            decode_batch: Family::default(),
            decode_waiting: Family::default(),
            kv_usage: Family::default(),
            registry: Registry::default(),
        };
        r.register("ttft_seconds", "Time to first token, by prefill node", m.ttft.clone());
        r.register("tbt_seconds", "Time between tokens, by decode node", m.tbt.clone());
        r.register("e2e_seconds", "Request latency from arrival to the last token, by decode node", m.e2e.clone());
        r.register("requests", "Requests by outcome", m.requests.clone());
        r.register("retries", "Requests placed again after their node failed", m.retries.clone());
        r.register("prompt_tokens", "Prompt tokens of accepted requests", m.prompt_tokens.clone());
        r.register("cached_prompt_tokens", "Prompt tokens read from the KV store", m.cached_prompt_tokens.clone());
        r.register("generated_tokens", "Tokens generated, by decode node", m.generated_tokens.clone());
        r.register("in_flight_requests", "Requests accepted and not finished", m.in_flight.clone());
        r.register("cache_hit_ratio", "Cached share of prompt tokens so far", m.cache_hit_ratio.clone());
        r.register("tokens_per_second", "Generated tokens per second (last 10 s)", m.tokens_per_second.clone());
        r.register("node_up", "1 when the node answers its status", m.node_up.clone());
        r.register("node_draining", "1 when the node takes no new work", m.node_draining.clone());
        r.register("prefill_queue_requests", "Requests queued or running on a prefill node", m.prefill_queue.clone());
        r.register(
            "prefill_computed_tokens",
            "Prompt tokens a prefill node computed since it started (from its status)",
            m.prefill_tokens.clone(),
        );
        r.register(
            "compute_seconds",
            "Seconds a node spent in forward passes since it started (from its status; its rate is the node's utilisation)",
            m.compute.clone(),
        );
        r.register(
            "store_bytes",
            "KV bytes a node's store client wrote (put) and read (get) since it started (from its status)",
            m.store_bytes.clone(),
        );
        r.register(
            "store_client_reads",
            "Block reads of a node's store client since it started, by what they met: hit, miss, checksum_mismatch \
             (bytes that failed their checksum, never returned), read_failure (a transfer failed), location_hit (read \
             from a remembered location, no master call), stale_location (from its status)",
            m.store_client_reads.clone(),
        );
        r.register(
            "ttft_prediction_ratio",
            "Measured TTFT over the scheduler's prediction at admission (1 = exact; above 1 = late)",
            m.ttft_prediction.clone(),
        );
        r.register("decode_batch_size", "Sequences decoding on a decode node", m.decode_batch.clone());
        r.register("decode_waiting_requests", "Handoffs waiting on a decode node", m.decode_waiting.clone());
        r.register("kv_usage_ratio", "Share of a node's KV pages in use", m.kv_usage.clone());
        Metrics { registry: r, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn node(name: &str) -> NodeLabel {
        NodeLabel { node: name.to_string() }
    }

    pub fn outcome(&self, outcome: Outcome) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}
