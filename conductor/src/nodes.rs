//! The conductor's view of its workers: addresses and gRPC clients, health
//! from polling each node's status, drain flags, cost models (fitted from
//! the profile a node measured at start, corrected online), and the work
//! this conductor has placed on each node and not yet seen finish.

use crate::metrics::{Metrics, NodeRoleLabel, Role};
use crate::schedule::cost::Fitted;
use crate::schedule::{DecodeCost, DecodeView, PrefillCost, PrefillView, SeqLoad};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tandem_proto::cluster_token::{authed, AuthChannel, ClusterToken};
use tandem_proto::worker as pb;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::prefill_client::PrefillClient;

/// Whether a node answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// Not polled yet.
    Unknown,
    Up,
    /// Silent for longer than the node timeout, or failed a request and its
    /// status since.
    Down {
        error: String,
    },
}

/// What every node has.
#[derive(Debug)]
pub struct NodeBase {
    pub name: String,
    pub addr: SocketAddr,
    pub role: Role,
    pub channel: AuthChannel,
    pub health: Health,
    pub draining: bool,
    /// Last successful status.
    pub last_ok: Option<Instant>,
    /// The cost model comes from the node's own profile (not the prior).
    pub profiled: bool,
    /// Found through discovery rather than the cluster file.
    pub discovered: bool,
}

impl NodeBase {
    /// A node at `addr`, called with the cluster `token` when there is one.
    pub fn new(name: &str, addr: SocketAddr, role: Role, token: Option<&ClusterToken>) -> Result<NodeBase, String> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("node {name} address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        let channel = authed(channel, token);
        Ok(NodeBase {
            name: name.to_string(),
            addr,
            role,
            channel,
            health: Health::Unknown,
            draining: false,
            last_ok: None,
            profiled: false,
            discovered: false,
        })
    }

    pub fn up(&self) -> bool {
        self.health == Health::Up
    }

    pub fn accepting(&self) -> bool {
        self.up() && !self.draining
    }

    fn label(&self) -> NodeRoleLabel {
        NodeRoleLabel { node: self.name.clone(), role: self.role }
    }

    pub fn publish(&self, m: &Metrics) {
        m.node_up.get_or_create(&self.label()).set(self.up() as i64);
        m.node_draining.get_or_create(&self.label()).set(self.draining as i64);
    }
}

#[derive(Debug)]
pub struct PrefillNode {
    pub base: NodeBase,
    pub status: Option<pb::PrefillStatus>,
    pub cost: PrefillCost,
    /// Predicted prefill time (ms) of each request placed here and not yet
    /// prefilled, by request id.
    pub outstanding: HashMap<u64, f64>,
}

/// One sequence placed on a decode node.
#[derive(Debug, Clone, Copy)]
pub struct Placed {
    pub seq: SeqLoad,
    pub prefilled: bool,
}

#[derive(Debug)]
pub struct DecodeNode {
    pub base: NodeBase,
    pub status: Option<pb::DecodeStatus>,
    pub cost: DecodeCost,
    pub max_batch: u32,
    pub seqs: HashMap<u64, Placed>,
}

/// Prefill speed assumed before a node's profile arrives: linear in the
/// uncached tokens at the node's measured speed (or 1000 tokens/s).
pub fn prefill_prior(tokens_per_second: f64) -> PrefillCost {
    let tps = if tokens_per_second > 1.0 { tokens_per_second } else { 1000.0 };
    PrefillCost(Fitted { weights: vec![1.0, 1000.0 / tps, 0.0, 0.0], correction: 1.0 })
}

/// Decode step time assumed before a node's profile arrives.
pub fn decode_prior() -> DecodeCost {
    DecodeCost(Fitted { weights: vec![20.0, 1.0, 0.0005], correction: 1.0 })
}

impl PrefillNode {
    pub fn new(name: &str, addr: SocketAddr, token: Option<&ClusterToken>) -> Result<PrefillNode, String> {
        Ok(PrefillNode {
            base: NodeBase::new(name, addr, Role::Prefill, token)?,
            status: None,
            cost: prefill_prior(0.0),
            outstanding: HashMap::new(),
        })
    }

    pub fn client(&self) -> PrefillClient<AuthChannel> {
        PrefillClient::new(self.base.channel.clone())
            .max_decoding_message_size(tandem_proto::handoff::MAX_MESSAGE_BYTES)
    }

    /// The scheduler's view: the queue is the larger of what this conductor
    /// placed and what the node reports (other conductors' work).
    pub fn view(&self, read_bytes_per_ms: f64) -> PrefillView {
        let ours: f64 = self.outstanding.values().sum();
        let reported = self.status.as_ref().map_or(0.0, |s| s.predicted_work_us as f64 / 1000.0);
        PrefillView {
            name: self.base.name.clone(),
            accepting: self.base.accepting(),
            queued_ms: ours.max(reported),
            cost: self.cost.clone(),
            read_bytes_per_ms,
        }
    }

    pub fn fit_profile(&mut self, points: &[pb::PrefillPoint]) -> bool {
        let pts: Vec<(u32, u32, f64)> = points.iter().map(|p| (p.uncached, p.cached, p.ms)).collect();
        match PrefillCost::fit(&pts) {
            Some(c) => {
                self.cost = c;
                self.base.profiled = true;
                true
            }
            None => false,
        }
    }
}

impl DecodeNode {
    pub fn new(
        name: &str,
        addr: SocketAddr,
        max_batch: u32,
        token: Option<&ClusterToken>,
    ) -> Result<DecodeNode, String> {
        Ok(DecodeNode {
            base: NodeBase::new(name, addr, Role::Decode, token)?,
            status: None,
            cost: decode_prior(),
            max_batch,
            seqs: HashMap::new(),
        })
    }

    pub fn client(&self) -> DecodeClient<AuthChannel> {
        DecodeClient::new(self.base.channel.clone()).max_decoding_message_size(tandem_proto::handoff::MAX_MESSAGE_BYTES)
    }

    /// KV capacity in tokens (unknown until the first status: assume room).
    pub fn kv_capacity_tokens(&self) -> u64 {
        self.status.as_ref().map_or(u64::MAX / 4, |s| s.kv_pages_total as u64 * s.block_tokens.max(1) as u64)
    }

    pub fn view(&self) -> DecodeView {
        DecodeView {
            name: self.base.name.clone(),
            accepting: self.base.accepting(),
            max_batch: self.max_batch,
            kv_capacity_tokens: self.kv_capacity_tokens(),
            cost: self.cost.clone(),
            seqs: self.seqs.values().map(|p| p.seq).collect(),
        }
    }

    pub fn fit_profile(&mut self, points: &[pb::DecodePoint]) -> bool {
        let pts: Vec<(u32, u64, f64)> = points.iter().map(|p| (p.batch, p.context, p.ms)).collect();
        match DecodeCost::fit(&pts) {
            Some(c) => {
                self.cost = c;
                self.base.profiled = true;
                true
            }
            None => false,
        }
    }

    /// Folds a status into the node: the step time it measured at its
    /// batch corrects the cost model.
    pub fn observe_status(&mut self, s: &pb::DecodeStatus) {
        if s.batch_size > 0 && s.step_us > 0 {
            self.cost.observe(s.batch_size, s.context_tokens, s.step_us as f64 / 1000.0);
        }
    }
}

/// Records that a status call answered (`Ok`) or failed; a node is down
/// once it has failed for longer than `timeout` (or never answered in that
/// time). Returns whether the node just came up (a profile is due).
pub fn record_health(base: &mut NodeBase, result: Result<(), String>, timeout: Duration, started: Instant) -> bool {
    match result {
        Ok(()) => {
            let was_up = base.up();
            base.health = Health::Up;
            base.last_ok = Some(Instant::now());
            !was_up
        }
        Err(e) => {
            let since = base.last_ok.unwrap_or(started);
            if since.elapsed() >= timeout || base.health != Health::Up {
                if base.health == Health::Up {
                    tracing::warn!(node = %base.name, "node is down: {e}");
                }
                base.health = Health::Down { error: e };
                base.profiled = false;
            }
            false
        }
    }
}
