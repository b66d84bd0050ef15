//! The store client, embedded in prefill, decode and the conductor: batched
//! `put`, zero-copy `get_into`, `exists`, `longest_prefix`.
//!
//! Control calls go to the master over gRPC; bytes move through one
//! [`Transport`] per storage node, chosen by locality ([`connect`]). Every
//! block read is checked against the checksum its writer published: a
//! mismatch is a miss (the replica is reported to the master and another
//! one tried), never bad bytes handed to the caller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_proto::cluster_token::{authed, AuthChannel, ClusterToken};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_client::MasterClient;
use tandem_proto::BlockKey;

use crate::checksum::BlockChecksum;
use crate::error::StoreError;
use crate::grant::WriteGrant;
use crate::transport::{
    connect, local_host_id, Faults, FaultyTransport, ReadOp, TransferError, Transport, TransportConfig, WriteOp,
};
use crate::types::{Location, PeerInfo, Replica};
use crate::wire;

mod locations;

use locations::{Known, LocationCache, PendingTouches};

/// Client settings (`[kvstore.client]`-style tables in the cluster file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// The master's gRPC address (host:port).
    pub master: String,
    /// Copies per block (0 = the master's default).
    pub replicas: u32,
    /// Read lease asked for (0 = the master's default).
    pub lease_ms: u64,
    /// Deadline of each control call.
    pub rpc_timeout_ms: u64,
    /// Preferred node for the first copy of a put (e.g. a colocated node).
    pub prefer_node: Option<String>,
    /// Blocks whose locations the client remembers (0 = off), so that
    /// reading them again skips the master: the bytes are checked against
    /// the block's checksum, and a stale location is a fallback to the
    /// leased read, never wrong bytes ([`locations`]).
    pub location_cache_blocks: usize,
    pub transport: TransportConfig,
    /// Sent on every call to the master and on every data connection
    /// (filled in at start from `[auth]`, never read from the file).
    #[serde(skip)]
    pub cluster_token: Option<ClusterToken>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            master: "127.0.0.1:7100".into(),
            replicas: 0,
            lease_ms: 0,
            rpc_timeout_ms: 10_000,
            prefer_node: None,
            location_cache_blocks: 65_536,
            transport: TransportConfig::default(),
            cluster_token: None,
        }
    }
}

/// What happened to each block of a `put`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written and published.
    Stored,
    /// Already in the store (nothing written).
    Existed,
    /// Another writer is storing it right now.
    InProgress,
    /// Not stored: no room, too large, or a transfer failed.
    Failed(String),
}

/// A reservation made by [`StoreClient::put_begin`], to be written and
/// then committed or aborted.
#[derive(Debug)]
pub struct StagedPut {
    put_id: u64,
    slots: Vec<StagedSlot>,
}

#[derive(Debug)]
struct StagedSlot {
    key: BlockKey,
    len: u64,
    /// `Stored` while the block is reserved and every write so far landed.
    outcome: PutOutcome,
    replicas: Vec<Replica>,
    /// The write grant of each replica (same order), sent with its writes.
    grants: Vec<Option<WriteGrant>>,
}

impl StagedPut {
    /// Whether item `i` is reserved for this put and none of its writes
    /// failed so far (false: it existed, is being written by someone else,
    /// or failed).
    pub fn is_writable(&self, i: usize) -> bool {
        self.slots.get(i).is_some_and(|s| s.outcome == PutOutcome::Stored)
    }

    /// The outcome so far of item `i`.
    pub fn outcome(&self, i: usize) -> Option<&PutOutcome> {
        self.slots.get(i).map(|s| &s.outcome)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// One piece of a staged block: `bytes` at `offset` within item `item`.
#[derive(Debug, Clone, Copy)]
pub struct BlockWrite<'a> {
    pub item: usize,
    pub offset: u64,
    pub bytes: &'a [u8],
}

/// Counters a client keeps (exported as metrics by its process).
#[derive(Debug, Default)]
pub struct ClientMetrics {
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub gets: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub get_bytes: AtomicU64,
    /// Replicas whose bytes failed their checksum.
    pub checksum_mismatches: AtomicU64,
    /// Replica reads that failed in transfer (retried elsewhere or missed).
    pub read_failures: AtomicU64,
    /// Blocks read from a location the client already knew (no master call).
    pub location_hits: AtomicU64,
    /// Known locations that no longer held the block (read again through
    /// the master).
    pub stale_locations: AtomicU64,
}

impl ClientMetrics {
    /// The read counters a node reports in its status (and the conductor
    /// exports as `tandem_store_client_reads`).
    pub fn read_counters(&self) -> tandem_proto::worker::StoreClientCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        tandem_proto::worker::StoreClientCounters {
            hits: get(&self.hits),
            misses: get(&self.misses),
            checksum_mismatches: get(&self.checksum_mismatches),
            read_failures: get(&self.read_failures),
            location_hits: get(&self.location_hits),
            stale_locations: get(&self.stale_locations),
        }
    }
}

/// Where a read's replicas came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Locations the client remembered: no lease, validated by checksum.
    Known,
    /// A `GetReplicas` answer, under its lease.
    Leased,
}

/// A connection to the store.
#[derive(Debug)]
pub struct StoreClient {
    cfg: ClientConfig,
    master: MasterClient<AuthChannel>,
    host_id: String,
    peers: Mutex<HashMap<String, Peer>>,
    locations: LocationCache,
    touches: PendingTouches,
    metrics: ClientMetrics,
    /// When set, every transport is wrapped in a [`FaultyTransport`] (tests).
    faults: Option<Faults>,
}

#[derive(Debug, Clone)]
struct Peer {
    info: PeerInfo,
    transport: Arc<dyn Transport>,
}

/// The master's gRPC client for `addr` (host:port), connected lazily,
/// sending `token` on every call.
pub fn master_client(
    addr: &str,
    timeout: Duration,
    token: Option<&ClusterToken>,
) -> Result<MasterClient<AuthChannel>, StoreError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| StoreError::Config(format!("master address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout);
    Ok(MasterClient::new(authed(endpoint.connect_lazy(), token)))
}

impl StoreClient {
    /// A client of the master at `cfg.master`. Connects lazily: a master
    /// that is down shows up as `MasterUnavailable` on the first call.
    pub fn new(mut cfg: ClientConfig) -> Result<StoreClient, StoreError> {
        let timeout = Duration::from_millis(cfg.rpc_timeout_ms);
        let master = master_client(&cfg.master, timeout, cfg.cluster_token.as_ref())?;
        if cfg.cluster_token.is_some() {
            // The data plane's handshake carries the same token.
            cfg.transport.tcp.cluster_token = cfg.cluster_token.clone();
        }
        let locations = LocationCache::new(cfg.location_cache_blocks);
        Ok(StoreClient {
            cfg,
            master,
            host_id: local_host_id(),
            peers: Mutex::new(HashMap::new()),
            locations,
            touches: PendingTouches::new(),
            metrics: Default::default(),
            faults: None,
        })
    }

    /// Routes every transfer through a [`FaultyTransport`] driven by
    /// `faults` (drop, delay, corrupt, partition), for fault tests.
    pub fn with_faults(mut self, faults: Faults) -> StoreClient {
        self.faults = Some(faults);
        self
    }

    pub fn metrics(&self) -> &ClientMetrics {
        &self.metrics
    }

    /// How many block locations the client remembers.
    pub fn known_locations(&self) -> usize {
        self.locations.len()
    }

    /// The master's gRPC client, for admin calls (stats, listings).
    pub fn master(&self) -> MasterClient<AuthChannel> {
        self.master.clone()
    }

    /// Transport to `node`, refreshing the node directory when the node or
    /// its incarnation is unknown.
    async fn peer(&self, node: &str, incarnation: u64) -> Result<Peer, TransferError> {
        if let Some(p) = self.cached_peer(node, incarnation) {
            return Ok(p);
        }
        let nodes = self
            .master
            .clone()
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|e| TransferError::Unreachable(format!("node directory: {e}")))?
            .into_inner()
            .nodes;
        for ep in nodes {
            let Ok((info, _)) = wire::peer_from_pb(ep) else { continue };
            if info.name == node && info.incarnation == incarnation {
                let mut transport = connect(&info, &self.host_id, &self.cfg.transport)?;
                if let Some(faults) = &self.faults {
                    transport = Arc::new(FaultyTransport::new(transport, faults.clone()));
                }
                let peer = Peer { info, transport };
                if let Ok(mut peers) = self.peers.lock() {
                    peers.insert(node.to_owned(), peer.clone());
                }
                return Ok(peer);
            }
        }
        Err(TransferError::Unreachable(format!("storage node {node} (incarnation {incarnation}) is not live")))
    }

    fn cached_peer(&self, node: &str, incarnation: u64) -> Option<Peer> {
        let peers = self.peers.lock().ok()?;
        peers.get(node).filter(|p| p.info.incarnation == incarnation).cloned()
    }

    /// Stores each `(key, bytes)`; blocks already present are not rewritten.
    /// One outcome per item, in order. Errors only when the master is
    /// unreachable or rejects the whole batch.
    pub async fn put(&self, items: &[(BlockKey, &[u8])]) -> Result<Vec<PutOutcome>, StoreError> {
        let sizes: Vec<(BlockKey, u64)> = items.iter().map(|(k, b)| (*k, b.len() as u64)).collect();
        let mut put = self.put_begin(&sizes).await?;
        let writes: Vec<BlockWrite<'_>> =
            items.iter().enumerate().map(|(item, (_, bytes))| BlockWrite { item, offset: 0, bytes }).collect();
        self.put_write(&mut put, &writes).await;
        let sums: Vec<BlockChecksum> = items.iter().map(|(_, b)| BlockChecksum::of(b)).collect();
        self.put_commit(put, &sums).await
    }

    /// Phase one of a staged put: reserves room for each `(key, len)`.
    /// The caller then writes each reserved block, in as many pieces as it
    /// likes ([`StoreClient::put_write`]: prefill writes one layer at a time
    /// while the next computes), and publishes with
    /// [`StoreClient::put_commit`]. A reservation that is never committed
    /// is reclaimed by the master after its put timeout.
    pub async fn put_begin(&self, items: &[(BlockKey, u64)]) -> Result<StagedPut, StoreError> {
        let req = pb::PutStartRequest {
            items: items.iter().map(|(k, len)| pb::PutItem { key: k.0, len: *len }).collect(),
            replicas: self.cfg.replicas,
            prefer_node: self.cfg.prefer_node.clone().unwrap_or_default(),
        };
        let reply = self.master.clone().put_start(req).await?.into_inner();
        if reply.slots.len() != items.len() {
            return Err(StoreError::MasterUnavailable("put_start answered the wrong number of slots".into()));
        }
        let mut slots = Vec::with_capacity(items.len());
        for (i, slot) in reply.slots.iter().enumerate() {
            let (key, len) = items[i];
            let status = pb::PutStatus::try_from(slot.status).unwrap_or(pb::PutStatus::Unspecified);
            let mut replicas = Vec::new();
            let mut grants = Vec::new();
            let outcome = match status {
                pb::PutStatus::Reserved => {
                    for p in &slot.placements {
                        let grant = (!p.write_grant.is_empty()).then(|| WriteGrant::decode(&p.write_grant)).transpose();
                        match (wire::replica_from_pb(key, p.clone()), grant) {
                            (Ok(r), Ok(grant)) if r.len == len && matches!(r.location, Location::Dram { .. }) => {
                                replicas.push(r);
                                grants.push(grant);
                            }
                            _ => {
                                // Give the reservation back before failing the batch.
                                let _ =
                                    self.master.clone().put_revoke(pb::PutRevokeRequest { put_id: reply.put_id }).await;
                                return Err(StoreError::MasterUnavailable(
                                    "put_start gave a malformed placement".into(),
                                ));
                            }
                        }
                    }
                    PutOutcome::Stored
                }
                pb::PutStatus::Exists => PutOutcome::Existed,
                pb::PutStatus::InProgress => PutOutcome::InProgress,
                pb::PutStatus::NoSpace => PutOutcome::Failed("no space in the store".into()),
                pb::PutStatus::TooLarge => PutOutcome::Failed("block larger than the store accepts".into()),
                pb::PutStatus::Unspecified => PutOutcome::Failed("unknown put status".into()),
            };
            slots.push(StagedSlot { key, len, outcome, replicas, grants });
        }
        Ok(StagedPut { put_id: reply.put_id, slots })
    }

    /// Writes pieces of reserved blocks to every replica. A piece of a block
    /// that was not reserved (it existed, or is being written by another
    /// client) is skipped; a failed piece fails its block, which
    /// [`StoreClient::put_commit`] then leaves unpublished. Never errors as
    /// a whole: failures are recorded per block.
    pub async fn put_write(&self, put: &mut StagedPut, writes: &[BlockWrite<'_>]) {
        let mut per_node: HashMap<(String, u64), Vec<(usize, WriteOp<'_>)>> = HashMap::new();
        for w in writes {
            let Some(slot) = put.slots.get_mut(w.item) else { continue };
            if slot.outcome != PutOutcome::Stored {
                continue;
            }
            let end = w.offset.checked_add(w.bytes.len() as u64);
            if end.is_none_or(|e| e > slot.len) {
                slot.outcome = PutOutcome::Failed(format!(
                    "a write of {} bytes at {} overruns a block of {}",
                    w.bytes.len(),
                    w.offset,
                    slot.len
                ));
                continue;
            }
            for (r, grant) in slot.replicas.iter().zip(&slot.grants) {
                let Location::Dram { segment, offset } = r.location else { continue };
                let dst = Location::Dram { segment, offset: offset + w.offset };
                per_node
                    .entry((r.node.clone(), r.incarnation))
                    .or_default()
                    .push((w.item, WriteOp { dst, src: w.bytes, grant: *grant }));
            }
        }
        let sends = per_node.into_iter().map(|((node, incarnation), group)| async move {
            let (items, ops): (Vec<usize>, Vec<WriteOp<'_>>) = group.into_iter().unzip();
            let results = match self.peer(&node, incarnation).await {
                Ok(peer) => peer.transport.write(&ops).await,
                Err(e) => vec![Err(e); ops.len()],
            };
            items.into_iter().zip(results).collect::<Vec<_>>()
        });
        for (item, result) in futures::future::join_all(sends).await.into_iter().flatten() {
            if let Err(e) = result {
                put.slots[item].outcome = PutOutcome::Failed(format!("write failed: {e}"));
            }
        }
    }

    /// Phase two: publishes every reserved block that was written without
    /// error, with the checksum of its whole bytes (`checksums[i]` for item
    /// `i`), and gives back the rest of the reservation. One outcome per
    /// item, in order.
    pub async fn put_commit(&self, put: StagedPut, checksums: &[BlockChecksum]) -> Result<Vec<PutOutcome>, StoreError> {
        let mut outcomes: Vec<PutOutcome> = put.slots.iter().map(|s| s.outcome.clone()).collect();
        if checksums.len() != outcomes.len() {
            let _ = self.master.clone().put_revoke(pb::PutRevokeRequest { put_id: put.put_id }).await;
            return Err(StoreError::Invalid(format!("{} checksums for {} blocks", checksums.len(), outcomes.len())));
        }
        let done: Vec<pb::PutDone> = put
            .slots
            .iter()
            .zip(checksums)
            .filter(|(s, _)| s.outcome == PutOutcome::Stored)
            .map(|(s, sum)| pb::PutDone { key: s.key.0, checksum: sum.0 })
            .collect();
        let reserved = put.slots.iter().filter(|s| !s.replicas.is_empty()).count();
        let published = done.len();
        if !done.is_empty() {
            let written: u64 = put.slots.iter().filter(|s| s.outcome == PutOutcome::Stored).map(|s| s.len).sum();
            let count = done.len() as u64;
            if let Err(e) = self.master.clone().put_end(pb::PutEndRequest { put_id: put.put_id, items: done }).await {
                // Unpublished: the master reclaims the reservation.
                let _ = self.master.clone().put_revoke(pb::PutRevokeRequest { put_id: put.put_id }).await;
                for o in outcomes.iter_mut().filter(|o| **o == PutOutcome::Stored) {
                    *o = PutOutcome::Failed(format!("put_end: {e}"));
                }
                return Ok(outcomes);
            }
            self.metrics.puts.fetch_add(count, Ordering::Relaxed);
            self.metrics.put_bytes.fetch_add(written, Ordering::Relaxed);
            for (slot, sum) in put.slots.iter().zip(checksums) {
                if slot.outcome == PutOutcome::Stored {
                    if let Some(known) = Known::dram(slot.len, sum.0, &slot.replicas) {
                        self.locations.insert(slot.key, known);
                    }
                }
            }
        }
        if published < reserved {
            // Give back what was reserved but not written (else it times out).
            self.master.clone().put_revoke(pb::PutRevokeRequest { put_id: put.put_id }).await?;
        }
        Ok(outcomes)
    }

    /// Abandons a staged put: nothing of it is published.
    pub async fn put_abort(&self, put: StagedPut) -> Result<(), StoreError> {
        if put.slots.iter().any(|s| !s.replicas.is_empty()) {
            self.master.clone().put_revoke(pb::PutRevokeRequest { put_id: put.put_id }).await?;
        }
        Ok(())
    }

    /// Reads each key into the start of its buffer (zero-copy where the
    /// transport allows). `Some(len)` = hit, the first `len` bytes are the
    /// block, checksum-verified; `None` = miss (absent, unreadable, corrupt,
    /// or larger than its buffer).
    ///
    /// Blocks whose location the client already knows are read straight
    /// from it (no master call); the rest, and any known location that went
    /// stale, are read under a lease from the replicas the master names.
    pub async fn get_into(&self, keys: &[BlockKey], bufs: &mut [&mut [u8]]) -> Result<Vec<Option<usize>>, StoreError> {
        if keys.len() != bufs.len() {
            return Err(StoreError::Invalid(format!("{} keys but {} buffers", keys.len(), bufs.len())));
        }
        let mut found: Vec<Option<usize>> = vec![None; keys.len()];
        let known: Vec<Option<Known>> = keys.iter().map(|k| self.locations.get(k)).collect();
        if known.iter().any(Option::is_some) {
            let mut wanted: Vec<Option<(usize, u64, Vec<Replica>)>> = known
                .into_iter()
                .enumerate()
                .map(|(i, k)| {
                    k.filter(|k| k.len as usize <= bufs[i].len()).map(|k| (k.len as usize, k.checksum, k.replicas))
                })
                .collect();
            self.read_replicas(keys, bufs, &mut wanted, &mut found, Source::Known).await;
            let served = keys.iter().zip(&found).filter(|(_, f)| f.is_some()).map(|(k, _)| *k);
            if let Some(batch) = self.touches.add(served) {
                let mut master = self.master.clone();
                tokio::spawn(async move {
                    for keys in batch.chunks(PendingTouches::BATCH) {
                        if let Err(e) = master.touch(pb::TouchRequest { keys: keys.to_vec() }).await {
                            tracing::debug!("touch failed (eviction sees fewer reads): {e}");
                        }
                    }
                });
            }
        }
        let rest: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if !rest.is_empty() {
            self.get_leased(keys, bufs, &rest, &mut found).await?;
        }
        self.metrics.gets.fetch_add(keys.len() as u64, Ordering::Relaxed);
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        self.metrics.hits.fetch_add(hits, Ordering::Relaxed);
        self.metrics.misses.fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        Ok(found)
    }

    /// Reads `keys[i]` for each `i` of `which` under a lease from the
    /// replicas the master names, and remembers where they were.
    async fn get_leased(
        &self,
        keys: &[BlockKey],
        bufs: &mut [&mut [u8]],
        which: &[usize],
        found: &mut [Option<usize>],
    ) -> Result<(), StoreError> {
        let reply = self
            .master
            .clone()
            .get_replicas(pb::GetReplicasRequest {
                keys: which.iter().map(|&i| keys[i].0).collect(),
                lease_ms: self.cfg.lease_ms,
            })
            .await?
            .into_inner();
        if reply.entries.len() != which.len() {
            return Err(StoreError::MasterUnavailable("get_replicas answered the wrong number of entries".into()));
        }
        // Per key: (len, checksum, replicas still to try).
        let mut wanted: Vec<Option<(usize, u64, Vec<Replica>)>> = vec![None; keys.len()];
        for (&i, e) in which.iter().zip(reply.entries) {
            let replicas: Vec<Replica> = e
                .replicas
                .into_iter()
                .filter_map(|r| wire::replica_from_pb(keys[i], r).ok())
                .filter(|r| r.len == e.len)
                .collect();
            if e.found {
                if let Some(known) = Known::dram(e.len, e.checksum, &replicas) {
                    self.locations.insert(keys[i], known);
                }
            }
            let fits = e.found && (e.len as usize) <= bufs[i].len();
            wanted[i] = (fits && !replicas.is_empty()).then_some((e.len as usize, e.checksum, replicas));
        }
        self.read_replicas(keys, bufs, &mut wanted, found, Source::Leased).await;
        if reply.lease_id != 0 {
            // Off the caller's path; best effort: an unreleased lease expires on its own.
            let mut master = self.master.clone();
            let release = pb::ReleaseLeaseRequest { lease_id: reply.lease_id };
            tokio::spawn(async move {
                if let Err(e) = master.release_lease(release).await {
                    tracing::debug!("lease release failed (it will expire): {e}");
                }
            });
        }
        Ok(())
    }

    /// Reads every wanted key (`(len, checksum, replicas)`) into its buffer,
    /// trying its replicas in turn, and records hits in `found`. Bytes that
    /// fail their checksum are never a hit. A bad leased replica is reported
    /// to the master; a known location that fails is forgotten (it went
    /// stale, or its node is gone) and left to the leased read.
    async fn read_replicas(
        &self,
        keys: &[BlockKey],
        bufs: &mut [&mut [u8]],
        wanted: &mut [Option<(usize, u64, Vec<Replica>)>],
        found: &mut [Option<usize>],
        source: Source,
    ) {
        // Each round reads every unresolved key from its next replica.
        for _round in 0..4 {
            let mut per_node: HashMap<(String, u64), Vec<(usize, Replica)>> = HashMap::new();
            for (i, w) in wanted.iter_mut().enumerate() {
                if found[i].is_some() {
                    continue;
                }
                if let Some((_, _, replicas)) = w {
                    if !replicas.is_empty() {
                        let r = self.pick_replica(replicas);
                        per_node.entry((r.node.clone(), r.incarnation)).or_default().push((i, r));
                    }
                }
            }
            if per_node.is_empty() {
                break;
            }
            // Hand each group its own buffers (disjoint &mut borrows).
            let mut slots: Vec<Option<&mut [u8]>> = bufs.iter_mut().map(|b| Some(&mut **b)).collect();
            let mut groups = Vec::with_capacity(per_node.len());
            for ((node, incarnation), group) in per_node {
                let mut dsts = Vec::with_capacity(group.len());
                for (i, r) in group {
                    let len = wanted[i].as_ref().map_or(0, |w| w.0);
                    if let Some(buf) = slots[i].take() {
                        dsts.push((i, r, &mut buf[..len]));
                    }
                }
                groups.push((node, incarnation, dsts));
            }
            let reads = groups.into_iter().map(|(node, incarnation, dsts)| async move {
                let peer = match source {
                    Source::Leased => self.peer(&node, incarnation).await,
                    // A node the client is not connected to (or an old life
                    // of one) is not worth a directory lookup here.
                    Source::Known => self
                        .cached_peer(&node, incarnation)
                        .ok_or_else(|| TransferError::Unreachable(format!("storage node {node} not connected"))),
                };
                let mut ops: Vec<ReadOp<'_>> = Vec::with_capacity(dsts.len());
                let mut meta = Vec::with_capacity(dsts.len());
                for (i, r, dst) in dsts {
                    ops.push(ReadOp::new(r.location, dst));
                    meta.push((i, r));
                }
                let results = match &peer {
                    Ok(p) => p.transport.read(&mut ops).await,
                    Err(e) => vec![Err(e.clone()); ops.len()],
                };
                let verdicts: Vec<(usize, Replica, Result<u64, TransferError>)> = meta
                    .into_iter()
                    .zip(ops)
                    .zip(results)
                    .map(|(((i, r), op), res)| {
                        // Transports that hashed the bytes in flight save a pass.
                        (i, r, res.map(|()| op.checksum.unwrap_or_else(|| BlockChecksum::of(op.dst).0)))
                    })
                    .collect();
                verdicts
            });
            for (i, replica, verdict) in futures::future::join_all(reads).await.into_iter().flatten() {
                let Some((len, checksum, _)) = &wanted[i] else { continue };
                match (verdict, source) {
                    (Ok(sum), _) if sum == *checksum => {
                        found[i] = Some(*len);
                        self.metrics.get_bytes.fetch_add(*len as u64, Ordering::Relaxed);
                        if source == Source::Known {
                            self.metrics.location_hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    (_, Source::Known) => {
                        self.metrics.stale_locations.fetch_add(1, Ordering::Relaxed);
                        self.locations.forget(&keys[i]);
                        wanted[i] = None;
                    }
                    (Ok(_), Source::Leased) => {
                        self.metrics.checksum_mismatches.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key = format_args!("{:016x}", keys[i].0), node = %replica.node, "checksum mismatch; trying another replica");
                        self.locations.forget(&keys[i]);
                        self.report_bad(keys[i], &replica, "checksum mismatch").await;
                    }
                    (Err(e), Source::Leased) => {
                        self.metrics.read_failures.fetch_add(1, Ordering::Relaxed);
                        if matches!(e, TransferError::NotFound) {
                            self.report_bad(keys[i], &replica, "not found on node").await;
                        }
                        tracing::debug!(key = format_args!("{:016x}", keys[i].0), node = %replica.node, "replica read failed: {e}");
                    }
                }
            }
        }
    }

    /// Takes the best remaining replica: DRAM before SSD, same host first.
    fn pick_replica(&self, replicas: &mut Vec<Replica>) -> Replica {
        let local = |r: &Replica| {
            self.peers.lock().ok().and_then(|p| p.get(&r.node).map(|p| p.info.host_id == self.host_id)).unwrap_or(false)
        };
        let best = (0..replicas.len()).min_by_key(|&i| (replicas[i].tier(), !local(&replicas[i]))).unwrap_or(0);
        replicas.swap_remove(best)
    }

    async fn report_bad(&self, key: BlockKey, replica: &Replica, reason: &str) {
        let req = pb::ReportBadReplicaRequest {
            key: key.0,
            replica: Some(wire::replica_to_pb(replica)),
            reason: reason.into(),
        };
        if let Err(e) = self.master.clone().report_bad_replica(req).await {
            tracing::warn!("could not report a bad replica: {e}");
        }
    }

    /// Convenience: reads blocks into fresh buffers (`None` = miss).
    pub async fn get(&self, keys: &[BlockKey], max_len: usize) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut bufs: Vec<Vec<u8>> = keys.iter().map(|_| vec![0u8; max_len]).collect();
        let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        let found = self.get_into(keys, &mut views).await?;
        Ok(bufs
            .into_iter()
            .zip(found)
            .map(|(mut b, f)| {
                f.map(|len| {
                    b.truncate(len);
                    b
                })
            })
            .collect())
    }

    /// Whether each key is stored.
    pub async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        Ok(self.lookup(keys).await?.0)
    }

    /// How many leading keys are stored: for prefix-chained block keys, the
    /// number of cached prefix blocks.
    pub async fn longest_prefix(&self, keys: &[BlockKey]) -> Result<usize, StoreError> {
        Ok(self.lookup(keys).await?.1)
    }

    async fn lookup(&self, keys: &[BlockKey]) -> Result<(Vec<bool>, usize), StoreError> {
        let reply = self
            .master
            .clone()
            .lookup(pb::LookupRequest { keys: keys.iter().map(|k| k.0).collect() })
            .await?
            .into_inner();
        if reply.exists.len() != keys.len() {
            return Err(StoreError::MasterUnavailable("lookup answered the wrong number of entries".into()));
        }
        Ok((reply.exists, reply.longest_prefix as usize))
    }

    /// Removes keys from the store (and from this client's known
    /// locations; another client that knew a removed block's location may
    /// still read its bytes until the range is written over).
    pub async fn remove(&self, keys: &[BlockKey]) -> Result<u32, StoreError> {
        for k in keys {
            self.locations.forget(k);
        }
        let req = pb::RemoveRequest { keys: keys.iter().map(|k| k.0).collect() };
        Ok(self.master.clone().remove(req).await?.into_inner().removed)
    }

    pub async fn pin(&self, keys: &[BlockKey], pinned: bool) -> Result<u32, StoreError> {
        let req = pb::PinRequest { keys: keys.iter().map(|k| k.0).collect(), pinned };
        Ok(self.master.clone().pin(req).await?.into_inner().changed)
    }

    pub async fn stats(&self) -> Result<pb::StatsReply, StoreError> {
        Ok(self.master.clone().stats(pb::StatsRequest {}).await?.into_inner())
    }
}
