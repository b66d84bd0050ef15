//! Tiering (DRAM → SSD demotion above a watermark, admission-controlled
//! SSD → DRAM promotion) and replication of hot blocks: planned in
//! [`MasterState::tick`], carried out by storage nodes, confirmed by the
//! `*_done` calls.

use tandem_proto::BlockKey;

use super::{BlockRange, Command, MasterError, MasterState, Motion, Object, ReplicaState, Status};
use crate::types::{Location, Replica, Tier};

/// Bound on blocks one node is asked to move per tick.
const MAX_MOVES_PER_TICK: usize = 256;
/// First pause of demotions to a node after some of them failed ...
const BACKOFF_FIRST_MS: u64 = 100;
/// ... doubling with every round that fails again, up to this.
const BACKOFF_MAX_MS: u64 = 10_000;

/// Demotion failures of one node: a disk that is full or failing answers
/// every demotion with an error, and retrying each tick would spend the
/// node's disk and the log on nothing. Meanwhile DRAM above the watermark
/// is freed the way it is without an SSD tier: puts evict by policy.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    /// Rounds in a row with a failed demotion.
    failed_rounds: u32,
    /// No demotions are planned before this.
    retry_at_ms: u64,
    /// What the demotions that finished since the last plan did.
    saw_failure: bool,
    saw_success: bool,
}

impl Backoff {
    /// Takes in the outcomes since the last plan; whether to plan now.
    fn ready(&mut self, node: &str, now_ms: u64) -> bool {
        if self.saw_failure {
            self.failed_rounds = self.failed_rounds.saturating_add(1);
            let pause = BACKOFF_FIRST_MS.saturating_mul(1 << self.failed_rounds.min(16).saturating_sub(1));
            let pause = pause.min(BACKOFF_MAX_MS);
            self.retry_at_ms = now_ms + pause;
            tracing::warn!(
                node,
                rounds = self.failed_rounds,
                pause_ms = pause,
                "demotions to SSD failed; pausing them"
            );
        } else if self.saw_success {
            self.failed_rounds = 0;
        }
        (self.saw_failure, self.saw_success) = (false, false);
        now_ms >= self.retry_at_ms
    }
}

impl MasterState {
    /// Demotes policy victims of every node whose DRAM use (minus what is
    /// already being demoted) is above the high watermark, down to the low one.
    /// Nodes whose demotions failed are paused (see [`Backoff`]).
    pub(super) fn plan_demotions(&mut self, commands: &mut Vec<Command>, now_ms: u64) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for name in names {
            if !self.nodes.get_mut(&name).is_some_and(|n| n.demote_backoff.ready(&name, now_ms)) {
                continue;
            }
            let mut blocks = Vec::new();
            let mut dropped_copies = Vec::new();
            let over = |n: &super::NodeState, mark: f64| {
                n.dram_used().saturating_sub(n.demoting) as f64 > n.dram_capacity() as f64 * mark
            };
            let Some(node) = self.nodes.get(&name) else { continue };
            if node.ssd_capacity == 0 || !over(node, self.cfg.dram_high_watermark) {
                continue;
            }
            while let Some(node) = self.nodes.get_mut(&name) {
                if blocks.len() >= MAX_MOVES_PER_TICK || !over(node, self.cfg.dram_low_watermark) {
                    break;
                }
                let objects = &self.objects;
                let Some(victim) = node.dram.evict(&mut |k| objects.get(k).is_some_and(Object::evictable)) else {
                    break;
                };
                let Some(o) = self.objects.get(&victim) else { continue };
                let on_ssd_here = o.replicas.iter().any(|r| r.replica.node == name && r.replica.tier() == Tier::Ssd);
                if on_ssd_here {
                    // Already on this node's SSD: dropping the DRAM copy is the demotion.
                    dropped_copies.push(victim);
                    self.drop_replica(victim, &name, Tier::Dram);
                    continue;
                }
                let len = o.len;
                let checksum = o.checksum;
                let Some(Location::Dram { segment, offset }) = o
                    .replicas
                    .iter()
                    .find(|r| r.ready && r.replica.node == name && r.replica.tier() == Tier::Dram)
                    .map(|r| r.replica.location)
                else {
                    continue;
                };
                if !self.make_ssd_room(&name, len) {
                    // The SSD tier cannot take it: put it back and stop for this node.
                    if let Some(n) = self.nodes.get_mut(&name) {
                        n.dram.insert(victim);
                    }
                    break;
                }
                if let Some(n) = self.nodes.get_mut(&name) {
                    n.ssd_used += len;
                    n.demoting += len;
                }
                if let Some(o) = self.objects.get_mut(&victim) {
                    o.motion = Motion::Moving;
                }
                blocks.push(BlockRange { key: victim, segment, offset, len, checksum });
            }
            if !dropped_copies.is_empty() {
                self.bump("demotions", dropped_copies.len() as u64);
            }
            if !blocks.is_empty() {
                commands.push(Command::Demote { node: name.clone(), blocks });
            }
        }
    }

    /// Evicts SSD victims on `node` until `len` more bytes fit.
    fn make_ssd_room(&mut self, node: &str, len: u64) -> bool {
        loop {
            let Some(n) = self.nodes.get_mut(node) else { return false };
            if n.ssd_used + len <= n.ssd_capacity {
                return true;
            }
            let objects = &self.objects;
            let Some(victim) = n.ssd.evict(&mut |k| objects.get(k).is_some_and(Object::evictable)) else {
                return false;
            };
            self.bump("ssd_evictions", 1);
            self.drop_replica(victim, node, Tier::Ssd);
        }
    }

    /// A node finished (or failed) copying `key` from DRAM to SSD.
    pub fn demote_done(&mut self, node: &str, key: BlockKey, ok: bool) -> Result<(), MasterError> {
        let Some(o) = self.objects.get_mut(&key) else {
            if ok {
                // The block went away meanwhile: its new SSD file is garbage.
                self.pending_drops.entry(node.to_owned()).or_default().push(key);
            }
            return self.flush();
        };
        o.motion = Motion::Still;
        let len = o.len;
        let dram = o.replicas.iter().find(|r| r.replica.node == node && r.replica.tier() == Tier::Dram).cloned();
        if let Some(n) = self.nodes.get_mut(node) {
            n.demoting = n.demoting.saturating_sub(len);
            if ok {
                n.demote_backoff.saw_success = true;
            } else {
                n.demote_backoff.saw_failure = true;
            }
        }
        let Some(n) = self.nodes.get_mut(node) else { return self.flush() };
        let incarnation = n.peer.incarnation;
        if !ok || dram.is_none() {
            n.ssd_used = n.ssd_used.saturating_sub(len);
            if dram.is_some() {
                n.dram.insert(key);
            } else if ok {
                self.pending_drops.entry(node.to_owned()).or_default().push(key);
            }
            self.bump("demotions_failed", u64::from(!ok));
            return self.finish_motion(key);
        }
        n.ssd.insert(key);
        let ssd = Replica { node: node.to_owned(), incarnation, location: Location::Ssd { key }, len };
        if let Some(o) = self.objects.get_mut(&key) {
            o.replicas.push(ReplicaState { replica: ssd, ready: true });
            let leased = o.leases > 0;
            self.dirty_objects.insert(key);
            if leased {
                // A reader holds the DRAM copy: keep it; the next round drops it.
                if let Some(n) = self.nodes.get_mut(node) {
                    n.dram.insert(key);
                }
            } else {
                self.drop_replica(key, node, Tier::Dram);
            }
        }
        self.bump("demotions", 1);
        self.finish_motion(key)
    }

    /// Promotes SSD-only blocks read often enough, into free DRAM on the
    /// same node only (admission control: a promotion never evicts).
    pub(super) fn plan_promotions(&mut self, commands: &mut Vec<Command>) {
        let candidates: Vec<BlockKey> = self.promote_candidates.drain().collect();
        let mut per_node: std::collections::BTreeMap<String, Vec<BlockRange>> = Default::default();
        for key in candidates {
            let Some(o) = self.objects.get_mut(&key) else { continue };
            o.ssd_hits = 0;
            if !(o.readable() && o.motion == Motion::Still) {
                continue;
            }
            if o.replicas.iter().any(|r| r.replica.tier() == Tier::Dram) {
                continue;
            }
            let Some(src) = o.replicas.iter().find(|r| r.ready && r.replica.tier() == Tier::Ssd) else { continue };
            let name = src.replica.node.clone();
            let (len, checksum) = (o.len, o.checksum);
            let Some(n) = self.nodes.get_mut(&name) else { continue };
            if per_node.get(&name).is_some_and(|v| v.len() >= MAX_MOVES_PER_TICK) {
                continue;
            }
            let Some((segment, offset)) = n.alloc(len) else { continue };
            let replica = Replica {
                node: name.clone(),
                incarnation: n.peer.incarnation,
                location: Location::Dram { segment, offset },
                len,
            };
            if let Some(o) = self.objects.get_mut(&key) {
                o.replicas.push(ReplicaState { replica, ready: false });
                o.motion = Motion::Moving;
            }
            per_node.entry(name).or_default().push(BlockRange { key, segment, offset, len, checksum });
        }
        for (node, blocks) in per_node {
            commands.push(Command::Promote { node, blocks });
        }
    }

    /// A node finished (or failed) copying `key` from SSD into DRAM.
    pub fn promote_done(&mut self, node: &str, key: BlockKey, ok: bool) -> Result<(), MasterError> {
        self.bump(if ok { "promotions" } else { "promotions_failed" }, 1);
        self.fill_done(node, key, ok)
    }

    /// Replicates hot blocks to other nodes with free DRAM, up to
    /// `hot_replicas` DRAM copies.
    pub(super) fn plan_replication(&mut self, commands: &mut Vec<Command>) {
        let candidates: Vec<BlockKey> = self.hot_candidates.drain().collect();
        for key in candidates.into_iter().take(MAX_MOVES_PER_TICK) {
            let Some(o) = self.objects.get_mut(&key) else { continue };
            o.hits = 0;
            if !(o.readable() && o.motion == Motion::Still) {
                continue;
            }
            let dram_copies = o.replicas.iter().filter(|r| r.replica.tier() == Tier::Dram).count();
            if dram_copies >= self.cfg.hot_replicas as usize {
                continue;
            }
            let Some(source) =
                o.replicas.iter().filter(|r| r.ready).min_by_key(|r| r.replica.tier()).map(|r| r.replica.clone())
            else {
                continue;
            };
            let holders: Vec<String> = o.replicas.iter().map(|r| r.replica.node.clone()).collect();
            let (len, checksum) = (o.len, o.checksum);
            let Some(source_peer) = self.nodes.get(&source.node).map(|n| n.peer.clone()) else { continue };
            let mut order: Vec<(&String, f64)> = self
                .nodes
                .iter()
                .filter(|(name, _)| !holders.contains(name))
                .map(|(name, n)| (name, n.free_ratio()))
                .collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1));
            let Some(dest_name) = order.first().map(|(name, _)| (*name).clone()) else { continue };
            let Some(n) = self.nodes.get_mut(&dest_name) else { continue };
            let Some((segment, offset)) = n.alloc(len) else { continue };
            let replica = Replica {
                node: dest_name.clone(),
                incarnation: n.peer.incarnation,
                location: Location::Dram { segment, offset },
                len,
            };
            if let Some(o) = self.objects.get_mut(&key) {
                o.replicas.push(ReplicaState { replica, ready: false });
                o.motion = Motion::Moving;
            }
            commands.push(Command::Replicate {
                node: dest_name,
                dest: BlockRange { key, segment, offset, len, checksum },
                source,
                source_peer: Box::new(source_peer),
            });
        }
    }

    /// A node finished (or failed) pulling a replica of `key`.
    pub fn replicate_done(&mut self, node: &str, key: BlockKey, ok: bool) -> Result<(), MasterError> {
        self.bump(if ok { "replications" } else { "replications_failed" }, 1);
        self.fill_done(node, key, ok)
    }

    /// Completes a promotion or replication into a pending DRAM replica.
    fn fill_done(&mut self, node: &str, key: BlockKey, ok: bool) -> Result<(), MasterError> {
        let Some(o) = self.objects.get_mut(&key) else { return self.flush() };
        o.motion = Motion::Still;
        let Some(i) =
            o.replicas.iter().position(|r| !r.ready && r.replica.node == node && r.replica.tier() == Tier::Dram)
        else {
            return self.finish_motion(key);
        };
        if ok && o.status == Status::Ready {
            o.replicas[i].ready = true;
            self.dirty_objects.insert(key);
            if let Some(n) = self.nodes.get_mut(node) {
                n.dram.insert(key);
            }
        } else {
            let r = o.replicas.swap_remove(i);
            self.release_space(&r.replica, key, false);
        }
        self.finish_motion(key)
    }

    /// Frees a block whose removal waited for its move to finish.
    fn finish_motion(&mut self, key: BlockKey) -> Result<(), MasterError> {
        if self.objects.get(&key).is_some_and(|o| o.doomed && o.leases == 0) {
            self.forget_object(key);
        }
        self.flush()
    }
}
