//! The master's metadata as a synchronous state machine: every operation
//! takes the current time (`now_ms`) and returns its answer plus, from
//! [`MasterState::tick`], the commands storage nodes must carry out. No I/O
//! happens here except the write-through to the [`MetaStore`], so the whole
//! policy is unit-testable with a fake clock.
//!
//! A block (object) goes `Pending` (space reserved by `put_start`) →
//! `Ready` (published by `put_end`) → gone (removed, evicted, or its last
//! replica's node died). Readers only ever see `Ready` objects and ready
//! replicas; a leased object is never evicted, demoted or freed.

use std::collections::{BTreeMap, HashMap, HashSet};

use tandem_proto::BlockKey;

use super::alloc::RangeAllocator;
use super::persist::MetaStore;
use super::MasterConfig;
use crate::grant::{GrantKey, WriteGrant};
use crate::policy::EvictionPolicy;
use crate::types::{Location, PeerInfo, Replica, Tier};

mod report;
#[cfg(test)]
mod tests;
mod tiering;

/// Outcome of `put_start` for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutSlot {
    /// Write the bytes to every placement, then `put_end`.
    Reserved(Vec<Replica>),
    Exists,
    InProgress,
    NoSpace,
    TooLarge,
}

/// Answer to `get_replicas` for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSet {
    pub key: BlockKey,
    pub len: u64,
    pub checksum: u64,
    /// DRAM copies first, then SSD.
    pub replicas: Vec<Replica>,
}

/// A DRAM byte range on a node, with the block it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRange {
    pub key: BlockKey,
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
    pub checksum: u64,
}

/// Work the master asks a storage node to do (tiering and replication).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Copy these DRAM ranges to the node's SSD tier.
    Demote { node: String, blocks: Vec<BlockRange> },
    /// Copy these keys from the node's SSD tier into the given DRAM ranges.
    Promote { node: String, blocks: Vec<BlockRange> },
    /// Delete these keys from the node's SSD tier.
    DropSsd { node: String, keys: Vec<BlockKey> },
    /// Pull `source` into `dest` on `node`.
    Replicate { node: String, dest: BlockRange, source: Replica, source_peer: Box<PeerInfo> },
}

/// Errors of master operations, mapped to gRPC statuses by the service.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MasterError {
    #[error("unknown put {0} (already ended, revoked or timed out)")]
    UnknownPut(u64),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("metadata store: {0}")]
    Persist(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending { put_id: u64 },
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Motion {
    /// Readable and, policy permitting, evictable.
    Still,
    /// A tiering or replication command for this object is in flight.
    Moving,
}

#[derive(Debug, Clone)]
struct ReplicaState {
    replica: Replica,
    /// False while a promotion/replication is filling it.
    ready: bool,
}

#[derive(Debug, Clone)]
struct Object {
    len: u64,
    checksum: u64,
    status: Status,
    replicas: Vec<ReplicaState>,
    leases: u32,
    pinned: bool,
    motion: Motion,
    /// Reads served from SSD only since the last promotion decision.
    ssd_hits: u32,
    /// Reads since the last replication decision.
    hits: u32,
    /// Removal requested while leased: invisible now, freed when the last lease ends.
    doomed: bool,
}

impl Object {
    fn readable(&self) -> bool {
        self.status == Status::Ready && !self.doomed
    }

    fn evictable(&self) -> bool {
        self.readable() && self.leases == 0 && !self.pinned && self.motion == Motion::Still
    }
}

struct NodeState {
    peer: PeerInfo,
    control_addr: String,
    segments: Vec<(u32, RangeAllocator)>,
    ssd_capacity: u64,
    ssd_used: u64,
    /// DRAM bytes whose demotion is in flight (freed when it completes).
    demoting: u64,
    /// Backs off demotions to a node whose SSD writes fail (a full or
    /// broken disk), instead of retrying them every tick.
    demote_backoff: tiering::Backoff,
    last_heartbeat_ms: u64,
    /// The key this incarnation checks write grants with; `None` for a node
    /// recovered from the metadata store until it registers again.
    grant_key: Option<GrantKey>,
    dram: Box<dyn EvictionPolicy<BlockKey>>,
    ssd: Box<dyn EvictionPolicy<BlockKey>>,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState").field("peer", &self.peer.name).field("incarnation", &self.peer.incarnation).finish()
    }
}

impl NodeState {
    fn dram_capacity(&self) -> u64 {
        self.segments.iter().map(|(_, a)| a.size()).sum()
    }

    fn dram_used(&self) -> u64 {
        self.segments.iter().map(|(_, a)| a.used()).sum()
    }

    fn free_ratio(&self) -> f64 {
        let cap = self.dram_capacity();
        if cap == 0 {
            0.0
        } else {
            (cap - self.dram_used()) as f64 / cap as f64
        }
    }

    /// Allocates `len` bytes in the segment with the most free room.
    fn alloc(&mut self, len: u64) -> Option<(u32, u64)> {
        let (id, alloc) =
            self.segments.iter_mut().filter(|(_, a)| a.largest_free() >= len).max_by_key(|(_, a)| a.free())?;
        alloc.alloc(len).map(|off| (*id, off))
    }

    fn release(&mut self, segment: u32, offset: u64, len: u64) {
        if let Some((_, a)) = self.segments.iter_mut().find(|(id, _)| *id == segment) {
            a.release(offset, len);
        }
    }

    fn largest_segment(&self) -> u64 {
        self.segments.iter().map(|(_, a)| a.size()).max().unwrap_or(0)
    }
}

#[derive(Debug)]
struct Lease {
    keys: Vec<BlockKey>,
    expires_ms: u64,
}

#[derive(Debug)]
struct Put {
    keys: Vec<BlockKey>,
    deadline_ms: u64,
    /// Orders this put's write grants after those of earlier puts.
    grant_seq: u64,
}

/// Usage of one tier of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierUsage {
    pub tier: Tier,
    pub capacity: u64,
    pub used: u64,
    pub blocks: u64,
}

/// One node as `stats` reports it.
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub peer: PeerInfo,
    pub control_addr: String,
    pub tiers: Vec<TierUsage>,
    pub last_heartbeat_ms_ago: u64,
}

/// Snapshot for `stats` / `tandem kvstore usage`.
#[derive(Debug, Clone)]
pub struct Stats {
    pub nodes: Vec<NodeReport>,
    pub objects: u64,
    pub pending_puts: u64,
    pub active_leases: u64,
    pub pinned: u64,
    pub counters: BTreeMap<String, u64>,
    pub policy: String,
}

/// One key as `list_keys` reports it.
#[derive(Debug, Clone)]
pub struct KeyReport {
    pub key: BlockKey,
    pub len: u64,
    pub checksum: u64,
    pub replicas: Vec<Replica>,
    pub pinned: bool,
    pub leases: u32,
}

/// The master's whole state.
#[derive(Debug)]
pub struct MasterState {
    cfg: MasterConfig,
    nodes: BTreeMap<String, NodeState>,
    objects: HashMap<BlockKey, Object>,
    puts: HashMap<u64, Put>,
    leases: HashMap<u64, Lease>,
    /// The last put's grant sequence number.
    grant_seq: u64,
    counters: BTreeMap<&'static str, u64>,
    store: Option<MetaStore>,
    dirty_objects: HashSet<BlockKey>,
    dirty_nodes: HashSet<String>,
    /// SSD files to delete, per node, sent with the next tick's commands.
    pending_drops: BTreeMap<String, Vec<BlockKey>>,
    /// Keys read from SSD often enough to be considered for promotion.
    promote_candidates: HashSet<BlockKey>,
    /// Keys read often enough to be considered for another replica.
    hot_candidates: HashSet<BlockKey>,
}

impl MasterState {
    /// A master with no metadata store (nothing survives a restart).
    pub fn new(cfg: MasterConfig) -> MasterState {
        MasterState {
            cfg,
            nodes: BTreeMap::new(),
            objects: HashMap::new(),
            puts: HashMap::new(),
            leases: HashMap::new(),
            grant_seq: 0,
            counters: BTreeMap::new(),
            store: None,
            dirty_objects: HashSet::new(),
            dirty_nodes: HashSet::new(),
            pending_drops: BTreeMap::new(),
            promote_candidates: HashSet::new(),
            hot_candidates: HashSet::new(),
        }
    }

    /// A master persisting to `store`, rebuilt from what it holds. Nodes
    /// found there get one node timeout from `now_ms` to heartbeat again.
    pub fn recover(cfg: MasterConfig, store: MetaStore, now_ms: u64) -> Result<MasterState, MasterError> {
        let (nodes, objects) = store.load().map_err(MasterError::Persist)?;
        let mut state = MasterState::new(cfg);
        for n in nodes {
            state.add_node(n.peer, n.control_addr, n.ssd_capacity, now_ms);
        }
        let mut dropped = 0usize;
        for (key, o) in objects {
            let key = BlockKey(key);
            let mut replicas = Vec::new();
            for r in o.replicas {
                let replica = r.into_replica(o.len, key.0);
                if state.claim_replica_space(key, &replica) {
                    replicas.push(ReplicaState { replica, ready: true });
                } else {
                    dropped += 1;
                }
            }
            if replicas.is_empty() {
                state.dirty_objects.insert(key);
                continue;
            }
            state.objects.insert(
                key,
                Object {
                    len: o.len,
                    checksum: o.checksum,
                    status: Status::Ready,
                    replicas,
                    leases: 0,
                    pinned: o.pinned,
                    motion: Motion::Still,
                    ssd_hits: 0,
                    hits: 0,
                    doomed: false,
                },
            );
        }
        if dropped > 0 {
            tracing::warn!(dropped, "replicas in the metadata store conflicted with their node's layout; dropped");
        }
        state.store = Some(store);
        state.flush()?;
        tracing::info!(nodes = state.nodes.len(), objects = state.objects.len(), "master metadata recovered");
        Ok(state)
    }

    /// Marks a recovered replica's space used and enters it in its node's policy.
    fn claim_replica_space(&mut self, key: BlockKey, r: &Replica) -> bool {
        let Some(node) = self.nodes.get_mut(&r.node) else { return false };
        if node.peer.incarnation != r.incarnation {
            return false;
        }
        match r.location {
            Location::Dram { segment, offset } => {
                let Some((_, a)) = node.segments.iter_mut().find(|(id, _)| *id == segment) else { return false };
                if !a.reserve_at(offset, r.len) {
                    return false;
                }
                node.dram.insert(key);
            }
            Location::Ssd { .. } => {
                node.ssd_used += r.len;
                node.ssd.insert(key);
            }
        }
        true
    }

    pub fn config(&self) -> &MasterConfig {
        &self.cfg
    }

    fn bump(&mut self, counter: &'static str, by: u64) {
        *self.counters.entry(counter).or_insert(0) += by;
    }

    /// A fresh put or lease id. Random, not sequential: an id is what
    /// proves a client made the put (or holds the lease) it ends, so it
    /// must not be guessable from the ids a client was given itself.
    fn new_id(&mut self) -> u64 {
        loop {
            let id = rand::random::<u64>();
            if id != 0 && !self.puts.contains_key(&id) && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    fn add_node(&mut self, peer: PeerInfo, control_addr: String, ssd_capacity: u64, now_ms: u64) {
        let segments = peer.segments.iter().map(|s| (s.id, RangeAllocator::new(s.bytes))).collect();
        let name = peer.name.clone();
        let node = NodeState {
            peer,
            control_addr,
            segments,
            ssd_capacity,
            ssd_used: 0,
            demoting: 0,
            demote_backoff: tiering::Backoff::default(),
            last_heartbeat_ms: now_ms,
            grant_key: None,
            dram: self.cfg.policy.build(),
            ssd: self.cfg.policy.build(),
        };
        self.dirty_nodes.insert(name.clone());
        self.nodes.insert(name, node);
    }

    // ----- membership ------------------------------------------------------

    /// A storage node (re)joins. A new incarnation of a known node replaces
    /// the old one (whose DRAM replicas are gone); `ssd_blocks` (key, len,
    /// checksum) is what its SSD tier holds and becomes SSD replicas.
    /// Returns SSD keys the node should delete (conflicting or over capacity).
    pub fn register_node(
        &mut self,
        peer: PeerInfo,
        control_addr: String,
        ssd_capacity: u64,
        ssd_blocks: &[(BlockKey, u64, u64)],
        now_ms: u64,
    ) -> Result<Vec<BlockKey>, MasterError> {
        if peer.name.is_empty() {
            return Err(MasterError::Invalid("node name is empty".into()));
        }
        let same = self.nodes.get(&peer.name).is_some_and(|n| n.peer.incarnation == peer.incarnation);
        if same {
            if let Some(n) = self.nodes.get_mut(&peer.name) {
                n.last_heartbeat_ms = now_ms;
            }
        } else {
            if self.nodes.contains_key(&peer.name) {
                self.drop_node(&peer.name.clone(), "re-registered with a new incarnation");
            }
            self.add_node(peer.clone(), control_addr, ssd_capacity, now_ms);
        }
        let mut reject = Vec::new();
        let name = peer.name.clone();
        let reported: HashSet<BlockKey> = ssd_blocks.iter().map(|b| b.0).collect();
        // SSD replicas the master believes in but the node no longer has.
        let stale: Vec<BlockKey> = self
            .objects
            .iter()
            .filter(|(k, o)| {
                !reported.contains(k)
                    && o.replicas.iter().any(|r| r.replica.node == name && r.replica.tier() == Tier::Ssd)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            self.drop_replica(key, &name, Tier::Ssd);
        }
        for &(key, len, checksum) in ssd_blocks {
            let incarnation = peer.incarnation;
            match self.objects.get_mut(&key) {
                Some(o) if o.readable() => {
                    if o.len != len || o.checksum != checksum {
                        reject.push(key);
                        continue;
                    }
                    if let Some(r) =
                        o.replicas.iter_mut().find(|r| r.replica.node == name && r.replica.tier() == Tier::Ssd)
                    {
                        r.replica.incarnation = incarnation;
                        continue;
                    }
                }
                Some(_) => {
                    reject.push(key);
                    continue;
                }
                None => {}
            }
            let Some(node) = self.nodes.get_mut(&name) else { break };
            if node.ssd_used + len > node.ssd_capacity {
                reject.push(key);
                continue;
            }
            node.ssd_used += len;
            node.ssd.insert(key);
            let replica = Replica { node: name.clone(), incarnation, location: Location::Ssd { key }, len };
            let o = self.objects.entry(key).or_insert_with(|| Object {
                len,
                checksum,
                status: Status::Ready,
                replicas: Vec::new(),
                leases: 0,
                pinned: false,
                motion: Motion::Still,
                ssd_hits: 0,
                hits: 0,
                doomed: false,
            });
            o.replicas.push(ReplicaState { replica, ready: true });
            self.dirty_objects.insert(key);
        }
        self.bump("nodes_registered", 1);
        self.flush()?;
        Ok(reject)
    }

    /// True when `node` is known with this incarnation (else: register again).
    pub fn heartbeat(&mut self, node: &str, incarnation: u64, now_ms: u64) -> bool {
        match self.nodes.get_mut(node) {
            Some(n) if n.peer.incarnation == incarnation => {
                n.last_heartbeat_ms = now_ms;
                true
            }
            _ => false,
        }
    }

    /// Sets the key `node` (this incarnation) checks write grants with.
    /// False if the node is not known with this incarnation.
    pub fn set_grant_key(&mut self, node: &str, incarnation: u64, key: GrantKey) -> bool {
        match self.nodes.get_mut(node) {
            Some(n) if n.peer.incarnation == incarnation => {
                n.grant_key = Some(key);
                true
            }
            _ => false,
        }
    }

    /// Whether `node` has given its grant key (a node recovered from the
    /// metadata store has not, until it registers again).
    pub fn has_grant_key(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.grant_key.is_some())
    }

    /// The write grant for `placement`, a DRAM placement `put_start` made
    /// for `put_id`; `None` when the put, the node or its key is unknown.
    pub fn write_grant(&self, put_id: u64, placement: &Replica) -> Option<WriteGrant> {
        let put = self.puts.get(&put_id)?;
        let node = self.nodes.get(&placement.node).filter(|n| n.peer.incarnation == placement.incarnation)?;
        let key = node.grant_key.as_ref()?;
        let Location::Dram { segment, offset } = placement.location else { return None };
        Some(WriteGrant::mint(key, put_id, put.grant_seq, (segment, offset, placement.len), put.deadline_ms))
    }

    /// Forgets a node and every replica on it; objects left with no replica
    /// are gone.
    fn drop_node(&mut self, name: &str, why: &str) {
        let Some(node) = self.nodes.remove(name) else { return };
        tracing::warn!(node = name, incarnation = node.peer.incarnation, why, "dropping storage node");
        self.bump("nodes_dropped", 1);
        self.dirty_nodes.insert(name.to_owned());
        let mut lost = Vec::new();
        for (key, o) in self.objects.iter_mut() {
            let before = o.replicas.len();
            o.replicas.retain(|r| r.replica.node != name);
            if o.replicas.len() != before {
                self.dirty_objects.insert(*key);
                if o.replicas.iter().all(|r| !r.ready) && o.status == Status::Ready {
                    lost.push(*key);
                }
            }
        }
        for key in lost {
            self.forget_object(key);
        }
        // Pending puts keep their keys; their placements on this node fail at put_end.
    }

    // ----- puts ------------------------------------------------------------

    /// Reserves space for each item (`(key, len)`), `replicas` copies on
    /// distinct nodes (0 = the configured default).
    pub fn put_start(
        &mut self,
        items: &[(BlockKey, u64)],
        replicas: u32,
        prefer: Option<&str>,
        now_ms: u64,
    ) -> Result<(u64, Vec<PutSlot>), MasterError> {
        if items.len() > self.cfg.max_batch {
            return Err(MasterError::Invalid(format!(
                "{} items exceed the batch limit {}",
                items.len(),
                self.cfg.max_batch
            )));
        }
        if let Some(&(key, _)) = items.iter().find(|(_, len)| *len == 0) {
            return Err(MasterError::Invalid(format!("block {:016x} has length 0", key.0)));
        }
        let want = if replicas == 0 { self.cfg.default_replicas } else { replicas.min(self.cfg.max_replicas) } as usize;
        let put_id = self.new_id();
        let mut slots = Vec::with_capacity(items.len());
        let mut reserved = Vec::new();
        let mut seen = HashSet::new();
        for &(key, len) in items {
            if !seen.insert(key) {
                slots.push(PutSlot::InProgress);
                continue;
            }
            if let Some(o) = self.objects.get(&key) {
                slots.push(if o.readable() { PutSlot::Exists } else { PutSlot::InProgress });
                continue;
            }
            let largest = self.nodes.values().map(NodeState::largest_segment).max().unwrap_or(0);
            // With no live node every block "fits nowhere": that is no
            // space (retry later), not a block too large for the store.
            if len > self.cfg.max_block_bytes.as_u64() || (!self.nodes.is_empty() && len > largest) {
                slots.push(PutSlot::TooLarge);
                continue;
            }
            let placements = self.place(key, len, want, prefer);
            if placements.is_empty() {
                self.bump("put_no_space", 1);
                slots.push(PutSlot::NoSpace);
                continue;
            }
            self.objects.insert(
                key,
                Object {
                    len,
                    checksum: 0,
                    status: Status::Pending { put_id },
                    replicas: placements.iter().map(|r| ReplicaState { replica: r.clone(), ready: false }).collect(),
                    leases: 0,
                    pinned: false,
                    motion: Motion::Still,
                    ssd_hits: 0,
                    hits: 0,
                    doomed: false,
                },
            );
            reserved.push(key);
            slots.push(PutSlot::Reserved(placements));
        }
        if !reserved.is_empty() {
            self.bump("puts_started", reserved.len() as u64);
            // Increasing across restarts too (wall clock), so a node never
            // takes a new put's grant for an older one.
            self.grant_seq = (self.grant_seq + 1).max(now_ms.saturating_mul(1 << 20));
            let put = Put { keys: reserved, deadline_ms: now_ms + self.cfg.put_timeout_ms, grant_seq: self.grant_seq };
            self.puts.insert(put_id, put);
        }
        self.flush()?;
        Ok((put_id, slots))
    }

    /// Up to `want` DRAM placements on distinct nodes: first without
    /// evicting anything, then evicting by policy on the roomiest nodes.
    fn place(&mut self, key: BlockKey, len: u64, want: usize, prefer: Option<&str>) -> Vec<Replica> {
        let mut order: Vec<(String, f64)> =
            self.nodes.values().map(|n| (n.peer.name.clone(), n.free_ratio())).collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if let Some(p) = prefer {
            if let Some(i) = order.iter().position(|(n, _)| n == p) {
                let preferred = order.remove(i);
                order.insert(0, preferred);
            }
        }
        let mut out: Vec<Replica> = Vec::new();
        for evict in [false, true] {
            for (name, _) in &order {
                if out.len() == want {
                    return out;
                }
                if out.iter().any(|r| &r.node == name) {
                    continue;
                }
                if let Some((segment, offset)) = self.alloc_on(name, len, evict) {
                    let incarnation = self.nodes.get(name).map_or(0, |n| n.peer.incarnation);
                    out.push(Replica {
                        node: name.clone(),
                        incarnation,
                        location: Location::Dram { segment, offset },
                        len,
                    });
                }
            }
        }
        let _ = key;
        out
    }

    /// Allocates on one node, evicting DRAM victims by policy when allowed.
    fn alloc_on(&mut self, name: &str, len: u64, evict: bool) -> Option<(u32, u64)> {
        // Bound the work of one allocation; a pathological layout gives NoSpace.
        const MAX_VICTIMS: usize = 256;
        for _ in 0..=MAX_VICTIMS {
            let node = self.nodes.get_mut(name)?;
            if let Some(at) = node.alloc(len) {
                return Some(at);
            }
            if !evict {
                return None;
            }
            let objects = &self.objects;
            let victim = node.dram.evict(&mut |k| objects.get(k).is_some_and(Object::evictable))?;
            self.bump("evictions", 1);
            self.drop_replica(victim, name, Tier::Dram);
        }
        None
    }

    /// Publishes the listed keys of `put_id` with their checksums. Keys of
    /// the put not listed stay pending (revoke them, or they time out).
    pub fn put_end(&mut self, put_id: u64, done: &[(BlockKey, u64)]) -> Result<u32, MasterError> {
        let put = self.puts.get_mut(&put_id).ok_or(MasterError::UnknownPut(put_id))?;
        let mut published = Vec::new();
        for &(key, checksum) in done {
            if let Some(i) = put.keys.iter().position(|k| *k == key) {
                put.keys.swap_remove(i);
                published.push((key, checksum));
            }
        }
        if put.keys.is_empty() {
            self.puts.remove(&put_id);
        }
        let mut count = 0;
        for (key, checksum) in published {
            let Some(o) = self.objects.get_mut(&key) else { continue };
            // Placements on nodes that died meanwhile are gone.
            let nodes = &self.nodes;
            o.replicas
                .retain(|r| nodes.get(&r.replica.node).is_some_and(|n| n.peer.incarnation == r.replica.incarnation));
            if o.replicas.is_empty() {
                self.objects.remove(&key);
                continue;
            }
            o.checksum = checksum;
            o.status = Status::Ready;
            for r in &mut o.replicas {
                r.ready = true;
                if let Some(n) = self.nodes.get_mut(&r.replica.node) {
                    n.dram.insert(key);
                }
            }
            self.dirty_objects.insert(key);
            count += 1;
        }
        self.bump("puts_published", u64::from(count));
        self.flush()?;
        Ok(count)
    }

    /// Reclaims every still-pending key of `put_id`.
    pub fn put_revoke(&mut self, put_id: u64) -> u32 {
        let Some(put) = self.puts.remove(&put_id) else { return 0 };
        let n = put.keys.len() as u32;
        for key in put.keys {
            self.reclaim_pending(key, put_id);
        }
        self.bump("puts_revoked", u64::from(n));
        n
    }

    fn reclaim_pending(&mut self, key: BlockKey, put_id: u64) {
        let pending = self.objects.get(&key).is_some_and(|o| o.status == Status::Pending { put_id });
        if !pending {
            return;
        }
        if let Some(o) = self.objects.remove(&key) {
            for r in o.replicas {
                self.release_space(&r.replica, key, false);
            }
        }
    }

    // ----- reads -----------------------------------------------------------

    /// Replicas of each key (None = miss), under a lease that holds them in
    /// place until released or expired.
    pub fn get_replicas(
        &mut self,
        keys: &[BlockKey],
        lease_ms: u64,
        now_ms: u64,
    ) -> Result<(u64, u64, Vec<Option<ReplicaSet>>), MasterError> {
        if keys.len() > self.cfg.max_batch {
            return Err(MasterError::Invalid(format!(
                "{} keys exceed the batch limit {}",
                keys.len(),
                self.cfg.max_batch
            )));
        }
        let lease_ms = if lease_ms == 0 { self.cfg.lease_ms } else { lease_ms.min(self.cfg.max_lease_ms) };
        let mut out = Vec::with_capacity(keys.len());
        let mut leased = Vec::new();
        let (mut hits, mut misses) = (0u64, 0u64);
        for &key in keys {
            let Some(set) = self.record_read(key) else {
                misses += 1;
                out.push(None);
                continue;
            };
            hits += 1;
            if !leased.contains(&key) {
                if let Some(o) = self.objects.get_mut(&key) {
                    o.leases += 1;
                }
                leased.push(key);
            }
            out.push(Some(set));
        }
        self.bump("get_hits", hits);
        self.bump("get_misses", misses);
        let lease_id = if leased.is_empty() {
            0
        } else {
            let id = self.new_id();
            self.leases.insert(id, Lease { keys: leased, expires_ms: now_ms + lease_ms });
            id
        };
        Ok((lease_id, lease_ms, out))
    }

    /// Counts reads clients served themselves from locations they already
    /// knew (validated by checksum, no lease), as `get_replicas` counts its
    /// reads. Returns how many keys are still stored.
    pub fn touch(&mut self, keys: &[BlockKey]) -> Result<u32, MasterError> {
        if keys.len() > self.cfg.max_batch {
            return Err(MasterError::Invalid(format!(
                "{} keys exceed the batch limit {}",
                keys.len(),
                self.cfg.max_batch
            )));
        }
        let found = keys.iter().filter(|&&key| self.record_read(key).is_some()).count();
        self.bump("touched", found as u64);
        Ok(found as u32)
    }

    /// One read of `key`: its readable replicas (DRAM first), after counting
    /// the read toward heat (replication), SSD promotion and each replica's
    /// eviction recency. `None` when the key is not readable.
    fn record_read(&mut self, key: BlockKey) -> Option<ReplicaSet> {
        let o = self.objects.get_mut(&key).filter(|o| o.readable())?;
        let mut replicas: Vec<Replica> = o.replicas.iter().filter(|r| r.ready).map(|r| r.replica.clone()).collect();
        if replicas.is_empty() {
            return None;
        }
        replicas.sort_by_key(Replica::tier);
        o.hits = o.hits.saturating_add(1);
        if self.cfg.hot_threshold > 0 && o.hits >= self.cfg.hot_threshold {
            self.hot_candidates.insert(key);
        }
        if replicas[0].tier() == Tier::Ssd {
            o.ssd_hits = o.ssd_hits.saturating_add(1);
            if o.ssd_hits >= self.cfg.promote_after_hits {
                self.promote_candidates.insert(key);
            }
        }
        let set = ReplicaSet { key, len: o.len, checksum: o.checksum, replicas };
        for r in &set.replicas {
            if let Some(n) = self.nodes.get_mut(&r.node) {
                match r.tier() {
                    Tier::Dram => n.dram.touch(&key),
                    Tier::Ssd => n.ssd.touch(&key),
                }
            }
        }
        Some(set)
    }

    /// Ends a lease early. Unknown ids (expired, or from before a restart) are fine.
    pub fn release_lease(&mut self, lease_id: u64) -> Result<(), MasterError> {
        if let Some(lease) = self.leases.remove(&lease_id) {
            self.end_lease(lease);
        }
        self.flush()
    }

    fn end_lease(&mut self, lease: Lease) {
        for key in lease.keys {
            let Some(o) = self.objects.get_mut(&key) else { continue };
            o.leases = o.leases.saturating_sub(1);
            if o.leases == 0 && o.doomed {
                self.forget_object(key);
            }
        }
    }

    /// Whether each key is stored, and how many leading keys are.
    pub fn lookup(&self, keys: &[BlockKey]) -> (Vec<bool>, u32) {
        let exists: Vec<bool> = keys.iter().map(|k| self.objects.get(k).is_some_and(Object::readable)).collect();
        let prefix = exists.iter().take_while(|e| **e).count() as u32;
        (exists, prefix)
    }

    // ----- removal, pins, bad replicas -------------------------------------

    /// Removes keys; a leased key disappears for readers now and is freed
    /// when its last lease ends.
    pub fn remove(&mut self, keys: &[BlockKey]) -> Result<u32, MasterError> {
        let mut removed = 0;
        for &key in keys {
            let Some(o) = self.objects.get_mut(&key) else { continue };
            if !o.readable() {
                continue;
            }
            removed += 1;
            if o.leases > 0 || o.motion == Motion::Moving {
                o.doomed = true;
                self.dirty_objects.insert(key);
            } else {
                self.forget_object(key);
            }
        }
        self.bump("removed", u64::from(removed));
        self.flush()?;
        Ok(removed)
    }

    pub fn pin(&mut self, keys: &[BlockKey], pinned: bool) -> Result<u32, MasterError> {
        let mut changed = 0;
        for key in keys {
            if let Some(o) = self.objects.get_mut(key).filter(|o| o.readable() && o.pinned != pinned) {
                o.pinned = pinned;
                changed += 1;
                self.dirty_objects.insert(*key);
            }
        }
        self.flush()?;
        Ok(changed)
    }

    /// A reader found `replica` of `key` unreadable or corrupt: drop it
    /// (its SSD file too). The object goes when no good replica is left.
    pub fn report_bad_replica(&mut self, key: BlockKey, replica: &Replica) -> Result<(), MasterError> {
        let known = self.objects.get(&key).is_some_and(|o| {
            o.replicas.iter().any(|r| {
                r.replica.node == replica.node
                    && r.replica.location == replica.location
                    && r.replica.incarnation == replica.incarnation
            })
        });
        if known {
            tracing::warn!(key = format_args!("{:016x}", key.0), node = %replica.node, "dropping bad replica");
            self.bump("bad_replicas", 1);
            self.drop_replica(key, &replica.node, replica.tier());
        }
        self.flush()
    }

    /// Removes the replica of `key` on `node` in `tier`, freeing its space;
    /// the object goes when it was the last ready one.
    fn drop_replica(&mut self, key: BlockKey, node: &str, tier: Tier) {
        let Some(o) = self.objects.get_mut(&key) else { return };
        let Some(i) = o.replicas.iter().position(|r| r.replica.node == node && r.replica.tier() == tier) else {
            return;
        };
        let r = o.replicas.swap_remove(i);
        let gone = o.status == Status::Ready && !o.replicas.iter().any(|r| r.ready);
        self.dirty_objects.insert(key);
        self.release_space(&r.replica, key, true);
        if gone {
            self.forget_object(key);
        }
    }

    /// Frees a replica's space on its node and takes it out of the policy.
    fn release_space(&mut self, r: &Replica, key: BlockKey, drop_ssd_file: bool) {
        let Some(n) = self.nodes.get_mut(&r.node).filter(|n| n.peer.incarnation == r.incarnation) else { return };
        match r.location {
            Location::Dram { segment, offset } => {
                n.release(segment, offset, r.len);
                n.dram.remove(&key);
            }
            Location::Ssd { .. } => {
                n.ssd_used = n.ssd_used.saturating_sub(r.len);
                n.ssd.remove(&key);
                if drop_ssd_file {
                    self.pending_drops.entry(r.node.clone()).or_default().push(key);
                }
            }
        }
    }

    fn forget_object(&mut self, key: BlockKey) {
        if let Some(o) = self.objects.remove(&key) {
            for r in &o.replicas {
                self.release_space(&r.replica, key, true);
            }
            self.dirty_objects.insert(key);
        }
    }

    // ----- housekeeping ----------------------------------------------------

    /// Expires leases and puts, drops silent nodes, and plans tiering and
    /// replication. Call every [`MasterConfig::tick_ms`].
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<Command>, MasterError> {
        let expired: Vec<u64> = self.leases.iter().filter(|(_, l)| l.expires_ms <= now_ms).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(lease) = self.leases.remove(&id) {
                self.bump("leases_expired", 1);
                self.end_lease(lease);
            }
        }
        let timed_out: Vec<u64> =
            self.puts.iter().filter(|(_, p)| p.deadline_ms <= now_ms).map(|(id, _)| *id).collect();
        for id in timed_out {
            let n = self.put_revoke(id);
            self.bump("puts_timed_out", u64::from(n));
        }
        let silent: Vec<String> = self
            .nodes
            .values()
            .filter(|n| now_ms.saturating_sub(n.last_heartbeat_ms) > self.cfg.node_timeout_ms)
            .map(|n| n.peer.name.clone())
            .collect();
        for name in silent {
            self.drop_node(&name, "missed heartbeats");
        }
        let mut commands = Vec::new();
        self.plan_demotions(&mut commands, now_ms);
        self.plan_promotions(&mut commands);
        self.plan_replication(&mut commands);
        for (node, keys) in std::mem::take(&mut self.pending_drops) {
            if self.nodes.contains_key(&node) && !keys.is_empty() {
                commands.push(Command::DropSsd { node, keys });
            }
        }
        self.flush()?;
        Ok(commands)
    }
}
