//! An in-process store for stage 3: a master and one storage node started
//! in the bench's own tokio runtime, on loopback ports the OS picks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_kvstore::master::{MasterConfig, MasterHandle};
use tandem_kvstore::node::{NodeHandle, StorageConfig};
use tandem_kvstore::segment::Segment;
use tandem_kvstore::transport::{TransportConfig, TransportPreference};
use tandem_kvstore::types::PeerInfo;

/// Longest wait for the node to register with the master.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

/// A running master and storage node. [`Cluster::shutdown`] stops both;
/// dropping it stops the master at once and the node with the runtime.
#[derive(Debug)]
pub struct Cluster {
    master: MasterHandle,
    node: NodeHandle,
    master_addr: SocketAddr,
}

impl Cluster {
    /// Starts a master (no persistence, hot replication off: one node) and a
    /// node with `dram` of segments in `shm_dir`, waits until the node is
    /// registered, and writes every segment page once so that no timed put
    /// pays for tmpfs allocating it.
    pub async fn start(shm_dir: &Path, dram: ByteSize) -> anyhow::Result<Cluster> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let master_cfg =
            MasterConfig { listen: loopback, metadata_dir: None, hot_threshold: 0, ..MasterConfig::default() };
        let master = tandem_kvstore::master::serve(master_cfg)
            .await
            .map_err(anyhow::Error::msg)
            .context("starting the master")?;
        let master_addr = master.local_addr();
        let node_cfg = StorageConfig {
            name: format!("bench-{}", std::process::id()),
            master: master_addr.to_string(),
            listen: loopback,
            data_listen: loopback,
            dram,
            segment_size: dram,
            shm_dir: shm_dir.to_owned(),
            huge_pages: true,
            ssd_dir: None,
            ssd: ByteSize::b(0),
            transport: TransportConfig::default(),
            cluster_token: None,
        };
        let node = tandem_kvstore::node::start(node_cfg).await.context("starting the storage node")?;
        let cluster = Cluster { master, node, master_addr };
        cluster.wait_registered().await?;
        let paths: Vec<_> = cluster.node.peer.segments.iter().map(|s| s.path.clone()).collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let zeros = vec![0u8; 16 << 20];
            for path in paths {
                let seg = Segment::open(&path).context("mapping a node segment")?;
                let mut at = 0u64;
                while at < seg.len() {
                    let n = zeros.len().min((seg.len() - at) as usize);
                    seg.write_at(at, &zeros[..n])?;
                    at += n as u64;
                }
            }
            Ok(())
        })
        .await
        .context("pre-faulting the node's segments")??;
        Ok(cluster)
    }

    async fn wait_registered(&self) -> anyhow::Result<()> {
        let client = self.client(TransportPreference::Auto)?;
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        loop {
            match client.stats().await {
                Ok(s) if !s.nodes.is_empty() => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Ok(_) => bail!("the storage node did not register within {REGISTER_TIMEOUT:?}"),
                Err(e) => bail!("the master did not answer within {REGISTER_TIMEOUT:?}: {e}"),
            }
        }
    }

    /// A new client (its own gRPC channel and transports) preferring `prefer`.
    pub fn client(&self, prefer: TransportPreference) -> anyhow::Result<Arc<StoreClient>> {
        self.client_with(prefer, ClientConfig::default().location_cache_blocks)
    }

    /// A new client remembering at most `location_cache_blocks` block
    /// locations (0: every get asks the master).
    pub fn client_with(
        &self,
        prefer: TransportPreference,
        location_cache_blocks: usize,
    ) -> anyhow::Result<Arc<StoreClient>> {
        let cfg = ClientConfig {
            master: self.master_addr.to_string(),
            location_cache_blocks,
            transport: TransportConfig { prefer, ..TransportConfig::default() },
            ..ClientConfig::default()
        };
        Ok(Arc::new(StoreClient::new(cfg)?))
    }

    /// How to reach the node's data plane.
    pub fn peer(&self) -> &PeerInfo {
        &self.node.peer
    }

    pub async fn shutdown(self) {
        self.node.shutdown().await;
        self.master.shutdown().await;
    }
}
