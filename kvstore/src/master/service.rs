//! The master as a tonic service: the [`MasterState`] behind a short-held
//! mutex, a housekeeping loop that ticks it, and the tiering/replication
//! commands it sends to storage nodes' `StorageNode` services.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_proto::cluster_token::{authed, require_token, AuthChannel, ClusterToken};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_server::{Master, MasterServer};
use tandem_proto::kvstore::storage_node_client::StorageNodeClient;
use tandem_proto::BlockKey;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use super::persist::MetaStore;
use super::state::{BlockRange, Command, MasterError, MasterState, PutSlot};
use super::MasterConfig;
use crate::grant::{GrantKey, GRANT_KEY_LEN};
use crate::wire;

/// Wall-clock milliseconds (ids and deadlines survive restarts with it).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl From<MasterError> for Status {
    fn from(e: MasterError) -> Status {
        match e {
            MasterError::UnknownPut(_) => Status::not_found(e.to_string()),
            MasterError::Invalid(_) => Status::invalid_argument(e.to_string()),
            MasterError::Persist(_) => Status::unavailable(e.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
struct Shared {
    state: Arc<Mutex<MasterState>>,
    /// gRPC channels to storage nodes' control services, by address.
    nodes: Arc<Mutex<HashMap<String, StorageNodeClient<AuthChannel>>>>,
    /// Sent to storage nodes' control services.
    token: Option<ClusterToken>,
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut MasterState) -> T) -> Result<T, Status> {
        let mut guard = self.state.lock().map_err(|_| Status::internal("master state poisoned by an earlier panic"))?;
        Ok(f(&mut guard))
    }

    fn client(&self, addr: &str) -> Result<StorageNodeClient<AuthChannel>, String> {
        let mut nodes = self.nodes.lock().map_err(|_| "node client table poisoned".to_owned())?;
        if let Some(c) = nodes.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad node address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        let client = StorageNodeClient::new(authed(endpoint.connect_lazy(), self.token.as_ref()));
        nodes.insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}

/// A running master (in this process).
#[derive(Debug)]
pub struct MasterHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl MasterHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for MasterHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Opens (or recovers) the master's state and starts serving on
/// `cfg.listen` (port 0 picks a free port; see [`MasterHandle::local_addr`]).
pub async fn serve(cfg: MasterConfig) -> Result<MasterHandle, String> {
    cfg.validate()?;
    let now = now_ms();
    let state = match &cfg.metadata_dir {
        Some(dir) => {
            let dir = dir.clone();
            let store = tokio::task::spawn_blocking(move || MetaStore::open(&dir))
                .await
                .map_err(|e| format!("opening metadata store: {e}"))??;
            MasterState::recover(cfg.clone(), store, now).map_err(|e| e.to_string())?
        }
        None => MasterState::new(cfg.clone()),
    };
    let shared = Shared { state: Arc::new(Mutex::new(state)), nodes: Arc::default(), token: cfg.cluster_token.clone() };
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("binding {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let ticker = tokio::spawn(housekeeping(shared.clone(), Duration::from_millis(cfg.tick_ms)));
    let svc = MasterServer::new(MasterRpc { shared, cfg: cfg.clone() });
    let required = require_token(cfg.cluster_token.clone());
    let task = tokio::spawn(async move {
        // TCP_NODELAY: small replies must not wait on the delayed-ACK timer.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = tonic::transport::Server::builder()
            .layer(required)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await;
        ticker.abort();
        if let Err(e) = result {
            tracing::error!("master server failed: {e}");
        }
    });
    tracing::info!(%addr, "kvstore master serving");
    Ok(MasterHandle { addr, stop: Some(stop_tx), task })
}

/// Runs [`serve`] until `shutdown` resolves.
pub async fn run(cfg: MasterConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let handle = serve(cfg).await?;
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

async fn housekeeping(shared: Shared, period: Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let commands = match shared.with(|s| s.tick(now_ms())) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!("master tick: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("master tick: {e}");
                return;
            }
        };
        for command in commands {
            tokio::spawn(execute(shared.clone(), command));
        }
    }
}

fn range_to_pb(b: &BlockRange) -> pb::BlockRange {
    pb::BlockRange { key: b.key.0, segment: b.segment, offset: b.offset, len: b.len, checksum: b.checksum }
}

/// Sends one command to its node and reports the outcome to the state.
async fn execute(shared: Shared, command: Command) {
    let node = match &command {
        Command::Demote { node, .. }
        | Command::Promote { node, .. }
        | Command::DropSsd { node, .. }
        | Command::Replicate { node, .. } => node.clone(),
    };
    let client = shared.with(|s| s.control_addr(&node)).ok().flatten().map(|addr| shared.client(&addr));
    let mut client = match client {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            tracing::warn!(node, "cannot reach storage node: {e}");
            None
        }
        None => None,
    };
    match command {
        Command::Demote { node, blocks } => {
            let ok = match client.as_mut() {
                Some(c) => {
                    let req = pb::DemoteRequest { blocks: blocks.iter().map(range_to_pb).collect() };
                    c.demote(req).await.map(|r| r.into_inner().ok).unwrap_or_else(|e| {
                        tracing::warn!(node, "demote failed: {e}");
                        Vec::new()
                    })
                }
                None => Vec::new(),
            };
            for (i, b) in blocks.iter().enumerate() {
                let done = ok.get(i).copied().unwrap_or(false);
                let _ = shared.with(|s| s.demote_done(&node, b.key, done));
            }
        }
        Command::Promote { node, blocks } => {
            let ok = match client.as_mut() {
                Some(c) => {
                    let req = pb::PromoteRequest { blocks: blocks.iter().map(range_to_pb).collect() };
                    c.promote(req).await.map(|r| r.into_inner().ok).unwrap_or_else(|e| {
                        tracing::warn!(node, "promote failed: {e}");
                        Vec::new()
                    })
                }
                None => Vec::new(),
            };
            for (i, b) in blocks.iter().enumerate() {
                let done = ok.get(i).copied().unwrap_or(false);
                let _ = shared.with(|s| s.promote_done(&node, b.key, done));
            }
        }
        Command::DropSsd { node, keys } => {
            if let Some(c) = client.as_mut() {
                let req = pb::DropSsdRequest { keys: keys.iter().map(|k| k.0).collect() };
                if let Err(e) = c.drop_ssd(req).await {
                    tracing::warn!(node, "drop_ssd failed (the node reconciles at its next registration): {e}");
                }
            }
        }
        Command::Replicate { node, dest, source, source_peer } => {
            let ok = match client.as_mut() {
                Some(c) => {
                    let control = shared.with(|s| s.control_addr(&source_peer.name)).ok().flatten().unwrap_or_default();
                    let req = pb::ReplicateRequest {
                        dest: Some(range_to_pb(&dest)),
                        source: Some(wire::replica_to_pb(&source)),
                        source_node: Some(wire::peer_to_pb(&source_peer, &control)),
                    };
                    c.replicate(req).await.map(|r| r.into_inner().ok).unwrap_or_else(|e| {
                        tracing::warn!(node, "replicate failed: {e}");
                        false
                    })
                }
                None => false,
            };
            let _ = shared.with(|s| s.replicate_done(&node, dest.key, ok));
        }
    }
}

#[derive(Debug)]
struct MasterRpc {
    shared: Shared,
    cfg: MasterConfig,
}

fn keys_of(keys: &[u64]) -> Vec<BlockKey> {
    keys.iter().map(|k| BlockKey(*k)).collect()
}

#[tonic::async_trait]
impl Master for MasterRpc {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeReply>, Status> {
        let req = request.into_inner();
        let endpoint = req.endpoint.ok_or_else(|| Status::invalid_argument("endpoint missing"))?;
        let (peer, control_addr) = wire::peer_from_pb(endpoint)?;
        wire::check_batch("ssd blocks", req.ssd_blocks.len(), 1 << 24)?;
        let blocks: Vec<(BlockKey, u64, u64)> =
            req.ssd_blocks.iter().map(|b| (BlockKey(b.key), b.len, b.checksum)).collect();
        let grant_key = GrantKey::from_bytes(&req.grant_key).ok_or_else(|| {
            Status::invalid_argument(format!("grant_key is {} bytes, it must be {GRANT_KEY_LEN}", req.grant_key.len()))
        })?;
        let (name, incarnation) = (peer.name.clone(), peer.incarnation);
        let reject = self.shared.with(|s| {
            let reject = s.register_node(peer, control_addr.clone(), req.ssd_capacity, &blocks, now_ms())?;
            s.set_grant_key(&name, incarnation, grant_key);
            Ok::<_, MasterError>(reject)
        })??;
        if !reject.is_empty() {
            // The node's report disagreed with what the master holds: have it drop those files.
            let shared = self.shared.clone();
            tokio::spawn(execute(shared, Command::DropSsd { node: name, keys: reject }));
        }
        Ok(Response::new(pb::RegisterNodeReply {
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            node_timeout_ms: self.cfg.node_timeout_ms,
        }))
    }

    async fn heartbeat(&self, request: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        let req = request.into_inner();
        // A node the master knows without its grant key (recovered from the
        // metadata store) must register again to hand it over.
        let known =
            self.shared.with(|s| s.heartbeat(&req.node, req.incarnation, now_ms()) && s.has_grant_key(&req.node))?;
        Ok(Response::new(pb::HeartbeatReply { known }))
    }

    async fn put_start(&self, request: Request<pb::PutStartRequest>) -> Result<Response<pb::PutStartReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("items", req.items.len(), self.cfg.max_batch)?;
        let items: Vec<(BlockKey, u64)> = req.items.iter().map(|i| (BlockKey(i.key), i.len)).collect();
        let prefer = (!req.prefer_node.is_empty()).then_some(req.prefer_node.as_str());
        let (put_id, slots) = self.shared.with(|s| {
            let (put_id, slots) = s.put_start(&items, req.replicas, prefer, now_ms())?;
            // Each placement carries the grant its node checks writes with.
            let slots: Vec<(PutSlot, Vec<Vec<u8>>)> = slots
                .into_iter()
                .map(|slot| {
                    let grants = match &slot {
                        PutSlot::Reserved(p) => p
                            .iter()
                            .map(|r| s.write_grant(put_id, r).map(|g| g.encode().to_vec()).unwrap_or_default())
                            .collect(),
                        _ => Vec::new(),
                    };
                    (slot, grants)
                })
                .collect();
            Ok::<_, MasterError>((put_id, slots))
        })??;
        let slots = items
            .iter()
            .zip(slots)
            .map(|(&(key, _), (slot, grants))| {
                let (status, placements) = match slot {
                    PutSlot::Reserved(p) => (
                        pb::PutStatus::Reserved,
                        p.iter()
                            .zip(grants)
                            .map(|(r, write_grant)| pb::Replica { write_grant, ..wire::replica_to_pb(r) })
                            .collect(),
                    ),
                    PutSlot::Exists => (pb::PutStatus::Exists, Vec::new()),
                    PutSlot::InProgress => (pb::PutStatus::InProgress, Vec::new()),
                    PutSlot::NoSpace => (pb::PutStatus::NoSpace, Vec::new()),
                    PutSlot::TooLarge => (pb::PutStatus::TooLarge, Vec::new()),
                };
                pb::PutSlot { key: key.0, status: status as i32, placements }
            })
            .collect();
        Ok(Response::new(pb::PutStartReply { put_id, slots, timeout_ms: self.cfg.put_timeout_ms }))
    }

    async fn put_end(&self, request: Request<pb::PutEndRequest>) -> Result<Response<pb::PutEndReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("items", req.items.len(), self.cfg.max_batch)?;
        let done: Vec<(BlockKey, u64)> = req.items.iter().map(|i| (BlockKey(i.key), i.checksum)).collect();
        let published = self.shared.with(|s| s.put_end(req.put_id, &done))??;
        Ok(Response::new(pb::PutEndReply { published }))
    }

    async fn put_revoke(&self, request: Request<pb::PutRevokeRequest>) -> Result<Response<pb::PutRevokeReply>, Status> {
        let put_id = request.into_inner().put_id;
        let revoked = self.shared.with(|s| s.put_revoke(put_id))?;
        Ok(Response::new(pb::PutRevokeReply { revoked }))
    }

    async fn get_replicas(
        &self,
        request: Request<pb::GetReplicasRequest>,
    ) -> Result<Response<pb::GetReplicasReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("keys", req.keys.len(), self.cfg.max_batch)?;
        let keys = keys_of(&req.keys);
        let (lease_id, lease_ms, sets) = self.shared.with(|s| s.get_replicas(&keys, req.lease_ms, now_ms()))??;
        let entries = keys
            .iter()
            .zip(sets)
            .map(|(key, set)| match set {
                Some(set) => pb::ReplicaSet {
                    key: key.0,
                    found: true,
                    len: set.len,
                    checksum: set.checksum,
                    replicas: set.replicas.iter().map(wire::replica_to_pb).collect(),
                },
                None => pb::ReplicaSet { key: key.0, ..Default::default() },
            })
            .collect();
        Ok(Response::new(pb::GetReplicasReply { lease_id, entries, lease_ms }))
    }

    async fn release_lease(
        &self,
        request: Request<pb::ReleaseLeaseRequest>,
    ) -> Result<Response<pb::ReleaseLeaseReply>, Status> {
        let id = request.into_inner().lease_id;
        self.shared.with(|s| s.release_lease(id))??;
        Ok(Response::new(pb::ReleaseLeaseReply {}))
    }

    async fn touch(&self, request: Request<pb::TouchRequest>) -> Result<Response<pb::TouchReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("keys", req.keys.len(), self.cfg.max_batch)?;
        let found = self.shared.with(|s| s.touch(&keys_of(&req.keys)))??;
        Ok(Response::new(pb::TouchReply { found }))
    }

    async fn lookup(&self, request: Request<pb::LookupRequest>) -> Result<Response<pb::LookupReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("keys", req.keys.len(), self.cfg.max_batch)?;
        let (exists, longest_prefix) = self.shared.with(|s| s.lookup(&keys_of(&req.keys)))?;
        Ok(Response::new(pb::LookupReply { exists, longest_prefix }))
    }

    async fn remove(&self, request: Request<pb::RemoveRequest>) -> Result<Response<pb::RemoveReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("keys", req.keys.len(), self.cfg.max_batch)?;
        let removed = self.shared.with(|s| s.remove(&keys_of(&req.keys)))??;
        Ok(Response::new(pb::RemoveReply { removed }))
    }

    async fn pin(&self, request: Request<pb::PinRequest>) -> Result<Response<pb::PinReply>, Status> {
        let req = request.into_inner();
        wire::check_batch("keys", req.keys.len(), self.cfg.max_batch)?;
        let changed = self.shared.with(|s| s.pin(&keys_of(&req.keys), req.pinned))??;
        Ok(Response::new(pb::PinReply { changed }))
    }

    async fn report_bad_replica(
        &self,
        request: Request<pb::ReportBadReplicaRequest>,
    ) -> Result<Response<pb::ReportBadReplicaReply>, Status> {
        let req = request.into_inner();
        let key = BlockKey(req.key);
        let replica =
            wire::replica_from_pb(key, req.replica.ok_or_else(|| Status::invalid_argument("replica missing"))?)?;
        tracing::warn!(key = format_args!("{:016x}", key.0), node = %replica.node, reason = %req.reason.chars().take(200).collect::<String>(), "bad replica reported");
        self.shared.with(|s| s.report_bad_replica(key, &replica))??;
        Ok(Response::new(pb::ReportBadReplicaReply {}))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesReply>, Status> {
        let nodes = self.shared.with(|s| s.list_nodes())?;
        Ok(Response::new(pb::ListNodesReply { nodes: nodes.iter().map(|(p, c)| wire::peer_to_pb(p, c)).collect() }))
    }

    async fn stats(&self, _: Request<pb::StatsRequest>) -> Result<Response<pb::StatsReply>, Status> {
        let stats = self.shared.with(|s| s.stats(now_ms()))?;
        Ok(Response::new(pb::StatsReply {
            nodes: stats
                .nodes
                .iter()
                .map(|n| pb::NodeUsage {
                    endpoint: Some(wire::peer_to_pb(&n.peer, &n.control_addr)),
                    tiers: n
                        .tiers
                        .iter()
                        .map(|t| pb::TierUsage {
                            tier: wire::tier_to_pb(t.tier) as i32,
                            capacity: t.capacity,
                            used: t.used,
                            blocks: t.blocks,
                        })
                        .collect(),
                    last_heartbeat_ms_ago: n.last_heartbeat_ms_ago,
                })
                .collect(),
            objects: stats.objects,
            pending_puts: stats.pending_puts,
            active_leases: stats.active_leases,
            pinned: stats.pinned,
            counters: stats.counters.into_iter().collect(),
            policy: stats.policy,
        }))
    }

    async fn list_keys(&self, request: Request<pb::ListKeysRequest>) -> Result<Response<pb::ListKeysReply>, Status> {
        let req = request.into_inner();
        let limit = (req.limit as usize).clamp(1, 10_000);
        let keys = self.shared.with(|s| s.list_keys(BlockKey(req.after), limit))?;
        Ok(Response::new(pb::ListKeysReply {
            keys: keys
                .iter()
                .map(|k| pb::KeyInfo {
                    key: k.key.0,
                    len: k.len,
                    checksum: k.checksum,
                    replicas: k.replicas.iter().map(wire::replica_to_pb).collect(),
                    pinned: k.pinned,
                    leases: k.leases,
                })
                .collect(),
        }))
    }
}
