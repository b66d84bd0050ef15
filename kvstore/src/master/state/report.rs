//! Read-only views of the master's state (stats, key listings, the node
//! directory) and the write-through to the metadata store.

use tandem_proto::BlockKey;

use super::{KeyReport, MasterError, MasterState, NodeReport, Stats, Status, TierUsage};
use crate::master::persist::{PersistedNode, PersistedObject, PersistedReplica};
use crate::types::{PeerInfo, Tier};

impl MasterState {
    pub fn stats(&self, now_ms: u64) -> Stats {
        let nodes = self
            .nodes
            .values()
            .map(|n| NodeReport {
                peer: n.peer.clone(),
                control_addr: n.control_addr.clone(),
                tiers: vec![
                    TierUsage {
                        tier: Tier::Dram,
                        capacity: n.dram_capacity(),
                        used: n.dram_used(),
                        blocks: n.dram.len() as u64,
                    },
                    TierUsage {
                        tier: Tier::Ssd,
                        capacity: n.ssd_capacity,
                        used: n.ssd_used,
                        blocks: n.ssd.len() as u64,
                    },
                ],
                last_heartbeat_ms_ago: now_ms.saturating_sub(n.last_heartbeat_ms),
            })
            .collect();
        Stats {
            nodes,
            objects: self.objects.values().filter(|o| o.readable()).count() as u64,
            pending_puts: self.objects.values().filter(|o| matches!(o.status, Status::Pending { .. })).count() as u64,
            active_leases: self.leases.len() as u64,
            pinned: self.objects.values().filter(|o| o.pinned).count() as u64,
            counters: self.counters.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            policy: self.cfg.policy.name().to_owned(),
        }
    }

    /// Up to `limit` readable keys greater than `after`, in key order.
    pub fn list_keys(&self, after: BlockKey, limit: usize) -> Vec<KeyReport> {
        let mut keys: Vec<BlockKey> =
            self.objects.iter().filter(|(k, o)| **k > after && o.readable()).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.truncate(limit);
        keys.into_iter()
            .filter_map(|key| {
                let o = self.objects.get(&key)?;
                Some(KeyReport {
                    key,
                    len: o.len,
                    checksum: o.checksum,
                    replicas: o.replicas.iter().filter(|r| r.ready).map(|r| r.replica.clone()).collect(),
                    pinned: o.pinned,
                    leases: o.leases,
                })
            })
            .collect()
    }

    /// Every live node: its data-plane description and control address.
    pub fn list_nodes(&self) -> Vec<(PeerInfo, String)> {
        self.nodes.values().map(|n| (n.peer.clone(), n.control_addr.clone())).collect()
    }

    /// Control address of a live node (where its tiering commands go).
    pub fn control_addr(&self, node: &str) -> Option<String> {
        self.nodes.get(node).map(|n| n.control_addr.clone())
    }

    /// Writes what changed since the last flush to the metadata store.
    pub(super) fn flush(&mut self) -> Result<(), MasterError> {
        let Some(store) = &self.store else {
            self.dirty_objects.clear();
            self.dirty_nodes.clear();
            return Ok(());
        };
        if self.dirty_objects.is_empty() && self.dirty_nodes.is_empty() {
            return Ok(());
        }
        let objects: Vec<(u64, Option<PersistedObject>)> = self
            .dirty_objects
            .drain()
            .map(|key| {
                let record = self.objects.get(&key).filter(|o| o.readable()).map(|o| PersistedObject {
                    len: o.len,
                    checksum: o.checksum,
                    pinned: o.pinned,
                    replicas: o
                        .replicas
                        .iter()
                        .filter(|r| r.ready)
                        .map(|r| PersistedReplica::from(&r.replica))
                        .collect(),
                });
                (key.0, record.filter(|r| !r.replicas.is_empty()))
            })
            .collect();
        let nodes: Vec<(String, Option<PersistedNode>)> = self
            .dirty_nodes
            .drain()
            .map(|name| {
                let record = self.nodes.get(&name).map(|n| PersistedNode {
                    peer: n.peer.clone(),
                    control_addr: n.control_addr.clone(),
                    ssd_capacity: n.ssd_capacity,
                });
                (name, record)
            })
            .collect();
        store.write(&objects, &nodes).map_err(MasterError::Persist)
    }
}
