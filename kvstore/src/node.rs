//! A storage node: contributes DRAM segments and an SSD tier, serves the
//! data plane (tcp; same-host clients map its files directly), carries out
//! the master's tiering and replication commands, and keeps itself
//! registered with heartbeats.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tandem_proto::cluster_token::{require_token, ClusterToken};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::storage_node_server::{StorageNode, StorageNodeServer};
use tandem_proto::BlockKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::checksum::BlockChecksum;
use crate::client::master_client;
use crate::error::StoreError;
use crate::grant::{GrantKey, GrantLedger, WriteGrant};
use crate::segment::Segment;
use crate::ssd::SsdTier;
use crate::transport::{
    connect, local_host_id, DataServer, DataTarget, ReadOp, TcpConfig, TransferError, TransportConfig,
};
use crate::types::{PeerInfo, SegmentDesc};
use crate::wire;

/// Configuration of one storage node (`[[kvstore.storage]]` in the cluster file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Unique node name.
    pub name: String,
    /// The master's gRPC address (host:port); empty = the cluster file's master.
    pub master: String,
    /// gRPC control address (the master's commands arrive here).
    pub listen: SocketAddr,
    /// Data-plane (tcp transport) address.
    pub data_listen: SocketAddr,
    /// DRAM contributed, in total.
    pub dram: ByteSize,
    /// Size of each DRAM segment (the last one may be smaller).
    pub segment_size: ByteSize,
    /// Where segment files are created (a tmpfs such as /dev/shm keeps them in RAM).
    pub shm_dir: PathBuf,
    /// Ask for transparent huge pages on segments.
    pub huge_pages: bool,
    /// SSD tier directory (block files + rocksdb index); none = DRAM only.
    pub ssd_dir: Option<PathBuf>,
    /// SSD tier capacity.
    pub ssd: ByteSize,
    /// How this node pulls replicas from other nodes.
    pub transport: TransportConfig,
    /// Required on the control service and the data port, and sent to the
    /// master and to other nodes (filled in at start from `[auth]`, never
    /// read from the file).
    #[serde(skip)]
    pub cluster_token: Option<ClusterToken>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            name: "store-0".into(),
            master: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7201)),
            data_listen: SocketAddr::from(([127, 0, 0, 1], 7202)),
            dram: ByteSize::gib(1),
            segment_size: ByteSize::gib(1),
            shm_dir: PathBuf::from("/dev/shm"),
            huge_pages: true,
            ssd_dir: None,
            ssd: ByteSize::gib(0),
            transport: TransportConfig::default(),
            cluster_token: None,
        }
    }
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), String> {
        let err = |m: String| Err(format!("kvstore.storage {:?}: {m}", self.name));
        if self.name.is_empty() || self.name.len() > wire::MAX_NAME {
            return err("name must be 1..=256 bytes".into());
        }
        if self.dram.as_u64() < 1 << 20 {
            return err(format!("dram {} is below the 1 MiB minimum", self.dram));
        }
        if self.segment_size.as_u64() < 1 << 20 {
            return err(format!("segment_size {} is below the 1 MiB minimum", self.segment_size));
        }
        if self.dram.as_u64().div_ceil(self.segment_size.as_u64()) > wire::MAX_SEGMENTS as u64 {
            return err(format!("dram / segment_size exceeds {} segments", wire::MAX_SEGMENTS));
        }
        if self.master.is_empty() {
            return err("master address is not set".into());
        }
        if self.ssd.as_u64() > 0 && self.ssd_dir.is_none() {
            return err("ssd is set but ssd_dir is not".into());
        }
        Ok(())
    }
}

/// The node's memory and disk, as the data server and commands see them.
#[derive(Debug)]
struct NodeData {
    segments: Vec<Arc<Segment>>,
    ssd: Option<SsdTier>,
    /// Checks the grants of data-plane writes; the master has it too.
    grant_key: GrantKey,
    /// The newest grant written with over each range.
    grants: parking_lot::Mutex<GrantLedger>,
    /// Data-plane writes refused for want of a valid grant.
    writes_denied: std::sync::atomic::AtomicU64,
}

impl DataTarget for NodeData {
    fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        self.segments.get(id as usize).cloned()
    }

    fn ssd_block_fits(&self, key: BlockKey, len: u64) -> bool {
        self.ssd.as_ref().and_then(|s| s.entry(key)).is_some_and(|e| e.len == len)
    }

    fn read_ssd(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), TransferError> {
        let ssd = self.ssd.as_ref().ok_or(TransferError::NotFound)?;
        // A corrupt block is already dropped by the tier: to the reader it is a miss.
        ssd.read_into(key, dst).map_err(|e| {
            if e.is_miss() {
                TransferError::NotFound
            } else {
                TransferError::Io(e.to_string())
            }
        })
    }

    fn authorize_write(&self, segment: u32, offset: u64, len: u64, grant: Option<&[u8]>) -> Result<(), String> {
        let now = crate::master::service::now_ms();
        let checked = match grant {
            None => Err(crate::grant::GrantError::Missing),
            Some(g) => WriteGrant::decode(g).and_then(|g| {
                g.check(&self.grant_key, segment, offset, len, now)?;
                self.grants.lock().admit(&g, now)
            }),
        };
        checked.map_err(|e| {
            self.writes_denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            e.to_string()
        })
    }
}

/// A running storage node (in this process).
#[derive(Debug)]
pub struct NodeHandle {
    pub peer: PeerInfo,
    pub control_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    data_server: Option<DataServer>,
}

impl NodeHandle {
    /// Stops heartbeats and both servers; segment files are removed when
    /// the last user lets go (the SSD tier stays for the next start).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.data_server.take() {
            s.shutdown().await;
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Creates the node's segments, opens its SSD tier, starts its servers and
/// registers with the master (retrying in the background until it answers).
pub async fn start(cfg: StorageConfig) -> Result<NodeHandle, StoreError> {
    cfg.validate().map_err(StoreError::Config)?;
    let incarnation = rand::random::<u64>().max(1);
    let mut segments = Vec::new();
    let mut descs = Vec::new();
    let mut left = cfg.dram.as_u64();
    let mut id = 0u32;
    while left > 0 {
        let bytes = left.min(cfg.segment_size.as_u64());
        let path = cfg.shm_dir.join(format!("tandem-{}-{incarnation:016x}-{id}.seg", cfg.name));
        let seg = Segment::create(&path, bytes, cfg.huge_pages).map_err(|e| StoreError::Io(e.to_string()))?;
        descs.push(SegmentDesc { id, bytes, path });
        segments.push(Arc::new(seg));
        left -= bytes;
        id += 1;
    }
    let ssd = match &cfg.ssd_dir {
        Some(dir) if cfg.ssd.as_u64() > 0 => {
            let (dir, cap) = (dir.clone(), cfg.ssd.as_u64());
            let tier = tokio::task::spawn_blocking(move || SsdTier::open(&dir, cap))
                .await
                .map_err(|e| StoreError::Io(e.to_string()))?
                .map_err(|e| StoreError::Io(e.to_string()))?;
            Some(tier)
        }
        _ => None,
    };
    let data = Arc::new(NodeData {
        segments,
        ssd,
        grant_key: GrantKey::random(),
        grants: Default::default(),
        writes_denied: Default::default(),
    });
    let data_cfg = TcpConfig { cluster_token: cfg.cluster_token.clone(), ..TcpConfig::default() };
    let data_server = DataServer::bind(cfg.data_listen, data.clone(), data_cfg)
        .await
        .map_err(|e| StoreError::Io(format!("binding data port {}: {e}", cfg.data_listen)))?;
    let peer = PeerInfo {
        name: cfg.name.clone(),
        incarnation,
        data_addr: data_server.local_addr(),
        host_id: local_host_id(),
        segments: descs,
        ssd_dir: data.ssd.as_ref().map(|s| s.dir().to_path_buf()),
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| StoreError::Io(format!("binding control port {}: {e}", cfg.listen)))?;
    let control_addr = listener.local_addr().map_err(|e| StoreError::Io(e.to_string()))?;
    let (stop, stop_rx) = watch::channel(false);
    let mut transport = cfg.transport.clone();
    if cfg.cluster_token.is_some() {
        transport.tcp.cluster_token = cfg.cluster_token.clone();
    }
    let rpc = NodeRpc { data: data.clone(), host_id: peer.host_id.clone(), transport };
    let required = require_token(cfg.cluster_token.clone());
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        // TCP_NODELAY: small replies must not wait on the delayed-ACK timer.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let result = tonic::transport::Server::builder()
            .layer(required)
            .add_service(StorageNodeServer::new(rpc))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("storage node control server failed: {e}");
        }
    });
    let membership = tokio::spawn(stay_registered(cfg.clone(), peer.clone(), control_addr, data.clone(), stop_rx));
    tracing::info!(node = %cfg.name, %control_addr, data_addr = %peer.data_addr, dram = %cfg.dram, ssd = %cfg.ssd, "storage node started");
    Ok(NodeHandle { peer, control_addr, stop, tasks: vec![server, membership], data_server: Some(data_server) })
}

/// Runs a node until `shutdown` resolves.
pub async fn run(cfg: StorageConfig, shutdown: impl Future<Output = ()>) -> Result<(), StoreError> {
    let handle = start(cfg).await?;
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

/// Registers, then heartbeats; registers again whenever the master forgets
/// this node (it restarted, or timed the node out).
async fn stay_registered(
    cfg: StorageConfig,
    peer: PeerInfo,
    control_addr: SocketAddr,
    data: Arc<NodeData>,
    mut stop: watch::Receiver<bool>,
) {
    let master = match master_client(&cfg.master, Duration::from_secs(10), cfg.cluster_token.as_ref()) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("storage node cannot use master address: {e}");
            return;
        }
    };
    let mut registered = false;
    let mut interval = Duration::from_millis(500);
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        if !registered {
            let ssd_blocks = data
                .ssd
                .as_ref()
                .map(|s| {
                    s.list()
                        .into_iter()
                        .map(|e| pb::SsdBlock { key: e.key.0, len: e.len, checksum: e.checksum.0 })
                        .collect()
                })
                .unwrap_or_default();
            let req = pb::RegisterNodeRequest {
                endpoint: Some(wire::peer_to_pb(&peer, &control_addr.to_string())),
                ssd_capacity: data.ssd.as_ref().map_or(0, |s| s.capacity_bytes()),
                ssd_blocks,
                grant_key: data.grant_key.as_bytes().to_vec(),
            };
            match master.clone().register_node(req).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    interval = Duration::from_millis(reply.heartbeat_interval_ms.clamp(10, 60_000));
                    registered = true;
                    backoff = Duration::from_millis(100);
                    tracing::info!(node = %peer.name, "registered with the master");
                }
                Err(e) if e.code() == tonic::Code::Unauthenticated => {
                    // A configuration error, not a passing fault: said
                    // loudly, and retried slowly in case the operator
                    // fixes the master's side.
                    tracing::error!(
                        node = %peer.name,
                        "the master refused this node's cluster token; not registered (check [auth] \
                         cluster_token_env / cluster_token_file on both): {}",
                        e.message()
                    );
                    let _ = tokio::time::timeout(Duration::from_secs(5), stop.changed()).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(node = %peer.name, "registration failed, retrying in {backoff:?}: {e}");
                    let _ = tokio::time::timeout(backoff, stop.changed()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let _ = tokio::time::timeout(interval, stop.changed()).await;
        if *stop.borrow() {
            return;
        }
        let req = pb::HeartbeatRequest { node: peer.name.clone(), incarnation: peer.incarnation };
        match master.clone().heartbeat(req).await {
            Ok(r) if r.get_ref().known => {}
            Ok(_) => {
                tracing::warn!(node = %peer.name, "master does not know this node; registering again");
                registered = false;
            }
            Err(e) => tracing::warn!(node = %peer.name, "heartbeat failed: {e}"),
        }
    }
}

#[derive(Debug)]
struct NodeRpc {
    data: Arc<NodeData>,
    host_id: String,
    transport: TransportConfig,
}

fn blocking_err(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("worker failed: {e}"))
}

impl NodeData {
    /// DRAM → SSD for one block, checking the bytes against the checksum
    /// the writer published (a bad DRAM copy is not spread to disk).
    fn demote(&self, b: &pb::BlockRange) -> Result<(), String> {
        let ssd = self.ssd.as_ref().ok_or("this node has no SSD tier")?;
        let seg = self.segments.get(b.segment as usize).ok_or_else(|| format!("no segment {}", b.segment))?;
        let len = usize::try_from(b.len).map_err(|_| "length overflows usize")?;
        let bytes = seg.slice(b.offset, len).map_err(|e| e.to_string())?;
        let sum = BlockChecksum(b.checksum);
        if !sum.verify(bytes) {
            return Err(format!("block {:016x} fails its checksum in DRAM", b.key));
        }
        ssd.write(BlockKey(b.key), bytes, sum).map_err(|e| e.to_string())
    }

    /// SSD → DRAM for one block (the SSD tier verifies the checksum).
    fn promote(&self, b: &pb::BlockRange) -> Result<(), String> {
        let ssd = self.ssd.as_ref().ok_or("this node has no SSD tier")?;
        let seg = self.segments.get(b.segment as usize).ok_or_else(|| format!("no segment {}", b.segment))?;
        let len = usize::try_from(b.len).map_err(|_| "length overflows usize")?;
        let dst = seg.slice_mut(b.offset, len).map_err(|e| e.to_string())?;
        ssd.read_into(BlockKey(b.key), dst).map_err(|e| e.to_string())
    }
}

#[tonic::async_trait]
impl StorageNode for NodeRpc {
    async fn demote(&self, request: Request<pb::DemoteRequest>) -> Result<Response<pb::DemoteReply>, Status> {
        let blocks = request.into_inner().blocks;
        wire::check_batch("blocks", blocks.len(), 4096)?;
        let data = self.data.clone();
        let ok = tokio::task::spawn_blocking(move || {
            blocks
                .iter()
                .map(|b| {
                    data.demote(b)
                        .map_err(|e| tracing::warn!(key = format_args!("{:016x}", b.key), "demote failed: {e}"))
                        .is_ok()
                })
                .collect()
        })
        .await
        .map_err(blocking_err)?;
        Ok(Response::new(pb::DemoteReply { ok }))
    }

    async fn promote(&self, request: Request<pb::PromoteRequest>) -> Result<Response<pb::PromoteReply>, Status> {
        let blocks = request.into_inner().blocks;
        wire::check_batch("blocks", blocks.len(), 4096)?;
        let data = self.data.clone();
        let ok = tokio::task::spawn_blocking(move || {
            blocks
                .iter()
                .map(|b| {
                    data.promote(b)
                        .map_err(|e| tracing::warn!(key = format_args!("{:016x}", b.key), "promote failed: {e}"))
                        .is_ok()
                })
                .collect()
        })
        .await
        .map_err(blocking_err)?;
        Ok(Response::new(pb::PromoteReply { ok }))
    }

    async fn drop_ssd(&self, request: Request<pb::DropSsdRequest>) -> Result<Response<pb::DropSsdReply>, Status> {
        let keys = request.into_inner().keys;
        wire::check_batch("keys", keys.len(), 1 << 16)?;
        let data = self.data.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            let Some(ssd) = &data.ssd else { return 0 };
            keys.iter().filter(|k| ssd.remove(BlockKey(**k)).unwrap_or(false)).count() as u32
        })
        .await
        .map_err(blocking_err)?;
        Ok(Response::new(pb::DropSsdReply { dropped }))
    }

    async fn replicate(&self, request: Request<pb::ReplicateRequest>) -> Result<Response<pb::ReplicateReply>, Status> {
        let req = request.into_inner();
        let dest = req.dest.ok_or_else(|| Status::invalid_argument("dest missing"))?;
        let key = BlockKey(dest.key);
        let source = wire::replica_from_pb(key, req.source.ok_or_else(|| Status::invalid_argument("source missing"))?)?;
        let (source_peer, _) =
            wire::peer_from_pb(req.source_node.ok_or_else(|| Status::invalid_argument("source_node missing"))?)?;
        let seg =
            self.data.segments.get(dest.segment as usize).ok_or_else(|| Status::invalid_argument("no such segment"))?;
        let len = usize::try_from(dest.len).map_err(|_| Status::invalid_argument("length overflows"))?;
        if source.len != dest.len {
            return Err(Status::invalid_argument("source and destination lengths differ"));
        }
        let dst = seg.slice_mut(dest.offset, len).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let transport =
            connect(&source_peer, &self.host_id, &self.transport).map_err(|e| Status::unavailable(e.to_string()))?;
        let mut ops = [ReadOp::new(source.location, dst)];
        let result = transport.read(&mut ops).await.into_iter().next().unwrap_or(Err(TransferError::NotFound));
        let ok = match result {
            Ok(()) => BlockChecksum(dest.checksum).verify(ops[0].dst),
            Err(e) => {
                tracing::warn!(key = format_args!("{:016x}", key.0), "replication pull failed: {e}");
                false
            }
        };
        Ok(Response::new(pb::ReplicateReply { ok }))
    }

    async fn node_stats(&self, _: Request<pb::NodeStatsRequest>) -> Result<Response<pb::NodeStatsReply>, Status> {
        let mut tiers = vec![pb::TierUsage {
            tier: pb::Tier::Dram as i32,
            capacity: self.data.segments.iter().map(|s| s.len()).sum(),
            used: 0,
            blocks: 0,
        }];
        if let Some(ssd) = &self.data.ssd {
            tiers.push(pb::TierUsage {
                tier: pb::Tier::Ssd as i32,
                capacity: ssd.capacity_bytes(),
                used: ssd.used_bytes(),
                blocks: ssd.len() as u64,
            });
        }
        let mut counters: std::collections::HashMap<String, u64> =
            self.data.ssd.iter().flat_map(|s| s.counters().snapshot()).map(|(k, v)| (k.to_owned(), v)).collect();
        counters.insert("writes_denied".into(), self.data.writes_denied.load(std::sync::atomic::Ordering::Relaxed));
        Ok(Response::new(pb::NodeStatsReply { tiers, counters }))
    }
}
