//! The master's metadata store: rocksdb, written through on every change
//! (one write batch per operation), read back on restart.
//!
//! Layout: keys `n/<node name>` hold a node (JSON), keys `o/<16 hex digits>`
//! an object with its ready replicas (JSON). Pending puts and leases are not
//! persisted: after a restart, writers whose put was in flight get
//! "unknown put" and retry, and readers' leases are void.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::types::{Location, PeerInfo, Replica, Tier};

/// A node as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedNode {
    pub peer: PeerInfo,
    pub control_addr: String,
    pub ssd_capacity: u64,
}

/// One replica as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedReplica {
    pub node: String,
    pub incarnation: u64,
    pub tier: Tier,
    pub segment: u32,
    pub offset: u64,
}

impl From<&Replica> for PersistedReplica {
    fn from(r: &Replica) -> Self {
        let (segment, offset) = match r.location {
            Location::Dram { segment, offset } => (segment, offset),
            Location::Ssd { .. } => (0, 0),
        };
        PersistedReplica { node: r.node.clone(), incarnation: r.incarnation, tier: r.tier(), segment, offset }
    }
}

impl PersistedReplica {
    pub fn into_replica(self, len: u64, key: u64) -> Replica {
        let location = match self.tier {
            Tier::Dram => Location::Dram { segment: self.segment, offset: self.offset },
            Tier::Ssd => Location::Ssd { key: tandem_proto::BlockKey(key) },
        };
        Replica { node: self.node, incarnation: self.incarnation, location, len }
    }
}

/// An object as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedObject {
    pub len: u64,
    pub checksum: u64,
    pub pinned: bool,
    pub replicas: Vec<PersistedReplica>,
}

/// Everything a store holds: nodes, and objects by key.
pub type Loaded = (Vec<PersistedNode>, Vec<(u64, PersistedObject)>);

/// The rocksdb database behind a master.
pub struct MetaStore {
    db: rocksdb::DB,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore").field("path", &self.db.path()).finish()
    }
}

const NODE_PREFIX: &[u8] = b"n/";
const OBJECT_PREFIX: &[u8] = b"o/";

impl MetaStore {
    pub fn open(dir: &Path) -> Result<MetaStore, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir).map_err(|e| format!("opening metadata store {}: {e}", dir.display()))?;
        Ok(MetaStore { db })
    }

    /// Applies upserts (`Some`) and deletions (`None`) in one atomic batch.
    pub fn write(
        &self,
        objects: &[(u64, Option<PersistedObject>)],
        nodes: &[(String, Option<PersistedNode>)],
    ) -> Result<(), String> {
        let mut batch = rocksdb::WriteBatch::default();
        for (key, record) in objects {
            let k = object_key(*key);
            match record {
                Some(r) => batch.put(k, serde_json::to_vec(r).map_err(|e| e.to_string())?),
                None => batch.delete(k),
            }
        }
        for (name, record) in nodes {
            let mut k = NODE_PREFIX.to_vec();
            k.extend_from_slice(name.as_bytes());
            match record {
                Some(r) => batch.put(k, serde_json::to_vec(r).map_err(|e| e.to_string())?),
                None => batch.delete(k),
            }
        }
        self.db.write(batch).map_err(|e| format!("metadata write: {e}"))
    }

    /// Everything stored. Unreadable records are skipped with a warning
    /// (a damaged record loses one block, not the master).
    pub fn load(&self) -> Result<Loaded, String> {
        let mut nodes = Vec::new();
        let mut objects = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| format!("metadata read: {e}"))?;
            if let Some(name) = k.strip_prefix(NODE_PREFIX) {
                match serde_json::from_slice::<PersistedNode>(&v) {
                    Ok(n) => nodes.push(n),
                    Err(e) => {
                        tracing::warn!(node = %String::from_utf8_lossy(name), "skipping unreadable node record: {e}")
                    }
                }
            } else if let Some(hex) = k.strip_prefix(OBJECT_PREFIX) {
                let key = std::str::from_utf8(hex).ok().and_then(|h| u64::from_str_radix(h, 16).ok());
                match (key, serde_json::from_slice::<PersistedObject>(&v)) {
                    (Some(key), Ok(o)) => objects.push((key, o)),
                    _ => tracing::warn!(key = %String::from_utf8_lossy(hex), "skipping unreadable object record"),
                }
            }
        }
        Ok((nodes, objects))
    }
}

fn object_key(key: u64) -> Vec<u8> {
    let mut k = OBJECT_PREFIX.to_vec();
    k.extend_from_slice(format!("{key:016x}").as_bytes());
    k
}
