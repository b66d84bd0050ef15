//! The conductor process: the cluster's nodes polled for health and load,
//! the scheduler, and the requests in flight. The HTTP API
//! ([`crate::api`]) and the admin API ([`crate::admin`]) are views onto it;
//! [`crate::dispatch`] moves requests through it.

use crate::config::ConductorConfig;
use crate::metrics::{Metrics, NodeDirectionLabel, NodeEventLabel, NodeRoleLabel, Role};
use crate::nodes::{prefill_prior, record_health, DecodeNode, Health, PrefillNode};
use crate::schedule::Scheduler;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_kvstore::client::StoreClient;
use tandem_model::chat::ChatTemplate;
use tandem_model::config::ModelConfig;
use tandem_model::tokenizer::Tokenizer;
use tandem_proto::worker as pb;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Placed on a prefill node, not prefilled yet.
    Prefilling,
    /// Handed off; tokens are streaming.
    Decoding,
    /// Its node failed; being placed again.
    Retrying,
}

/// A request the conductor is carrying.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub request_id: String,
    pub stage: Stage,
    pub prefill: String,
    pub decode: String,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub generated: u32,
    pub attempts: u32,
    pub arrived: Instant,
}

/// Everything that changes, behind one lock (held only for short,
/// non-blocking updates).
#[derive(Debug)]
pub struct State {
    pub scheduler: Scheduler,
    pub prefill: Vec<PrefillNode>,
    pub decode: Vec<DecodeNode>,
    pub requests: BTreeMap<u64, Tracked>,
    /// The model every node must serve (the first node's, until then none).
    pub fingerprint: Option<String>,
}

/// What the conductor knows of the model (it never loads the weights).
#[derive(Debug)]
pub struct ModelInfo {
    /// The name clients use.
    pub name: String,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub context_len: u32,
    pub block_tokens: u32,
    pub kv_dtype: String,
    /// Bytes of one KV block (all layers), for the prefix read time.
    pub block_bytes: u64,
}

impl ModelInfo {
    pub fn new(
        name: String,
        tokenizer: Tokenizer,
        config: &ModelConfig,
        kv_dtype: tandem_model::kv_cache::KvDType,
        block_tokens: u32,
    ) -> anyhow::Result<ModelInfo> {
        let template = crate::text::chat_template(&tokenizer)?;
        let block_bytes = 2 * config.num_layers * config.kv_dim() * block_tokens as usize * kv_dtype.bytes();
        Ok(ModelInfo {
            name,
            tokenizer,
            template,
            context_len: config.max_position_embeddings.min(u32::MAX as usize) as u32,
            block_tokens,
            kv_dtype: kv_dtype.name().to_string(),
            block_bytes: block_bytes as u64,
        })
    }
}

/// The workers of a deployment, by role.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    pub prefill: Vec<(String, SocketAddr)>,
    /// Name, address and `max_batch`.
    pub decode: Vec<(String, SocketAddr, u32)>,
}

#[derive(Debug)]
pub struct Conductor {
    pub cfg: ConductorConfig,
    pub model: ModelInfo,
    pub store: Option<Arc<StoreClient>>,
    pub metrics: Metrics,
    pub state: Mutex<State>,
    next_id: AtomicU64,
    /// Tokens generated in all (for tokens/s).
    pub generated_total: AtomicU64,
    pub prompt_total: AtomicU64,
    pub cached_total: AtomicU64,
    pub started: Instant,
    /// The API keys and their live counters (see [`crate::auth`]).
    pub keys: crate::auth::Keys,
}

/// A worker's status, by role.
#[derive(Debug, Clone)]
enum Polled {
    Prefill(pb::PrefillStatus),
    Decode(pb::DecodeStatus),
}

impl Polled {
    /// The model fingerprint and block size the node reports.
    fn model(&self) -> (&str, u32) {
        match self {
            Polled::Prefill(s) => (&s.model_fingerprint, s.block_tokens),
            Polled::Decode(s) => (&s.model_fingerprint, s.block_tokens),
        }
    }
}

/// Share of a node's KV pages in use.
fn kv_used(free: u32, total: u32) -> f64 {
    1.0 - free as f64 / total.max(1) as f64
}

/// Store reads assumed for the prefix transfer time (bytes per ms).
const READ_BYTES_PER_MS: f64 = 1.0e6;

impl Conductor {
    pub fn new(
        cfg: ConductorConfig,
        model: ModelInfo,
        workers: &Workers,
        store: Option<Arc<StoreClient>>,
    ) -> anyhow::Result<Arc<Conductor>> {
        let mut prefill = Vec::new();
        for (name, addr) in &workers.prefill {
            prefill.push(PrefillNode::new(name, *addr, cfg.cluster_token.as_ref()).map_err(anyhow::Error::msg)?);
        }
        let mut decode = Vec::new();
        for (name, addr, max_batch) in &workers.decode {
            decode.push(
                DecodeNode::new(name, *addr, *max_batch, cfg.cluster_token.as_ref()).map_err(anyhow::Error::msg)?,
            );
        }
        let mut scheduler = Scheduler::new(cfg.policy, cfg.slo.into(), cfg.seed);
        scheduler.headroom = cfg.slo.headroom;
        let keys = crate::auth::Keys::new(cfg.api_keys.clone());
        Ok(Arc::new(Conductor {
            keys,
            cfg,
            model,
            store,
            metrics: Metrics::new(),
            state: Mutex::new(State { scheduler, prefill, decode, requests: BTreeMap::new(), fingerprint: None }),
            next_id: AtomicU64::new(1),
            generated_total: AtomicU64::new(0),
            prompt_total: AtomicU64::new(0),
            cached_total: AtomicU64::new(0),
            started: Instant::now(),
        }))
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Milliseconds since the conductor started: the scheduler's clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn read_bytes_per_ms(&self) -> f64 {
        READ_BYTES_PER_MS
    }

    pub fn colocated(&self) -> bool {
        self.cfg.mode == crate::config::Mode::Colocated
    }

    /// Ready: at least one prefill and one decode node accept work (a
    /// decode node, colocated).
    pub fn ready(&self) -> Result<(), String> {
        let st = self.state.lock();
        if self.colocated() {
            let d = st.decode.iter().filter(|n| n.base.accepting()).count();
            if d == 0 {
                return Err(format!("none of {} decode nodes accepts work (colocated mode)", st.decode.len()));
            }
            return Ok(());
        }
        let p = st.prefill.iter().filter(|n| n.base.accepting()).count();
        let d = st.decode.iter().filter(|n| n.base.accepting()).count();
        if p == 0 || d == 0 {
            return Err(format!(
                "{p} of {} prefill and {d} of {} decode nodes accept work",
                st.prefill.len(),
                st.decode.len()
            ));
        }
        Ok(())
    }

    /// Starts polling every node (and any added later by discovery).
    pub fn spawn_pollers(self: &Arc<Self>) {
        let (np, nd) = {
            let st = self.state.lock();
            (st.prefill.len(), st.decode.len())
        };
        for i in 0..np {
            tokio::spawn(self.clone().poll(false, i));
        }
        for i in 0..nd {
            tokio::spawn(self.clone().poll(true, i));
        }
        tokio::spawn(self.clone().rate_loop());
    }

    /// Adds a worker found by discovery (or re-enables a known one at a new
    /// address) and starts polling it.
    pub fn add_worker(
        self: &Arc<Self>,
        name: &str,
        role: &str,
        addr: SocketAddr,
        max_batch: u32,
    ) -> anyhow::Result<()> {
        let mut st = self.state.lock();
        match role {
            "prefill" => {
                if let Some(n) = st.prefill.iter_mut().find(|n| n.base.name == name) {
                    if n.base.addr != addr {
                        *n = PrefillNode::new(name, addr, self.cfg.cluster_token.as_ref())
                            .map_err(anyhow::Error::msg)?;
                        n.base.discovered = true;
                    }
                    return Ok(());
                }
                let mut n =
                    PrefillNode::new(name, addr, self.cfg.cluster_token.as_ref()).map_err(anyhow::Error::msg)?;
                n.base.discovered = true;
                st.prefill.push(n);
                tokio::spawn(self.clone().poll(false, st.prefill.len() - 1));
            }
            "decode" => {
                if let Some(n) = st.decode.iter_mut().find(|n| n.base.name == name) {
                    if n.base.addr != addr {
                        *n = DecodeNode::new(name, addr, max_batch, self.cfg.cluster_token.as_ref())
                            .map_err(anyhow::Error::msg)?;
                        n.base.discovered = true;
                    }
                    return Ok(());
                }
                let mut n = DecodeNode::new(name, addr, max_batch, self.cfg.cluster_token.as_ref())
                    .map_err(anyhow::Error::msg)?;
                n.base.discovered = true;
                st.decode.push(n);
                tokio::spawn(self.clone().poll(true, st.decode.len() - 1));
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks a node's model against the cluster's; `Err` names the
    /// mismatch.
    fn check_fingerprint(st: &mut State, fingerprint: &str, block_tokens: u32, ours: u32) -> Result<(), String> {
        if block_tokens != ours {
            return Err(format!("it uses {block_tokens}-token blocks; the cluster file says {ours}"));
        }
        match &st.fingerprint {
            None => {
                st.fingerprint = Some(fingerprint.to_string());
                Ok(())
            }
            Some(f) if f == fingerprint => Ok(()),
            Some(f) => Err(format!("it serves model {fingerprint}, the cluster serves {f}")),
        }
    }

    /// Polls one worker's status for as long as the conductor runs:
    /// health, load metrics, the model check, online correction of the
    /// decode cost, and the node's profile each time it comes up.
    async fn poll(self: Arc<Self>, decode: bool, i: usize) {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.cfg.node_timeout_ms);
        let mut profile_due = true;
        loop {
            let res = self.status_of(decode, i, timeout).await;
            let mut fetch_profile = false;
            {
                let mut st = self.state.lock();
                let check = match &res {
                    Ok(s) => {
                        let (fingerprint, block_tokens) = s.model();
                        Self::check_fingerprint(&mut st, fingerprint, block_tokens, self.model.block_tokens)
                    }
                    Err(e) => Err(e.clone()),
                };
                if let Ok(s) = &res {
                    self.apply_status(&mut st, i, s);
                }
                let base = if decode { &mut st.decode[i].base } else { &mut st.prefill[i].base };
                if record_health(base, check, timeout, started) {
                    profile_due = true;
                }
                if !base.up() {
                    profile_due = true;
                } else if profile_due {
                    fetch_profile = true;
                    profile_due = false;
                }
                base.publish(&self.metrics);
            }
            if fetch_profile && !self.fetch_profile(decode, i).await {
                profile_due = true;
            }
            tokio::time::sleep(Duration::from_millis(self.cfg.status_interval_ms)).await;
        }
    }

    async fn status_of(&self, decode: bool, i: usize, timeout: Duration) -> Result<Polled, String> {
        let call = async {
            if decode {
                let mut c = self.state.lock().decode[i].client();
                c.status(pb::StatusRequest {}).await.map(|r| Polled::Decode(r.into_inner()))
            } else {
                let mut c = self.state.lock().prefill[i].client();
                c.status(pb::StatusRequest {}).await.map(|r| Polled::Prefill(r.into_inner()))
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.message().to_string()),
            Err(_) => Err(format!("no status within {timeout:?}")),
        }
    }

    /// A node's forward-pass time and store traffic, as it reported them.
    fn observe_node(
        &self,
        name: &str,
        role: Role,
        compute_us: u64,
        (put_bytes, get_bytes): (u64, u64),
        reads: Option<&pb::StoreClientCounters>,
    ) {
        let m = &self.metrics;
        m.compute.get_or_create(&NodeRoleLabel { node: name.to_string(), role }).set(compute_us as f64 / 1e6);
        for (direction, bytes) in [("put", put_bytes), ("get", get_bytes)] {
            m.store_bytes.get_or_create(&NodeDirectionLabel { node: name.to_string(), direction }).set(bytes as i64);
        }
        if let Some(r) = reads {
            for (event, n) in [
                ("hit", r.hits),
                ("miss", r.misses),
                ("checksum_mismatch", r.checksum_mismatches),
                ("read_failure", r.read_failures),
                ("location_hit", r.location_hits),
                ("stale_location", r.stale_locations),
            ] {
                m.store_client_reads.get_or_create(&NodeEventLabel { node: name.to_string(), event }).set(n as i64);
            }
        }
    }

    /// Folds a status into the node and its metrics.
    fn apply_status(&self, st: &mut State, i: usize, s: &Polled) {
        let (name, role, used) = match s {
            Polled::Prefill(s) => {
                let n = &mut st.prefill[i];
                if !n.base.profiled {
                    n.cost = prefill_prior(s.tokens_per_second);
                }
                let label = Metrics::node(&n.base.name);
                self.metrics.prefill_queue.get_or_create(&label).set(s.queued_requests as i64);
                self.metrics.prefill_tokens.get_or_create(&label).set(s.computed_tokens as i64);
                let traffic = (s.store_put_bytes, s.store_get_bytes);
                self.observe_node(&n.base.name, Role::Prefill, s.compute_us, traffic, s.store_reads.as_ref());
                n.status = Some(s.clone());
                (n.base.name.clone(), Role::Prefill, kv_used(s.kv_pages_free, s.kv_pages_total))
            }
            Polled::Decode(s) => {
                let n = &mut st.decode[i];
                n.observe_status(s);
                let label = Metrics::node(&n.base.name);
                self.metrics.decode_batch.get_or_create(&label).set(s.batch_size as i64);
                self.metrics.decode_waiting.get_or_create(&label).set(s.waiting as i64);
                let traffic = (s.store_put_bytes, s.store_get_bytes);
                self.observe_node(&n.base.name, Role::Decode, s.compute_us, traffic, s.store_reads.as_ref());
                n.status = Some(s.clone());
                (n.base.name.clone(), Role::Decode, kv_used(s.kv_pages_free, s.kv_pages_total))
            }
        };
        self.metrics.kv_usage.get_or_create(&NodeRoleLabel { node: name, role }).set(used);
    }

    /// Reads a node's profile and fits its cost model; `false` when the
    /// node did not answer in time (try again at the next poll).
    async fn fetch_profile(&self, decode: bool, i: usize) -> bool {
        let limit = Duration::from_secs(30);
        let reply = if decode {
            let mut c = self.state.lock().decode[i].client();
            tokio::time::timeout(limit, c.profile(pb::ProfileRequest {})).await
        } else {
            let mut c = self.state.lock().prefill[i].client();
            tokio::time::timeout(limit, c.profile(pb::ProfileRequest {})).await
        };
        let r = match reply {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => {
                tracing::warn!("node profile: {}", e.message());
                return true;
            }
            Err(_) => return false,
        };
        let mut st = self.state.lock();
        let (name, fitted) = if decode {
            let n = &mut st.decode[i];
            (n.base.name.clone(), n.fit_profile(&r.decode))
        } else {
            let n = &mut st.prefill[i];
            (n.base.name.clone(), n.fit_profile(&r.prefill))
        };
        if fitted {
            tracing::info!(node = %name, "cost model fitted from the node's profile");
        }
        true
    }

    /// After a request failed on a node: one quick status call; a node
    /// that does not answer is marked down at once (the poller brings it
    /// back when it answers again).
    pub async fn probe(&self, decode: bool, i: usize) -> bool {
        let quick = Duration::from_millis(500);
        let ok = if decode {
            let mut c = self.state.lock().decode[i].client();
            matches!(tokio::time::timeout(quick, c.status(pb::StatusRequest {})).await, Ok(Ok(_)))
        } else {
            let mut c = self.state.lock().prefill[i].client();
            matches!(tokio::time::timeout(quick, c.status(pb::StatusRequest {})).await, Ok(Ok(_)))
        };
        if !ok {
            let mut st = self.state.lock();
            let base = if decode { &mut st.decode[i].base } else { &mut st.prefill[i].base };
            if base.health == Health::Up {
                tracing::warn!(node = %base.name, "node failed a request and does not answer: marked down");
            }
            base.health = Health::Down { error: "failed a request and did not answer its status".into() };
            base.publish(&self.metrics);
        }
        ok
    }

    /// Tokens/s over a sliding 10 s window, and the cache hit ratio.
    async fn rate_loop(self: Arc<Self>) {
        let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
        loop {
            let now = Instant::now();
            let total = self.generated_total.load(Ordering::Relaxed);
            window.push_back((now, total));
            while window.len() > 2 && now.duration_since(window[0].0) > Duration::from_secs(10) {
                window.pop_front();
            }
            let (t0, n0) = window[0];
            let secs = now.duration_since(t0).as_secs_f64();
            if secs > 0.0 {
                self.metrics.tokens_per_second.set((total - n0) as f64 / secs);
            }
            let prompt = self.prompt_total.load(Ordering::Relaxed);
            if prompt > 0 {
                self.metrics.cache_hit_ratio.set(self.cached_total.load(Ordering::Relaxed) as f64 / prompt as f64);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
