//! Reads from locations a client already knows (its location cache): they
//! skip the master, the master still hears of them (`Touch`), and a location
//! that went stale — the block removed and its range written over — is a
//! fallback to the leased read, never other bytes. A master and one storage
//! node in this process, real sockets and shared-memory files, over both
//! the shm and the tcp transport.

mod common;

use std::sync::atomic::Ordering;

use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_kvstore::master;
use tandem_kvstore::node;
use tandem_kvstore::transport::{TransportConfig, TransportPreference};
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;

const BLOCK: usize = 64 << 10;
const SEGMENT: u64 = 8 << 20;

fn block(key: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key as usize).wrapping_mul(37).wrapping_add(i * 11 + i / 253) as u8).collect()
}

use common::OneNode as Store;

async fn start_store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let master = master::serve(common::master_config()).await.unwrap();
    // One segment: a freed range goes to the next put of the same size.
    let node = node::start(common::storage_config("n0", &master, dir.path(), SEGMENT, SEGMENT)).await.unwrap();
    let store = Store { master, node, _dir: dir };
    let probe = store.client(TransportPreference::Tcp, 0);
    common::wait_for("the node to register", || async { probe.stats().await.map_or(0, |s| s.nodes.len()) == 1 }).await;
    store
}

impl Store {
    fn client(&self, prefer: TransportPreference, location_cache_blocks: usize) -> StoreClient {
        StoreClient::new(ClientConfig {
            master: self.master.local_addr().to_string(),
            location_cache_blocks,
            transport: TransportConfig { prefer, ..TransportConfig::default() },
            ..ClientConfig::default()
        })
        .unwrap()
    }

    async fn counter(&self, name: &str) -> u64 {
        let c = self.client(TransportPreference::Tcp, 0);
        c.stats().await.unwrap().counters.get(name).copied().unwrap_or(0)
    }

    /// Where the master says `key` lives: (segment, offset).
    async fn location(&self, key: u64) -> (u32, u64) {
        let mut m = self.client(TransportPreference::Tcp, 0).master();
        let reply = m.get_replicas(pb::GetReplicasRequest { keys: vec![key], lease_ms: 0 }).await.unwrap().into_inner();
        m.release_lease(pb::ReleaseLeaseRequest { lease_id: reply.lease_id }).await.unwrap();
        let r = &reply.entries[0].replicas[0];
        (r.segment, r.offset)
    }
}

fn keys(ks: &[u64]) -> Vec<BlockKey> {
    ks.iter().map(|k| BlockKey(*k)).collect()
}

const TRANSPORTS: [TransportPreference; 2] = [TransportPreference::Shm, TransportPreference::Tcp];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_read_again_skips_the_master_and_the_master_hears_of_it() {
    for prefer in TRANSPORTS {
        let store = start_store().await;
        let ks: Vec<u64> = (1..=8).collect();
        let writer = store.client(prefer, 1024);
        let data: Vec<Vec<u8>> = ks.iter().map(|k| block(*k, BLOCK)).collect();
        let items: Vec<(BlockKey, &[u8])> = ks.iter().zip(&data).map(|(k, d)| (BlockKey(*k), d.as_slice())).collect();
        writer.put(&items).await.unwrap();
        assert_eq!(writer.known_locations(), 8, "{prefer:?}: a put remembers where its blocks went");

        // The writer reads its own blocks without asking the master.
        let before = store.counter("get_hits").await;
        let got = writer.get(&keys(&ks), BLOCK).await.unwrap();
        assert_eq!(got, data.iter().cloned().map(Some).collect::<Vec<_>>(), "{prefer:?}");
        assert_eq!(writer.metrics().location_hits.load(Ordering::Relaxed), 8, "{prefer:?}");
        assert_eq!(store.counter("get_hits").await, before, "{prefer:?}: no GetReplicas for known blocks");

        // Another client asks the master the first time, not the second.
        let reader = store.client(prefer, 1024);
        assert_eq!(reader.get(&keys(&ks), BLOCK).await.unwrap(), got, "{prefer:?}");
        assert_eq!(reader.metrics().location_hits.load(Ordering::Relaxed), 0, "{prefer:?}");
        assert_eq!(store.counter("get_hits").await, before + 8, "{prefer:?}");
        assert_eq!(reader.get(&keys(&ks), BLOCK).await.unwrap(), got, "{prefer:?}");
        assert_eq!(reader.metrics().location_hits.load(Ordering::Relaxed), 8, "{prefer:?}");
        assert_eq!(store.counter("get_hits").await, before + 8, "{prefer:?}");

        // Reads served from known locations reach the master in batches.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        reader.get(&keys(&ks[..1]), BLOCK).await.unwrap();
        common::wait_for("the touches to reach the master", || async { store.counter("touched").await >= 9 }).await;

        // With the cache off, every read goes through the master.
        let cold = store.client(prefer, 0);
        for _ in 0..2 {
            assert_eq!(cold.get(&keys(&ks), BLOCK).await.unwrap(), got, "{prefer:?}");
        }
        assert_eq!(cold.metrics().location_hits.load(Ordering::Relaxed), 0, "{prefer:?}");
        assert_eq!(store.counter("get_hits").await, before + 24, "{prefer:?}");
        store.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_location_falls_back_to_the_master_and_never_returns_other_bytes() {
    for prefer in TRANSPORTS {
        let store = start_store().await;
        let writer = store.client(prefer, 0);
        let reader = store.client(prefer, 1024);
        let old = block(1, BLOCK);
        writer.put(&[(BlockKey(1), &old)]).await.unwrap();
        assert_eq!(reader.get(&keys(&[1]), BLOCK).await.unwrap(), vec![Some(old.clone())], "{prefer:?}");
        let where_old = store.location(1).await;

        // Removed but not yet written over: the bytes still are block 1's
        // bytes (they match its checksum), and are what the reader gets.
        assert_eq!(writer.remove(&keys(&[1])).await.unwrap(), 1);
        assert_eq!(reader.get(&keys(&[1]), BLOCK).await.unwrap(), vec![Some(old.clone())], "{prefer:?}");
        assert_eq!(reader.metrics().location_hits.load(Ordering::Relaxed), 1, "{prefer:?}");

        // Another block takes the freed range: the reader's known location
        // now holds other bytes. It must miss, not return them.
        let new = block(2, BLOCK);
        writer.put(&[(BlockKey(2), &new)]).await.unwrap();
        assert_eq!(store.location(2).await, where_old, "{prefer:?}: the freed range went to the next put");
        assert_eq!(reader.get(&keys(&[1]), BLOCK).await.unwrap(), vec![None], "{prefer:?}");
        let m = reader.metrics();
        assert_eq!(m.stale_locations.load(Ordering::Relaxed), 1, "{prefer:?}");
        assert_eq!(m.checksum_mismatches.load(Ordering::Relaxed), 0, "{prefer:?}: stale is not corrupt");
        assert_eq!(m.location_hits.load(Ordering::Relaxed), 1, "{prefer:?}");
        assert_eq!(store.counter("bad_replicas").await, 0, "{prefer:?}: nothing reported for a stale location");
        // The stale entry is gone; the new block reads correctly.
        assert_eq!(reader.get(&keys(&[1, 2]), BLOCK).await.unwrap(), vec![None, Some(new)], "{prefer:?}");
        assert_eq!(m.stale_locations.load(Ordering::Relaxed), 1, "{prefer:?}");
        store.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_block_read_into_a_short_buffer_is_a_miss() {
    let store = start_store().await;
    let c = store.client(TransportPreference::Shm, 1024);
    let data = block(5, BLOCK);
    c.put(&[(BlockKey(5), &data)]).await.unwrap();
    let mut short = vec![0u8; BLOCK - 1];
    assert_eq!(c.get_into(&keys(&[5]), &mut [&mut short[..]]).await.unwrap(), vec![None]);
    let mut exact = vec![0u8; BLOCK];
    assert_eq!(c.get_into(&keys(&[5]), &mut [&mut exact[..]]).await.unwrap(), vec![Some(BLOCK)]);
    assert_eq!(exact, data);
    store.stop().await;
}
