//! What the store's loopback tests share: a master and storage nodes on
//! ephemeral ports with fast heartbeats, and a bounded wait.

#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use tandem_kvstore::master::{MasterConfig, MasterHandle};
use tandem_kvstore::node::{NodeHandle, StorageConfig};

/// A master on a loopback port that hears heartbeats every 100 ms and
/// ticks every 20 ms, so tests see registrations and timeouts quickly.
pub fn master_config() -> MasterConfig {
    MasterConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval_ms: 100,
        tick_ms: 20,
        ..MasterConfig::default()
    }
}

/// Storage node `name` of `master` on loopback ports, with `dram` bytes in
/// segments of `segment` bytes under `shm_dir` (no huge pages).
pub fn storage_config(name: &str, master: &MasterHandle, shm_dir: &Path, dram: u64, segment: u64) -> StorageConfig {
    StorageConfig {
        name: name.into(),
        master: master.local_addr().to_string(),
        listen: "127.0.0.1:0".parse().unwrap(),
        data_listen: "127.0.0.1:0".parse().unwrap(),
        dram: bytesize::ByteSize::b(dram),
        segment_size: bytesize::ByteSize::b(segment),
        shm_dir: shm_dir.to_path_buf(),
        huge_pages: false,
        ..StorageConfig::default()
    }
}

/// Polls `done` every 20 ms; fails the test naming `what` after 10 s.
pub async fn wait_for<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A master and one storage node in this process, with the directory
/// holding the node's files (removed when dropped).
pub struct OneNode {
    pub master: MasterHandle,
    pub node: NodeHandle,
    pub _dir: tempfile::TempDir,
}

impl OneNode {
    pub async fn stop(self) {
        self.node.shutdown().await;
        self.master.shutdown().await;
    }
}
