//! The store master: metadata only, never on the data path (DESIGN.md §4).
//!
//! - [`state`] — the synchronous state machine (objects, replicas, two-phase
//!   puts, leases, pins, membership, placement, tiering and replication
//!   plans), driven by a clock passed in.
//! - [`alloc`] — byte-range allocation inside DRAM segments.
//! - [`persist`] — the rocksdb metadata store that survives restarts.
//! - [`service`] — the tonic `Master` service around the state, its
//!   housekeeping loop and the commands it sends to storage nodes.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use tandem_proto::cluster_token::ClusterToken;

use crate::policy::PolicyKind;

pub mod alloc;
pub mod persist;
pub mod service;
pub mod state;

pub use service::{serve, MasterHandle};
pub use state::{Command, MasterError, MasterState};

/// Configuration of a master (`[kvstore.master]` in the cluster file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MasterConfig {
    /// Node name of the master in the cluster file.
    pub name: String,
    /// gRPC address clients and storage nodes connect to.
    pub listen: SocketAddr,
    /// Where the metadata is persisted (rocksdb). Without it the master
    /// rebuilds only what storage nodes report (their SSD tiers).
    pub metadata_dir: Option<PathBuf>,
    /// Eviction policy of every node's DRAM and SSD tier.
    pub policy: PolicyKind,
    /// Copies per block when the writer asks for the default.
    pub default_replicas: u32,
    /// Upper bound on copies a writer may ask for.
    pub max_replicas: u32,
    /// Reads after which a block counts as hot (0 = no hot replication).
    pub hot_threshold: u32,
    /// DRAM copies a hot block gets (on distinct nodes).
    pub hot_replicas: u32,
    /// SSD-served reads after which a block is promoted back to DRAM.
    pub promote_after_hits: u32,
    /// DRAM use (fraction) above which blocks are demoted to SSD ...
    pub dram_high_watermark: f64,
    /// ... down to this fraction.
    pub dram_low_watermark: f64,
    /// A reservation not published within this is reclaimed.
    pub put_timeout_ms: u64,
    /// Default read lease.
    pub lease_ms: u64,
    /// Longest lease a reader may ask for.
    pub max_lease_ms: u64,
    /// How often storage nodes heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A node silent for this long is dropped with its replicas.
    pub node_timeout_ms: u64,
    /// Housekeeping period (expiry, tiering, replication).
    pub tick_ms: u64,
    /// Largest block accepted.
    pub max_block_bytes: ByteSize,
    /// Most keys in one request.
    pub max_batch: usize,
    /// Required on every call, and sent to storage nodes (filled in at
    /// start from `[auth]`, never read from the file).
    #[serde(skip)]
    pub cluster_token: Option<ClusterToken>,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            name: "master".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            metadata_dir: None,
            policy: PolicyKind::DEFAULT,
            default_replicas: 1,
            max_replicas: 3,
            hot_threshold: 64,
            hot_replicas: 2,
            promote_after_hits: 2,
            dram_high_watermark: 0.90,
            dram_low_watermark: 0.80,
            put_timeout_ms: 30_000,
            lease_ms: 5_000,
            max_lease_ms: 60_000,
            heartbeat_interval_ms: 1_000,
            node_timeout_ms: 5_000,
            tick_ms: 100,
            max_block_bytes: ByteSize::mib(64),
            max_batch: 4096,
            cluster_token: None,
        }
    }
}

impl MasterConfig {
    /// Rejects settings that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, msg: &str| if ok { Ok(()) } else { Err(format!("kvstore.master: {msg}")) };
        check(self.default_replicas >= 1, "default_replicas must be at least 1")?;
        check(self.max_replicas >= self.default_replicas, "max_replicas must be >= default_replicas")?;
        check(self.hot_replicas >= 1, "hot_replicas must be at least 1")?;
        check(self.promote_after_hits >= 1, "promote_after_hits must be at least 1")?;
        check(
            self.dram_low_watermark > 0.0
                && self.dram_low_watermark < self.dram_high_watermark
                && self.dram_high_watermark <= 1.0,
            "need 0 < dram_low_watermark < dram_high_watermark <= 1",
        )?;
        check(self.put_timeout_ms > 0 && self.lease_ms > 0, "put_timeout_ms and lease_ms must be positive")?;
        check(self.max_lease_ms >= self.lease_ms, "max_lease_ms must be >= lease_ms")?;
        check(
            self.heartbeat_interval_ms > 0 && self.node_timeout_ms > self.heartbeat_interval_ms,
            "node_timeout_ms must exceed heartbeat_interval_ms (> 0)",
        )?;
        check(self.tick_ms > 0 && self.tick_ms <= 10_000, "tick_ms must be in 1..=10000")?;
        check(self.max_block_bytes.as_u64() > 0, "max_block_bytes must be positive")?;
        check(self.max_batch > 0 && self.max_batch <= 1 << 20, "max_batch must be in 1..=1048576")?;
        Ok(())
    }
}
