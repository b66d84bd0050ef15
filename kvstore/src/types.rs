//! Domain types shared by the master, storage nodes, transports and client.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_proto::BlockKey;

/// Storage tier of one copy of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Dram,
    Ssd,
}

/// Where a block's bytes sit on one storage node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// A byte range of a DRAM segment (`offset` from the segment's start).
    Dram { segment: u32, offset: u64 },
    /// The node's SSD block file for `key` (see [`crate::ssd::block_file_name`]).
    Ssd { key: BlockKey },
}

impl Location {
    pub fn tier(&self) -> Tier {
        match self {
            Location::Dram { .. } => Tier::Dram,
            Location::Ssd { .. } => Tier::Ssd,
        }
    }
}

/// One copy of a block: which node (and which life of it) and where there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub node: String,
    pub incarnation: u64,
    pub location: Location,
    pub len: u64,
}

impl Replica {
    pub fn tier(&self) -> Tier {
        self.location.tier()
    }
}

/// One DRAM segment a storage node contributes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDesc {
    pub id: u32,
    pub bytes: u64,
    /// File backing the segment; processes on the same host may map it.
    pub path: PathBuf,
}

/// What a client needs to reach one storage node's data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub name: String,
    /// Changes on every start of the node; replicas of an old incarnation are gone.
    pub incarnation: u64,
    pub data_addr: SocketAddr,
    /// Equal host ids mean the shm transport can map the peer's files.
    pub host_id: String,
    pub segments: Vec<SegmentDesc>,
    /// The node's SSD tier directory, when it has one.
    pub ssd_dir: Option<PathBuf>,
}
