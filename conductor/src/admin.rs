//! The admin gRPC API (`tandem.admin.v1`), what `tandem ctl` talks to: the
//! nodes with their health and load, draining, the requests in flight, the
//! KV cache as this cluster's block keys see it, and the scheduling policy
//! and SLOs, changed live.
//!
//! Every RPC reads or flips fields of the [`Conductor`]'s state under its
//! lock and releases it before any await. Draining only clears a node's
//! `accepting()`: the scheduler then places new requests elsewhere while the
//! ones already there run to their end.

use crate::metrics::Role;
use crate::nodes::{DecodeNode, Health, NodeBase, PrefillNode};
use crate::schedule::PolicyKind;
use crate::service::{Conductor, Stage, State, Tracked};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem_kvstore::client::StoreClient;
use tandem_kvstore::error::StoreError;
use tandem_model::chat::ChatMessage;
use tandem_proto::admin as pb;
use tandem_proto::admin::admin_server::{Admin, AdminServer};
use tandem_proto::kvstore as store_pb;
use tandem_proto::{block_keys, BlockKey, KeySalt};
use tonic::{Request, Response, Status};

/// Longest prompt text accepted.
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Longest node name accepted.
pub const MAX_NAME_BYTES: usize = 128;
/// Most token ids in one prompt.
const MAX_TOKEN_IDS: usize = 1 << 18;
/// Largest request message: a text at its limit, or as many token ids
/// (up to 5 bytes each), plus framing.
const MAX_MESSAGE_BYTES: usize = 2 << 20;
/// Requests listed when the caller gives no limit, and the most listed.
const DEFAULT_REQUESTS: usize = 1000;
const MAX_REQUESTS: usize = 10_000;
/// Keys per store call, well under the master's batch limit (4096 by
/// default), so a long prompt's lookup is split rather than refused.
const STORE_BATCH: usize = 1024;
/// How long one store call may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every policy, in the order `tandem ctl policy show` lists them.
pub const POLICIES: [PolicyKind; 5] = [
    PolicyKind::KvCentric,
    PolicyKind::Random,
    PolicyKind::RoundRobin,
    PolicyKind::LeastLoaded,
    PolicyKind::CacheAffinity,
];

/// A policy's name as the cluster file spells it (kebab-case; a test checks
/// it against serde's). The match is exhaustive, so a new policy cannot be
/// added without a name here (and an entry in [`POLICIES`]).
pub fn policy_name(p: PolicyKind) -> &'static str {
    match p {
        PolicyKind::KvCentric => "kv-centric",
        PolicyKind::Random => "random",
        PolicyKind::RoundRobin => "round-robin",
        PolicyKind::LeastLoaded => "least-loaded",
        PolicyKind::CacheAffinity => "cache-affinity",
    }
}

fn parse_policy(name: &str) -> Result<PolicyKind, Status> {
    POLICIES.into_iter().find(|&p| policy_name(p) == name).ok_or_else(|| {
        let names: Vec<&str> = POLICIES.into_iter().map(policy_name).collect();
        Status::invalid_argument(format!("unknown policy {name:?}; the policies are {}", names.join(", ")))
    })
}

/// The admin API's server, running until [`AdminHandle::shutdown`].
#[derive(Debug)]
pub struct AdminHandle {
    server: tandem_decode::wire::Server,
}

impl AdminHandle {
    /// Where it listens (the port chosen, if the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Stops accepting connections and waits for calls in progress.
    pub async fn shutdown(self) {
        let _ = self.server.stop.send(());
        if let Err(e) = self.server.task.await {
            tracing::warn!("admin API server task: {e}");
        }
    }
}

/// Binds `addr` (port 0 picks one) and serves the admin API of `conductor`
/// there.
pub async fn spawn(conductor: Arc<Conductor>, addr: SocketAddr) -> anyhow::Result<AdminHandle> {
    let gate = admin_gate(conductor.clone());
    let svc = AdminServer::new(AdminService { c: conductor }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, gate);
    let server = tandem_decode::wire::spawn_server("admin API", addr, tonic::service::Routes::new(svc), None)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(AdminHandle { server })
}

/// With API keys configured, every admin call needs `authorization:
/// Bearer KEY` naming an admin key (see [`crate::auth`]).
fn admin_gate(c: Arc<Conductor>) -> impl tonic::service::Interceptor + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        let presented = req.metadata().get("authorization").map(|v| v.as_encoded_bytes());
        match c.keys.check_admin(presented) {
            Ok(()) => Ok(req),
            Err(crate::auth::Denied::NotAdmin) => {
                Err(Status::permission_denied("this API key may not use the admin API (admin = false)"))
            }
            Err(crate::auth::Denied::Unauthenticated(why)) => Err(Status::unauthenticated(why)),
            Err(crate::auth::Denied::Limited { message, .. }) => Err(Status::resource_exhausted(message)),
        }
    }
}

#[derive(Debug)]
struct AdminService {
    c: Arc<Conductor>,
}

fn health(h: &Health) -> String {
    match h {
        Health::Unknown => "unknown".into(),
        Health::Up => "up".into(),
        Health::Down { error } => format!("down: {error}"),
    }
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
    }
}

fn stage(s: Stage) -> &'static str {
    match s {
        Stage::Prefilling => "prefilling",
        Stage::Decoding => "decoding",
        Stage::Retrying => "retrying",
    }
}

/// The fields every node has; the caller adds load, KV pages and work.
fn base_info(b: &NodeBase) -> pb::NodeInfo {
    pb::NodeInfo {
        name: b.name.clone(),
        role: role(b.role).into(),
        address: b.addr.to_string(),
        health: health(&b.health),
        draining: b.draining,
        profiled: b.profiled,
        discovered: b.discovered,
        last_ok_ms_ago: b.last_ok.map(|t| t.elapsed().as_millis().min(u64::MAX as u128) as u64),
        ..Default::default()
    }
}

fn prefill_info(n: &PrefillNode) -> pb::NodeInfo {
    let mut info = base_info(&n.base);
    if let Some(s) = &n.status {
        info.load = Some(pb::node_info::Load::Prefill(pb::PrefillLoad {
            queued_requests: s.queued_requests,
            queued_tokens: s.queued_tokens,
            predicted_work_ms: s.predicted_work_us as f64 / 1000.0,
        }));
        info.kv_pages_total = s.kv_pages_total;
        info.kv_pages_free = s.kv_pages_free;
    }
    info.in_flight = n.outstanding.len() as u32;
    info.cost_correction = n.cost.0.correction;
    info
}

fn decode_info(n: &DecodeNode) -> pb::NodeInfo {
    let mut info = base_info(&n.base);
    if let Some(s) = &n.status {
        info.load = Some(pb::node_info::Load::Decode(pb::DecodeLoad {
            batch_size: s.batch_size,
            waiting: s.waiting,
            step_ms: s.step_us as f64 / 1000.0,
            context_tokens: s.context_tokens,
            max_batch: n.max_batch,
        }));
        info.kv_pages_total = s.kv_pages_total;
        info.kv_pages_free = s.kv_pages_free;
    }
    info.in_flight = n.seqs.len() as u32;
    info.cost_correction = n.cost.0.correction;
    info
}

fn request_info(id: u64, t: &Tracked) -> pb::RequestInfo {
    pb::RequestInfo {
        id,
        request_id: t.request_id.clone(),
        stage: stage(t.stage).into(),
        prefill_node: t.prefill.clone(),
        decode_node: t.decode.clone(),
        prompt_tokens: t.prompt_tokens,
        cached_tokens: t.cached_tokens,
        generated: t.generated,
        attempts: t.attempts,
        age_ms: t.arrived.elapsed().as_millis().min(u64::MAX as u128) as u64,
    }
}

fn known_nodes(st: &State) -> String {
    let names: Vec<&str> =
        st.prefill.iter().map(|n| n.base.name.as_str()).chain(st.decode.iter().map(|n| n.base.name.as_str())).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn tier_name(t: i32) -> &'static str {
    match store_pb::Tier::try_from(t) {
        Ok(store_pb::Tier::Dram) => "dram",
        Ok(store_pb::Tier::Ssd) => "ssd",
        _ => "unknown",
    }
}

fn store_node(n: &store_pb::NodeUsage) -> pb::StoreNode {
    pb::StoreNode {
        name: n.endpoint.as_ref().map(|e| e.name.clone()).unwrap_or_default(),
        tiers: n
            .tiers
            .iter()
            .map(|t| pb::StoreTier {
                tier: tier_name(t.tier).into(),
                capacity_bytes: t.capacity,
                used_bytes: t.used,
                blocks: t.blocks,
            })
            .collect(),
        last_heartbeat_ms_ago: n.last_heartbeat_ms_ago,
    }
}

/// One store call, bounded in time, its error mapped for the caller.
async fn store_call<T>(call: impl Future<Output = Result<T, StoreError>>) -> Result<T, Status> {
    match tokio::time::timeout(STORE_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_retryable() => Err(Status::unavailable(e.to_string())),
        Ok(Err(e)) => Err(Status::internal(e.to_string())),
        Err(_) => Err(Status::deadline_exceeded(format!("the KV store did not answer within {STORE_TIMEOUT:?}"))),
    }
}

/// How many leading `keys` the store holds, asked in batches the master
/// accepts (stopping at the first batch with a miss).
async fn longest_prefix(store: &StoreClient, keys: &[BlockKey]) -> Result<usize, Status> {
    let mut cached = 0;
    for chunk in keys.chunks(STORE_BATCH) {
        let n = store_call(store.longest_prefix(chunk)).await?;
        cached += n.min(chunk.len());
        if n < chunk.len() {
            break;
        }
    }
    Ok(cached)
}

/// A prompt as the cache requests give it, before tokenizing.
struct PromptSpec {
    text: String,
    chat: bool,
    token_ids: Vec<u32>,
}

impl AdminService {
    fn store(&self) -> Result<&StoreClient, Status> {
        self.c.store.as_deref().ok_or_else(|| Status::failed_precondition("this conductor runs without the KV store"))
    }

    /// The cluster's key salt: it needs the model fingerprint the first
    /// node to answer reported.
    fn salt(&self) -> Result<KeySalt, Status> {
        let Some(fingerprint) = self.c.state.lock().fingerprint.clone() else {
            return Err(Status::failed_precondition(
                "no node has reported its model yet, so the cache keys cannot be derived; \
                 try again once a worker is up",
            ));
        };
        Ok(KeySalt::new(&fingerprint, &self.c.model.kv_dtype, self.c.model.block_tokens as usize))
    }

    /// The prompt's token ids: text tokenized as the HTTP API does (a
    /// completion prompt, or one user message through the chat template),
    /// off the async threads since a long text takes a while.
    async fn tokens(&self, p: PromptSpec) -> Result<Vec<u32>, Status> {
        match (p.text.is_empty(), p.token_ids.is_empty()) {
            (true, true) => Err(Status::invalid_argument("give the prompt as text or as token ids")),
            (false, false) => Err(Status::invalid_argument("give the prompt as text or as token ids, not both")),
            (true, false) => {
                if p.chat {
                    return Err(Status::invalid_argument("chat applies to a text prompt, not to token ids"));
                }
                if p.token_ids.len() > MAX_TOKEN_IDS {
                    return Err(Status::invalid_argument(format!(
                        "{} token ids; the limit is {MAX_TOKEN_IDS}",
                        p.token_ids.len()
                    )));
                }
                let vocab = self.c.model.tokenizer.vocab_size();
                if let Some(bad) = p.token_ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(Status::invalid_argument(format!(
                        "token id {bad} is outside the vocabulary (size {vocab})"
                    )));
                }
                Ok(p.token_ids)
            }
            (false, true) => {
                if p.text.len() > MAX_TEXT_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "the text is {} bytes; the limit is {MAX_TEXT_BYTES}",
                        p.text.len()
                    )));
                }
                let c = self.c.clone();
                let encoded = tokio::task::spawn_blocking(move || {
                    let tokenizer = &c.model.tokenizer;
                    if p.chat {
                        crate::text::render_chat(tokenizer, &c.model.template, &[ChatMessage::user(p.text)])
                    } else {
                        tokenizer.encode(&p.text, true).map_err(anyhow::Error::from)
                    }
                })
                .await
                .map_err(|e| Status::internal(format!("tokenizing: {e}")))?;
                encoded.map_err(|e| Status::invalid_argument(format!("cannot tokenize the text: {e:#}")))
            }
        }
    }

    /// Flips a node's drain flag and returns the node as it is now.
    fn set_draining(&self, name: &str, draining: bool) -> Result<pb::NodeInfo, Status> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument(format!("a node name is 1 to {MAX_NAME_BYTES} bytes")));
        }
        let mut guard = self.c.state.lock();
        let st = &mut *guard;
        let info = if let Some(n) = st.prefill.iter_mut().find(|n| n.base.name == name) {
            n.base.draining = draining;
            n.base.publish(&self.c.metrics);
            prefill_info(n)
        } else if let Some(n) = st.decode.iter_mut().find(|n| n.base.name == name) {
            n.base.draining = draining;
            n.base.publish(&self.c.metrics);
            decode_info(n)
        } else {
            return Err(Status::not_found(format!("no node named {name:?}; the nodes are {}", known_nodes(st))));
        };
        tracing::info!(node = name, draining, in_flight = info.in_flight, "admin: drain flag set");
        Ok(info)
    }

    fn policy_reply(&self) -> pb::PolicyReply {
        pb::PolicyReply {
            policy: policy_name(self.c.state.lock().scheduler.policy).into(),
            available: POLICIES.into_iter().map(|p| policy_name(p).to_string()).collect(),
        }
    }

    fn slo_reply(&self) -> pb::SloReply {
        let slo = self.c.state.lock().scheduler.slo;
        pb::SloReply { ttft_ms: slo.ttft_ms, tbt_ms: slo.tbt_ms }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn nodes(&self, _req: Request<pb::NodesRequest>) -> Result<Response<pb::NodesReply>, Status> {
        let st = self.c.state.lock();
        let nodes = st.prefill.iter().map(prefill_info).chain(st.decode.iter().map(decode_info)).collect();
        Ok(Response::new(pb::NodesReply { nodes }))
    }

    async fn drain(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::NodeInfo>, Status> {
        self.set_draining(&req.into_inner().name, true).map(Response::new)
    }

    async fn undrain(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::NodeInfo>, Status> {
        self.set_draining(&req.into_inner().name, false).map(Response::new)
    }

    async fn requests(&self, req: Request<pb::RequestsRequest>) -> Result<Response<pb::RequestsReply>, Status> {
        let limit = match req.into_inner().limit as usize {
            0 => DEFAULT_REQUESTS,
            n => n.min(MAX_REQUESTS),
        };
        let st = self.c.state.lock();
        // Ids grow with arrival, so the map's order is oldest first.
        let requests = st.requests.iter().take(limit).map(|(&id, t)| request_info(id, t)).collect();
        Ok(Response::new(pb::RequestsReply { requests, total: st.requests.len() as u64 }))
    }

    async fn cache_stats(&self, _req: Request<pb::CacheStatsRequest>) -> Result<Response<pb::CacheStatsReply>, Status> {
        let store = self.store()?;
        let s = store_call(store.stats()).await?;
        let prompt_tokens = self.c.prompt_total.load(Ordering::Relaxed);
        let cached_tokens = self.c.cached_total.load(Ordering::Relaxed);
        Ok(Response::new(pb::CacheStatsReply {
            nodes: s.nodes.iter().map(store_node).collect(),
            objects: s.objects,
            pending_puts: s.pending_puts,
            active_leases: s.active_leases,
            pinned: s.pinned,
            policy: s.policy,
            counters: s.counters,
            prompt_tokens,
            cached_tokens,
            cache_hit_ratio: if prompt_tokens == 0 { 0.0 } else { cached_tokens as f64 / prompt_tokens as f64 },
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn cache_evict(&self, req: Request<pb::CacheEvictRequest>) -> Result<Response<pb::CacheEvictReply>, Status> {
        let r = req.into_inner();
        let store = self.store()?;
        let salt = self.salt()?.for_tenant(&r.tenant);
        let tokens = self.tokens(PromptSpec { text: r.text, chat: r.chat, token_ids: r.token_ids }).await?;
        let bt = self.c.model.block_tokens as usize;
        let keys = block_keys(salt, &tokens, bt);
        let mut removed = 0u32;
        for chunk in keys.chunks(STORE_BATCH) {
            removed += store_call(store.remove(chunk)).await?;
        }
        tracing::info!(tokens = tokens.len(), blocks = keys.len(), removed, "admin: evicted a prompt's blocks");
        Ok(Response::new(pb::CacheEvictReply { tokens: tokens.len() as u32, blocks: keys.len() as u32, removed }))
    }

    async fn cache_lookup(
        &self,
        req: Request<pb::CacheLookupRequest>,
    ) -> Result<Response<pb::CacheLookupReply>, Status> {
        let r = req.into_inner();
        let store = self.store()?;
        let salt = self.salt()?.for_tenant(&r.tenant);
        let tokens = self.tokens(PromptSpec { text: r.text, chat: r.chat, token_ids: r.token_ids }).await?;
        let bt = self.c.model.block_tokens;
        let keys = block_keys(salt, &tokens, bt as usize);
        let cached = longest_prefix(store, &keys).await? as u32;
        Ok(Response::new(pb::CacheLookupReply {
            tokens: tokens.len() as u32,
            blocks: keys.len() as u32,
            cached_blocks: cached,
            cached_tokens: cached * bt,
            block_tokens: bt,
        }))
    }

    async fn get_policy(&self, _req: Request<pb::GetPolicyRequest>) -> Result<Response<pb::PolicyReply>, Status> {
        Ok(Response::new(self.policy_reply()))
    }

    async fn set_policy(&self, req: Request<pb::SetPolicyRequest>) -> Result<Response<pb::PolicyReply>, Status> {
        let name = req.into_inner().policy;
        if name.len() > MAX_NAME_BYTES {
            return Err(Status::invalid_argument(format!("a policy name is at most {MAX_NAME_BYTES} bytes")));
        }
        let policy = parse_policy(&name)?;
        let old = std::mem::replace(&mut self.c.state.lock().scheduler.policy, policy);
        tracing::info!(from = policy_name(old), to = policy_name(policy), "admin: scheduling policy changed");
        Ok(Response::new(self.policy_reply()))
    }

    async fn get_slo(&self, _req: Request<pb::GetSloRequest>) -> Result<Response<pb::SloReply>, Status> {
        Ok(Response::new(self.slo_reply()))
    }

    async fn set_slo(&self, req: Request<pb::SetSloRequest>) -> Result<Response<pb::SloReply>, Status> {
        let r = req.into_inner();
        if r.ttft_ms.is_none() && r.tbt_ms.is_none() {
            return Err(Status::invalid_argument("give ttft_ms, tbt_ms or both"));
        }
        for (what, v) in [("ttft_ms", r.ttft_ms), ("tbt_ms", r.tbt_ms)] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Status::invalid_argument(format!(
                    "{what} must be a positive number of milliseconds, not {v}"
                )));
            }
        }
        let slo = {
            let mut st = self.c.state.lock();
            let slo = &mut st.scheduler.slo;
            slo.ttft_ms = r.ttft_ms.unwrap_or(slo.ttft_ms);
            slo.tbt_ms = r.tbt_ms.unwrap_or(slo.tbt_ms);
            *slo
        };
        tracing::info!(ttft_ms = slo.ttft_ms, tbt_ms = slo.tbt_ms, "admin: SLOs changed");
        Ok(Response::new(pb::SloReply { ttft_ms: slo.ttft_ms, tbt_ms: slo.tbt_ms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConductorConfig;
    use crate::service::{ModelInfo, Workers};
    use pb::admin_client::AdminClient;
    use std::time::Instant;
    use tonic::transport::Channel;
    use tonic::Code;

    /// A conductor of SmolLM2 (its real tokenizer and template) over
    /// `workers`, without the store; nothing polls the workers.
    fn conductor(workers: &Workers) -> Arc<Conductor> {
        let path = tandem_model::fetch::resolve("smollm2", false).expect("SmolLM2 in the model cache");
        let (tokenizer, config) = tandem_model::engine::load_tokenizer(&path).expect("tokenizer");
        let kv = tandem_model::kv_cache::KvDType::F32;
        let model = ModelInfo::new("smollm2".into(), tokenizer, &config, kv, 16).expect("model info");
        Conductor::new(ConductorConfig::default(), model, workers, None).expect("conductor")
    }

    /// Two workers at addresses where nothing listens.
    fn workers() -> Workers {
        Workers {
            prefill: vec![("prefill-0".into(), "127.0.0.1:1".parse().unwrap())],
            decode: vec![("decode-0".into(), "127.0.0.1:2".parse().unwrap(), 8)],
        }
    }

    async fn serve(c: &Arc<Conductor>) -> (AdminHandle, AdminClient<Channel>) {
        let handle = spawn(c.clone(), "127.0.0.1:0".parse().unwrap()).await.expect("admin API");
        let client = AdminClient::connect(format!("http://{}", handle.local_addr())).await.expect("connect");
        (handle, client)
    }

    #[test]
    fn policy_names_are_the_cluster_files() {
        for p in POLICIES {
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(policy_name(p)));
            assert_eq!(parse_policy(policy_name(p)).unwrap(), p);
        }
        assert_eq!(parse_policy("KvCentric").unwrap_err().code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn nodes_lists_configured_workers_unknown_then_down() {
        let c = conductor(&workers());
        let (handle, mut client) = serve(&c).await;
        let nodes = client.nodes(pb::NodesRequest {}).await.unwrap().into_inner().nodes;
        let summary: Vec<(&str, &str, &str, &str)> =
            nodes.iter().map(|n| (n.name.as_str(), n.role.as_str(), n.address.as_str(), n.health.as_str())).collect();
        assert_eq!(
            summary,
            [("prefill-0", "prefill", "127.0.0.1:1", "unknown"), ("decode-0", "decode", "127.0.0.1:2", "unknown")]
        );
        assert!(nodes.iter().all(|n| n.load.is_none() && n.kv_pages_total == 0 && n.last_ok_ms_ago.is_none()));
        assert!(nodes.iter().all(|n| n.cost_correction == 1.0 && !n.draining && !n.profiled && !n.discovered));

        // Polled, a node that refuses connections is down at its first
        // failed status (it was never up), with the reason.
        c.spawn_pollers();
        let deadline = Instant::now() + Duration::from_secs(30);
        let nodes = loop {
            let nodes = client.nodes(pb::NodesRequest {}).await.unwrap().into_inner().nodes;
            if nodes.iter().all(|n| n.health.starts_with("down: ")) {
                break nodes;
            }
            assert!(Instant::now() < deadline, "nodes never marked down: {nodes:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(nodes.iter().all(|n| n.health.len() > "down: ".len()), "{nodes:?}");
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn drain_flips_the_flag_and_unknown_nodes_are_not_found() {
        let c = conductor(&workers());
        let (handle, mut client) = serve(&c).await;
        let info = client.drain(pb::NodeRef { name: "decode-0".into() }).await.unwrap().into_inner();
        assert!(info.draining);
        assert_eq!((info.name.as_str(), info.role.as_str()), ("decode-0", "decode"));
        assert!(c.state.lock().decode[0].base.draining);
        assert!(!c.state.lock().prefill[0].base.draining);
        let info = client.undrain(pb::NodeRef { name: "decode-0".into() }).await.unwrap().into_inner();
        assert!(!info.draining);
        assert!(!c.state.lock().decode[0].base.draining);

        let err = client.drain(pb::NodeRef { name: "decode-9".into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.message().contains("prefill-0, decode-0"), "{}", err.message());
        let err = client.undrain(pb::NodeRef { name: "x".repeat(MAX_NAME_BYTES + 1) }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn policy_set_and_show_round_trip() {
        let c = conductor(&Workers::default());
        let (handle, mut client) = serve(&c).await;
        let shown = client.get_policy(pb::GetPolicyRequest {}).await.unwrap().into_inner();
        assert_eq!(shown.policy, "kv-centric");
        assert_eq!(shown.available.len(), POLICIES.len());
        let set = client.set_policy(pb::SetPolicyRequest { policy: "round-robin".into() }).await.unwrap();
        assert_eq!(set.into_inner().policy, "round-robin");
        assert_eq!(c.state.lock().scheduler.policy, PolicyKind::RoundRobin);
        assert_eq!(client.get_policy(pb::GetPolicyRequest {}).await.unwrap().into_inner().policy, "round-robin");

        let err = client.set_policy(pb::SetPolicyRequest { policy: "fastest".into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("cache-affinity"), "{}", err.message());
        assert_eq!(c.state.lock().scheduler.policy, PolicyKind::RoundRobin, "a refused change changes nothing");
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn slo_set_keeps_unset_values_and_refuses_bad_ones() {
        let c = conductor(&Workers::default());
        let (handle, mut client) = serve(&c).await;
        let shown = client.get_slo(pb::GetSloRequest {}).await.unwrap().into_inner();
        let defaults = crate::config::SloConfig::default();
        assert_eq!((shown.ttft_ms, shown.tbt_ms), (defaults.ttft_ms, defaults.tbt_ms));
        let set = client.set_slo(pb::SetSloRequest { ttft_ms: Some(500.0), tbt_ms: None }).await.unwrap();
        assert_eq!((set.get_ref().ttft_ms, set.get_ref().tbt_ms), (500.0, defaults.tbt_ms));
        let set = client.set_slo(pb::SetSloRequest { ttft_ms: None, tbt_ms: Some(40.0) }).await.unwrap();
        assert_eq!((set.get_ref().ttft_ms, set.get_ref().tbt_ms), (500.0, 40.0));
        assert_eq!(c.state.lock().scheduler.slo, crate::schedule::Slo { ttft_ms: 500.0, tbt_ms: 40.0 });

        for bad in [
            pb::SetSloRequest { ttft_ms: None, tbt_ms: None },
            pb::SetSloRequest { ttft_ms: Some(0.0), tbt_ms: None },
            pb::SetSloRequest { ttft_ms: Some(100.0), tbt_ms: Some(-1.0) },
            pb::SetSloRequest { ttft_ms: Some(f64::NAN), tbt_ms: None },
            pb::SetSloRequest { ttft_ms: None, tbt_ms: Some(f64::INFINITY) },
        ] {
            let err = client.set_slo(bad).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
        }
        assert_eq!(c.state.lock().scheduler.slo, crate::schedule::Slo { ttft_ms: 500.0, tbt_ms: 40.0 });
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn cache_rpcs_without_a_store_fail_precondition() {
        let c = conductor(&Workers::default());
        c.state.lock().fingerprint = Some("model".into());
        let (handle, mut client) = serve(&c).await;
        let text = || "Hello there".to_string();
        let errors = [
            client.cache_stats(pb::CacheStatsRequest {}).await.unwrap_err(),
            client.cache_lookup(pb::CacheLookupRequest { text: text(), ..Default::default() }).await.unwrap_err(),
            client.cache_evict(pb::CacheEvictRequest { text: text(), ..Default::default() }).await.unwrap_err(),
        ];
        for err in errors {
            assert_eq!(err.code(), Code::FailedPrecondition);
            assert_eq!(err.message(), "this conductor runs without the KV store");
        }
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn requests_lists_in_flight_oldest_first() {
        let c = conductor(&workers());
        let (handle, mut client) = serve(&c).await;
        let tracked = |id: &str, stage| Tracked {
            request_id: id.into(),
            stage,
            prefill: "prefill-0".into(),
            decode: "decode-0".into(),
            prompt_tokens: 100,
            cached_tokens: 32,
            generated: 7,
            attempts: 1,
            arrived: Instant::now(),
        };
        c.state.lock().requests.insert(2, tracked("b", Stage::Decoding));
        c.state.lock().requests.insert(1, tracked("a", Stage::Prefilling));
        let reply = client.requests(pb::RequestsRequest { limit: 0 }).await.unwrap().into_inner();
        assert_eq!(reply.total, 2);
        let listed: Vec<(u64, &str, &str)> =
            reply.requests.iter().map(|r| (r.id, r.request_id.as_str(), r.stage.as_str())).collect();
        assert_eq!(listed, [(1, "a", "prefilling"), (2, "b", "decoding")]);
        let r = &reply.requests[1];
        assert_eq!((r.prefill_node.as_str(), r.decode_node.as_str()), ("prefill-0", "decode-0"));
        assert_eq!((r.prompt_tokens, r.cached_tokens, r.generated, r.attempts), (100, 32, 7, 1));
        let reply = client.requests(pb::RequestsRequest { limit: 1 }).await.unwrap().into_inner();
        assert_eq!((reply.requests.len(), reply.total), (1, 2));
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn prompts_tokenize_like_the_http_api_and_keys_need_a_fingerprint() {
        let c = conductor(&Workers::default());
        let svc = AdminService { c: c.clone() };
        let spec = |text: &str, chat: bool, ids: Vec<u32>| PromptSpec { text: text.into(), chat, token_ids: ids };
        let text = "The quick brown fox jumps over the lazy dog.";
        let plain = svc.tokens(spec(text, false, vec![])).await.unwrap();
        assert_eq!(plain, c.model.tokenizer.encode(text, true).unwrap());
        let chat = svc.tokens(spec(text, true, vec![])).await.unwrap();
        assert_eq!(chat, crate::text::chat_prompt(&c.model.tokenizer, text, None).unwrap());
        assert!(chat.len() > plain.len(), "the template adds tokens");
        assert_eq!(svc.tokens(spec("", false, vec![1, 2, 3])).await.unwrap(), [1, 2, 3]);

        let vocab = c.model.tokenizer.vocab_size() as u32;
        let long = "a".repeat(MAX_TEXT_BYTES + 1);
        for bad in [
            spec("", false, vec![]),
            spec(text, false, vec![1]),
            spec("", true, vec![1]),
            spec("", false, vec![vocab]),
            spec(&long, false, vec![]),
        ] {
            assert_eq!(svc.tokens(bad).await.unwrap_err().code(), Code::InvalidArgument);
        }

        assert_eq!(svc.salt().unwrap_err().code(), Code::FailedPrecondition);
        c.state.lock().fingerprint = Some("model".into());
        assert_eq!(svc.salt().unwrap(), KeySalt::new("model", "f32", 16), "the salt the workers use");
    }
}
