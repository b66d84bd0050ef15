//! Disk faults under a running storage node's SSD tier (a master and one
//! node in this process, real files): a full disk, block writes that fail,
//! and block files damaged on disk. Each block involved is a miss or keeps
//! its DRAM copy, no index entry names bytes that are not there, the node
//! counts what happened, and it keeps serving.
//!
//! The full-disk test mounts a 1 MiB tmpfs (it needs root; without the
//! permission it says so and skips).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_kvstore::client::{ClientConfig, PutOutcome, StoreClient};
use tandem_kvstore::master::{self, MasterConfig, MasterHandle};
use tandem_kvstore::node::{self, NodeHandle, StorageConfig};
use tandem_kvstore::ssd::block_file_name;
use tandem_kvstore::transport::frame::{FrameHeader, Opcode, Status, HEADER_LEN};
use tandem_kvstore::transport::{TransportConfig, TransportPreference};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_client::MasterClient;
use tandem_proto::kvstore::storage_node_client::StorageNodeClient;
use tandem_proto::BlockKey;

const BLOCK: usize = 64 * 1024;
const DRAM: u64 = 2 << 20;

fn block(key: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key as usize).wrapping_mul(97).wrapping_add(i * 13 + i / 509) as u8).collect()
}

struct Store {
    master: MasterHandle,
    node: NodeHandle,
    ssd_dir: PathBuf,
    _shm: tempfile::TempDir,
}

/// A master demoting above `high` DRAM use down to `low`, and one node with
/// 2 MiB of DRAM and an SSD tier of `ssd_bytes` at `ssd_dir`.
async fn start_store(ssd_dir: &Path, ssd_bytes: u64, high: f64, low: f64) -> Store {
    let shm = tempfile::tempdir().unwrap();
    let cfg = MasterConfig {
        node_timeout_ms: 5_000,
        dram_high_watermark: high,
        dram_low_watermark: low,
        // Reads do not move blocks back to DRAM here.
        promote_after_hits: 1_000_000,
        ..common::master_config()
    };
    let master = master::serve(cfg).await.unwrap();
    let cfg = StorageConfig {
        ssd_dir: Some(ssd_dir.to_path_buf()),
        ssd: bytesize::ByteSize::b(ssd_bytes),
        ..common::storage_config("n0", &master, shm.path(), DRAM, DRAM)
    };
    let node = node::start(cfg).await.unwrap();
    let store = Store { master, node, ssd_dir: ssd_dir.to_path_buf(), _shm: shm };
    common::wait_for("the node to register", || async { !store.stats().await.nodes.is_empty() }).await;
    store
}

impl Store {
    /// A client that asks the master for every read: these tests are about
    /// where the master sends it (the SSD tier), not about DRAM ranges the
    /// writer remembers (demoted blocks' old ranges may still hold their
    /// bytes; `known_locations.rs` covers reads from those).
    fn client(&self, prefer: TransportPreference) -> StoreClient {
        let cfg = ClientConfig {
            master: self.master.local_addr().to_string(),
            location_cache_blocks: 0,
            transport: TransportConfig { prefer, ..TransportConfig::default() },
            ..ClientConfig::default()
        };
        StoreClient::new(cfg).unwrap()
    }

    async fn master(&self) -> MasterClient<tonic::transport::Channel> {
        MasterClient::connect(format!("http://{}", self.master.local_addr())).await.unwrap()
    }

    async fn stats(&self) -> pb::StatsReply {
        self.master().await.stats(pb::StatsRequest {}).await.unwrap().into_inner()
    }

    async fn master_counter(&self, name: &str) -> u64 {
        self.stats().await.counters.get(name).copied().unwrap_or(0)
    }

    /// The node's own view: (SSD blocks held, its counters).
    async fn node_stats(&self) -> (u64, std::collections::HashMap<String, u64>) {
        let mut c = StorageNodeClient::connect(format!("http://{}", self.node.control_addr)).await.unwrap();
        let r = c.node_stats(pb::NodeStatsRequest {}).await.unwrap().into_inner();
        let ssd = r.tiers.iter().find(|t| t.tier == pb::Tier::Ssd as i32).map_or(0, |t| t.blocks);
        (ssd, r.counters)
    }

    /// Waits until demotion is over: DRAM use at or below the high
    /// watermark (nothing more is planned), some blocks demoted, and the node
    /// holding exactly the SSD copies the master knows of (nothing in flight).
    async fn wait_settled(&self, high: f64) {
        common::wait_for("demotions to settle", || async {
            let s = self.stats().await;
            let tier = |t: pb::Tier| s.nodes[0].tiers.iter().find(|u| u.tier == t as i32).cloned().unwrap_or_default();
            let (dram, ssd) = (tier(pb::Tier::Dram), tier(pb::Tier::Ssd));
            dram.used as f64 <= high * DRAM as f64 && ssd.blocks > 0 && self.node_stats().await.0 == ssd.blocks
        })
        .await;
    }

    /// Keys whose only copy is on SSD, per the master.
    async fn ssd_only(&self) -> Vec<u64> {
        let keys = self.master().await.list_keys(pb::ListKeysRequest { after: 0, limit: 10_000 }).await.unwrap();
        let ssd = pb::Tier::Ssd as i32;
        let only = keys.into_inner().keys.into_iter().filter(|k| k.replicas.iter().all(|r| r.tier == ssd));
        only.map(|k| k.key).collect()
    }

    fn block_path(&self, key: u64) -> PathBuf {
        self.ssd_dir.join(block_file_name(BlockKey(key)))
    }

    /// The blocks directory holds whole block files only (no temp file or
    /// stray left behind), one per entry the node holds. Demotions may be in
    /// flight: waits for a moment between them, and fails if none comes.
    async fn assert_files_match_entries(&self) {
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.files_vs_entries().await {
                Ok(()) => return,
                Err(why) => last = why,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the SSD tier's files and entries disagree: {last}");
    }

    async fn files_vs_entries(&self) -> Result<(), String> {
        let mut blk = 0;
        for e in std::fs::read_dir(self.ssd_dir.join("blocks")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            if !name.ends_with(".blk") || !e.file_type().unwrap().is_file() {
                return Err(format!("stray {name:?}"));
            }
            let len = e.metadata().unwrap().len();
            if len != BLOCK as u64 {
                return Err(format!("{name} has {len} bytes, not a whole block"));
            }
            blk += 1;
        }
        let held = self.node_stats().await.0;
        if held != blk {
            return Err(format!("{blk} block files, {held} entries"));
        }
        Ok(())
    }

    async fn stop(self) {
        self.node.shutdown().await;
        self.master.shutdown().await;
    }
}

async fn put_keys(c: &StoreClient, keys: impl IntoIterator<Item = u64>) {
    for k in keys {
        let data = block(k, BLOCK);
        assert_eq!(c.put(&[(BlockKey(k), &data)]).await.unwrap(), vec![PutOutcome::Stored], "key {k}");
    }
}

/// Reads keys; panics on any wrong byte; returns the keys that hit.
async fn hits(c: &StoreClient, keys: &[u64]) -> Vec<u64> {
    let ks: Vec<BlockKey> = keys.iter().map(|k| BlockKey(*k)).collect();
    let got = c.get(&ks, BLOCK).await.unwrap();
    let mut out = Vec::new();
    for (k, g) in keys.iter().zip(got) {
        if let Some(bytes) = g {
            assert!(bytes == block(*k, BLOCK), "wrong bytes returned for key {k}");
            out.push(*k);
        }
    }
    out
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    f.sync_all().unwrap();
}

/// Damaged block files are caught by the checksum on every path: the node's
/// data port (the tier drops the entry and counts it) and same-host readers
/// that map the file (the client reports it and the master has the node
/// delete it). Each read is a miss, never bad bytes; the rest is served and
/// the keys can be stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_block_files_read_as_misses_and_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(dir.path(), 64 << 20, 0.3, 0.1).await;
    let tcp = store.client(TransportPreference::Tcp);
    let keys: Vec<u64> = (1..=12).collect();
    put_keys(&tcp, keys.iter().copied()).await;
    store.wait_settled(0.3).await;
    let on_ssd = store.ssd_only().await;
    assert!(on_ssd.len() >= 3, "{on_ssd:?}");
    let (flipped, truncated, mapped) = (on_ssd[0], on_ssd[1], on_ssd[2]);
    flip_byte(&store.block_path(flipped), (BLOCK / 2) as u64);
    std::fs::OpenOptions::new().write(true).open(store.block_path(truncated)).unwrap().set_len(4096).unwrap();
    flip_byte(&store.block_path(mapped), 7);
    let (held, counters) = store.node_stats().await;
    assert_eq!(counters.get("ssd_corrupt_blocks"), Some(&0));

    // Through the node: misses, the entries and files dropped, counted.
    let healthy: Vec<u64> = keys.iter().copied().filter(|k| ![flipped, truncated, mapped].contains(k)).collect();
    assert_eq!(hits(&tcp, &[flipped, truncated]).await, Vec::<u64>::new());
    assert_eq!(hits(&tcp, &healthy).await, healthy, "the node stopped serving the healthy blocks");
    let (now_held, counters) = store.node_stats().await;
    assert_eq!(counters.get("ssd_corrupt_blocks"), Some(&2));
    assert_eq!(now_held, held - 2);
    assert!(!store.block_path(flipped).exists() && !store.block_path(truncated).exists());

    // Through the mapped file: a miss, reported, and the node told to drop it.
    let shm = store.client(TransportPreference::Shm);
    assert_eq!(hits(&shm, &[mapped]).await, Vec::<u64>::new());
    assert_eq!(shm.metrics().checksum_mismatches.load(std::sync::atomic::Ordering::Relaxed), 1);
    common::wait_for("the damaged file to be dropped", || async { store.node_stats().await.0 == held - 3 }).await;
    assert!(!store.block_path(mapped).exists());
    assert!(store.master_counter("bad_replicas").await >= 3);
    let exists = tcp.exists(&[BlockKey(flipped), BlockKey(truncated), BlockKey(mapped)]).await.unwrap();
    assert_eq!(exists, vec![false; 3], "the master still lists damaged blocks");
    store.assert_files_match_entries().await;

    // The node keeps serving: the keys go back in and read right.
    put_keys(&tcp, [flipped, truncated, mapped]).await;
    assert_eq!(hits(&tcp, &keys).await, keys);
    store.stop().await;
}

/// Block writes that fail (a directory where the temp file goes: EISDIR,
/// which root cannot bypass) leave no entry and no file; the blocks keep
/// their DRAM copies and are served from there; once the obstacle is gone
/// the next demotions succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_block_writes_leave_no_entry_and_the_dram_copy_serves() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<u64> = (100..112).collect();
    let blocks = dir.path().join("blocks");
    std::fs::create_dir_all(&blocks).unwrap();
    let temp = |k: u64| dir.path().join(format!("{}.tmp", block_file_name(BlockKey(k))));
    for &k in &keys {
        std::fs::create_dir(temp(k)).unwrap();
    }
    let store = start_store(dir.path(), 64 << 20, 0.3, 0.1).await;
    let tcp = store.client(TransportPreference::Tcp);
    put_keys(&tcp, keys.iter().copied()).await;
    common::wait_for("failed demotions", || async { store.master_counter("demotions_failed").await >= 3 }).await;
    let (held, counters) = store.node_stats().await;
    assert_eq!(held, 0);
    assert!(counters.get("ssd_write_failures").is_some_and(|n| *n >= 3), "{counters:?}");
    assert!(store.ssd_only().await.is_empty());
    for &k in &keys {
        assert!(!store.block_path(k).exists(), "a failed write left a block file for {k}");
    }
    assert_eq!(hits(&tcp, &keys).await, keys, "blocks whose demotion failed must still be served");

    for &k in &keys {
        std::fs::remove_dir(temp(k)).unwrap();
    }
    common::wait_for("demotions to succeed", || async { store.ssd_only().await.len() >= 6 }).await;
    store.assert_files_match_entries().await;
    assert_eq!(hits(&tcp, &keys).await, keys);
    store.stop().await;
}

/// A tmpfs mounted for one test and unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Option<Mount> {
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Some(Mount(at.to_path_buf())),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An SSD tier configured larger than its filesystem: demotions that hit
/// ENOSPC fail cleanly (counted by the node and the master, nothing half
/// written left), the blocks keep their DRAM copies until evicted (a miss
/// then, never bad bytes), and the node keeps taking and serving puts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_demotions_cleanly_and_dram_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mount) = Mount::tmpfs(dir.path(), "1m") else { return };
    let store = start_store(dir.path(), 64 << 20, 0.5, 0.2).await;
    let tcp = store.client(TransportPreference::Tcp);
    // DRAM demotes to SSD as it fills; 1 MiB of disk holds ~15 blocks.
    let failures = || async { store.node_stats().await.1.get("ssd_write_failures").copied().unwrap_or(0) };
    let mut first = Vec::new();
    for k in 200..400 {
        put_keys(&tcp, [k]).await;
        first.push(k);
        if failures().await > 0 {
            break;
        }
    }
    common::wait_for("a demotion to hit the full disk", || async { failures().await > 0 }).await;
    let (held, counters) = store.node_stats().await;
    assert!(counters.get("ssd_disk_full").is_some_and(|n| *n > 0), "{counters:?}");
    common::wait_for("the master to hear of it", || async { store.master_counter("demotions_failed").await > 0 }).await;
    assert!(held < 16, "more blocks than fit on the disk: {held}");
    store.assert_files_match_entries().await;
    // What is still stored reads right (hits() checks every byte).
    assert!(!hits(&tcp, &first).await.is_empty());

    // More puts than DRAM holds: the node keeps taking them, evicting what
    // could not be demoted; those reads are misses, never bad bytes.
    let more: Vec<u64> = (1000..1040).collect();
    for &k in &more {
        put_keys(&tcp, [k]).await;
        assert_eq!(hits(&tcp, &[k]).await, [k], "a block just stored must be served");
    }
    // The full disk is not hammered: demotions to it back off (a tick is
    // 20 ms; retrying every tick failed ~1300 block writes a second here).
    let before = failures().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let in_a_second = failures().await - before;
    assert!(in_a_second <= 3 * (DRAM / BLOCK as u64), "{in_a_second} failed block writes in a second");
    let all: Vec<u64> = first.iter().chain(&more).copied().collect();
    let served = hits(&tcp, &all).await.len();
    assert!(served < all.len(), "{served} of {} blocks held in 2 MiB of DRAM and a full 1 MiB disk", all.len());
    store.assert_files_match_entries().await;
    store.stop().await;
    drop(mount);
}

/// Sends one request frame over a raw data connection and returns the
/// reply's header.
fn raw_request(addr: std::net::SocketAddr, h: &FrameHeader) -> FrameHeader {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&h.encode()).unwrap();
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw).unwrap();
    FrameHeader::decode(&raw).expect("a well-formed reply")
}

/// A raw SSD read must name a block the node holds at its stored length:
/// anything else is a miss, answered before the node sets aside the
/// requested length (a client could otherwise have it allocate up to the
/// frame limit per request for blocks that do not exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssd_reads_of_absent_blocks_or_wrong_lengths_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(dir.path(), 64 << 20, 0.3, 0.1).await;
    let tcp = store.client(TransportPreference::Tcp);
    put_keys(&tcp, 200..212).await;
    store.wait_settled(0.3).await;
    let key = store.ssd_only().await[0];
    let read = |key: u64, len: u64| {
        let mut h = FrameHeader::new(Opcode::ReadSsd, 7);
        (h.count, h.offset, h.len) = (1, key, len);
        h
    };
    let addr = store.node.peer.data_addr;
    let ok = raw_request(addr, &read(key, BLOCK as u64));
    assert_eq!((ok.op(), ok.payload_len), (Some(Opcode::Data), BLOCK as u64), "{ok:?}");
    for (key, len) in [(key, BLOCK as u64 + 1), (key, 1), (0xdead_beef, 64 << 20)] {
        let r = raw_request(addr, &read(key, len));
        assert_eq!((r.op(), r.status), (Some(Opcode::Error), Status::NotFound as u16), "key {key:x} len {len}: {r:?}");
    }
    assert_eq!(hits(&tcp, &[key]).await, vec![key], "the node still serves the block");
}
