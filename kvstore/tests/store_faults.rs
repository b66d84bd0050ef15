//! The store under injected transfer faults: a master and two storage nodes
//! (in this process, real sockets and shared-memory files), and clients whose
//! transports drop, delay, corrupt or are partitioned. Whatever happens, a
//! read returns the written bytes or a miss — never other bytes — and no
//! reservation or lease is left behind.

mod common;

use std::time::{Duration, Instant};

use tandem_kvstore::client::{ClientConfig, PutOutcome, StoreClient};
use tandem_kvstore::master::{self, MasterConfig, MasterHandle};
use tandem_kvstore::node::{self, NodeHandle};
use tandem_kvstore::transport::{FaultConfig, Faults, TransportConfig, TransportPreference};
use tandem_proto::BlockKey;

fn block(key: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key as usize).wrapping_mul(31).wrapping_add(i * 7) as u8).collect()
}

struct Store {
    master: MasterHandle,
    nodes: Vec<NodeHandle>,
    _dir: tempfile::TempDir,
}

async fn start_store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MasterConfig { node_timeout_ms: 2_000, ..common::master_config() };
    let master = master::serve(cfg).await.unwrap();
    let mut nodes = Vec::new();
    for i in 0..2 {
        let cfg = common::storage_config(&format!("n{i}"), &master, dir.path(), 32 << 20, 16 << 20);
        nodes.push(node::start(cfg).await.unwrap());
    }
    let store = Store { master, nodes, _dir: dir };
    let probe = store.client(TransportPreference::Tcp);
    common::wait_for("both nodes to register", || async { probe.stats().await.map_or(0, |s| s.nodes.len()) == 2 })
        .await;
    store
}

impl Store {
    fn client(&self, prefer: TransportPreference) -> StoreClient {
        let cfg = ClientConfig {
            master: self.master.local_addr().to_string(),
            replicas: 2,
            transport: TransportConfig { prefer, ..TransportConfig::default() },
            ..ClientConfig::default()
        };
        StoreClient::new(cfg).unwrap()
    }

    /// Nothing reserved or leased (lease releases are asynchronous: allow them a moment).
    async fn assert_clean(&self) {
        let client = self.client(TransportPreference::Tcp);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let s = client.stats().await.unwrap();
            if (s.pending_puts, s.active_leases) == (0, 0) {
                return;
            }
            assert!(Instant::now() < deadline, "leaked {} reservations, {} leases", s.pending_puts, s.active_leases);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
        self.master.shutdown().await;
    }
}

async fn put_all(c: &StoreClient, keys: &[u64], len: usize) -> Vec<PutOutcome> {
    let data: Vec<Vec<u8>> = keys.iter().map(|k| block(*k, len)).collect();
    let items: Vec<(BlockKey, &[u8])> = keys.iter().zip(&data).map(|(k, d)| (BlockKey(*k), d.as_slice())).collect();
    c.put(&items).await.unwrap()
}

/// Reads keys; panics on any wrong byte; returns how many hit.
async fn read_all(c: &StoreClient, keys: &[u64], len: usize) -> usize {
    let ks: Vec<BlockKey> = keys.iter().map(|k| BlockKey(*k)).collect();
    let got = c.get(&ks, len).await.unwrap();
    let mut hits = 0;
    for (k, g) in keys.iter().zip(got) {
        if let Some(bytes) = g {
            assert!(bytes == block(*k, len), "wrong bytes returned for key {k}");
            hits += 1;
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_reads_are_misses_counted_and_reported() {
    for prefer in [TransportPreference::Tcp, TransportPreference::Shm] {
        let store = start_store().await;
        let keys: Vec<u64> = (1..=8).collect();
        let writer = store.client(prefer);
        assert!(put_all(&writer, &keys, 100_000).await.iter().all(|o| *o == PutOutcome::Stored));
        let faults = Faults::new(11);
        println!("fault seed {}", faults.seed());
        faults.set(FaultConfig { corrupt: 1.0, ..FaultConfig::default() });
        let reader = store.client(prefer).with_faults(faults.clone());
        assert_eq!(read_all(&reader, &keys, 100_000).await, 0, "every copy arrives corrupted: all misses");
        let m = reader.metrics();
        assert_eq!(m.checksum_mismatches.load(std::sync::atomic::Ordering::Relaxed), 16, "2 replicas x 8 keys");
        assert!(faults.stats().corrupted >= 16);
        // Reported replicas are dropped: the blocks are gone, not served corrupt later.
        assert_eq!(writer.longest_prefix(&keys.iter().map(|k| BlockKey(*k)).collect::<Vec<_>>()).await.unwrap(), 0);
        store.assert_clean().await;
        store.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_writes_are_caught_by_the_reader() {
    let store = start_store().await;
    let faults = Faults::new(12);
    faults.set(FaultConfig { corrupt: 1.0, ..FaultConfig::default() });
    let writer = store.client(TransportPreference::Tcp).with_faults(faults);
    put_all(&writer, &[1, 2, 3], 50_000).await;
    let reader = store.client(TransportPreference::Tcp);
    assert_eq!(read_all(&reader, &[1, 2, 3], 50_000).await, 0);
    assert!(reader.metrics().checksum_mismatches.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    store.assert_clean().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_fails_puts_cleanly_and_heals() {
    let store = start_store().await;
    let faults = Faults::new(13);
    let client = store.client(TransportPreference::Tcp).with_faults(faults.clone());
    faults.set(FaultConfig { partition: 1.0, ..FaultConfig::default() });
    let out = put_all(&client, &[1, 2], 10_000).await;
    assert!(out.iter().all(|o| matches!(o, PutOutcome::Failed(_))), "{out:?}");
    store.assert_clean().await; // the failed reservations were revoked
    assert_eq!(read_all(&client, &[1, 2], 10_000).await, 0);
    faults.heal();
    assert!(put_all(&client, &[1, 2], 10_000).await.iter().all(|o| *o == PutOutcome::Stored));
    faults.set(FaultConfig { partition: 1.0, ..FaultConfig::default() });
    assert_eq!(read_all(&client, &[1, 2], 10_000).await, 0, "partitioned reads miss");
    faults.heal();
    assert_eq!(read_all(&client, &[1, 2], 10_000).await, 2);
    store.assert_clean().await;
    store.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_delayed_transfers_fall_back_to_other_replicas() {
    let store = start_store().await;
    let keys: Vec<u64> = (100..140).collect();
    let writer = store.client(TransportPreference::Tcp);
    assert!(put_all(&writer, &keys, 20_000).await.iter().all(|o| *o == PutOutcome::Stored));
    let faults = Faults::new(14);
    faults.set(FaultConfig { drop: 0.5, delay: 0.5, delay_ms: 5, ..FaultConfig::default() });
    let reader = store.client(TransportPreference::Tcp).with_faults(faults.clone());
    let mut hits = 0;
    for _ in 0..5 {
        hits += read_all(&reader, &keys, 20_000).await;
    }
    // A read fails only if both replicas' ops are dropped (p = 0.25 per key per round).
    assert!(hits > 5 * keys.len() / 2, "only {hits} of {} reads hit", 5 * keys.len());
    assert!(faults.stats().dropped > 0 && faults.stats().delayed > 0);
    faults.heal();
    assert_eq!(read_all(&reader, &keys, 20_000).await, keys.len(), "dropped transfers do not lose blocks");
    store.assert_clean().await;
    store.stop().await;
}

/// A staged put written in pieces (as prefill writes one layer at a time):
/// the pieces land at their offsets on every replica, an overrunning or
/// failed piece leaves its block unpublished, and an aborted put leaves no
/// reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_puts_are_written_in_pieces_and_failures_publish_nothing() {
    use tandem_kvstore::checksum::BlockChecksum;
    use tandem_kvstore::client::BlockWrite;
    let store = start_store().await;
    for prefer in [TransportPreference::Shm, TransportPreference::Tcp] {
        let c = store.client(prefer);
        let base = if prefer == TransportPreference::Shm { 500 } else { 600 };
        let (len, layers) = (64 * 1024, 4);
        let keys = [base, base + 1, base + 2];
        let data: Vec<Vec<u8>> = keys.iter().map(|k| block(*k, len)).collect();
        let items: Vec<(BlockKey, u64)> = keys.iter().map(|k| (BlockKey(*k), len as u64)).collect();
        let mut put = c.put_begin(&items).await.unwrap();
        assert!((0..3).all(|i| put.is_writable(i)));
        let piece = len / layers;
        for l in 0..layers {
            let writes: Vec<BlockWrite<'_>> = (0..3)
                .map(|i| BlockWrite {
                    item: i,
                    offset: (l * piece) as u64,
                    bytes: &data[i][l * piece..(l + 1) * piece],
                })
                .collect();
            c.put_write(&mut put, &writes).await;
        }
        // A piece past the end of block 2 fails that block only.
        c.put_write(&mut put, &[BlockWrite { item: 2, offset: (len - 8) as u64, bytes: &[0; 16] }]).await;
        assert!(!put.is_writable(2));
        let sums: Vec<BlockChecksum> = data.iter().map(|d| BlockChecksum::of(d)).collect();
        let outcomes = c.put_commit(put, &sums).await.unwrap();
        assert_eq!(outcomes[..2], [PutOutcome::Stored, PutOutcome::Stored]);
        assert!(matches!(outcomes[2], PutOutcome::Failed(_)), "{:?}", outcomes[2]);
        assert_eq!(read_all(&c, &keys[..2], len).await, 2, "pieces reassemble into the blocks");
        assert_eq!(read_all(&c, &keys[2..], len).await, 0, "the failed block was not published");

        // An abandoned put is given back; so is one committed with the
        // wrong number of checksums.
        let put = c.put_begin(&items[2..]).await.unwrap();
        c.put_abort(put).await.unwrap();
        let put = c.put_begin(&items[2..]).await.unwrap();
        assert!(c.put_commit(put, &[]).await.is_err());
        store.assert_clean().await;
        assert_eq!(read_all(&c, &keys[2..], len).await, 0);
    }
    store.stop().await;
}
