//! The KV store as users run it: a master and two storage nodes, each its
//! own `tandem kvstore …` process on loopback, driven through the client
//! library and the admin CLI. Nodes are killed with SIGKILL and restarted.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_kvstore::client::{ClientConfig, PutOutcome, StoreClient};
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;

mod common;
use common::{spawn_until, tandem, Proc};

const MIB: usize = 1 << 20;

/// Deterministic contents of block `key` (so any wrong byte is caught).
fn block(key: u64, len: usize) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Cluster {
    dir: tempfile::TempDir,
    master_addr: String,
    master: Option<Proc>,
    nodes: Vec<Option<Proc>>,
}

impl Cluster {
    /// Master (persisted metadata) + `nodes` storage nodes with `dram` each
    /// and an SSD tier of `ssd` bytes (0 = none).
    fn start(nodes: usize, dram: &str, ssd: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster { dir, master_addr: String::new(), master: None, nodes: Vec::new() };
        c.write_config("127.0.0.1:0", nodes, dram, ssd);
        c.start_master();
        // Nodes must know the master's real port: rewrite the file with it.
        let addr = c.master_addr.clone();
        c.write_config(&addr, nodes, dram, ssd);
        for i in 0..nodes {
            c.nodes.push(None);
            c.start_node(i);
        }
        c.wait_nodes(nodes);
        c
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("cluster.toml")
    }

    fn write_config(&self, master: &str, nodes: usize, dram: &str, ssd: &str) {
        let d = self.dir.path();
        let mut text = format!(
            "[kvstore.master]\nlisten = \"{master}\"\nmetadata_dir = \"{}\"\nheartbeat_interval_ms = 100\n\
             node_timeout_ms = 1500\ntick_ms = 20\nlease_ms = 3000\nput_timeout_ms = 2000\n",
            d.join("meta").display()
        );
        for i in 0..nodes {
            text += &format!(
                "\n[[kvstore.storage]]\nname = \"store-{i}\"\nlisten = \"127.0.0.1:0\"\ndata_listen = \"127.0.0.1:0\"\n\
                 dram = \"{dram}\"\nshm_dir = \"{}\"\n",
                d.display()
            );
            if ssd != "0" {
                text += &format!("ssd = \"{ssd}\"\nssd_dir = \"{}\"\n", d.join(format!("ssd-{i}")).display());
            }
        }
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn start_master(&mut self) {
        let mut cmd = tandem();
        cmd.args(["kvstore", "master", "--config"]).arg(self.config_path());
        let (p, line) = spawn_until(cmd, "master", "kvstore master listening on");
        self.master_addr = line.rsplit(' ').next().unwrap().trim().to_owned();
        self.master = Some(p);
    }

    fn start_node(&mut self, i: usize) {
        let mut cmd = tandem();
        cmd.args(["kvstore", "storage", "--config"]).arg(self.config_path()).args(["--node", &format!("store-{i}")]);
        let (p, _) = spawn_until(cmd, &format!("store-{i}"), "listening: control");
        self.nodes[i] = Some(p);
    }

    fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].take() {
            p.kill9();
        }
    }

    fn client(&self, replicas: u32) -> StoreClient {
        StoreClient::new(ClientConfig { master: self.master_addr.clone(), replicas, ..ClientConfig::default() })
            .unwrap()
    }

    /// The master's stats (callable from inside or outside a runtime).
    fn stats(&self) -> pb::StatsReply {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async { self.client(0).stats().await.unwrap() })
            })
            .join()
            .unwrap()
        })
    }

    /// Waits until the master lists exactly `n` live nodes.
    fn wait_nodes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let live = self.stats().nodes.len();
            if live == n {
                return;
            }
            assert!(Instant::now() < deadline, "expected {n} live nodes, master lists {live}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nothing left reserved or leased at the master.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats();
            if s.pending_puts == 0 && s.active_leases == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "leaked: {} pending puts, {} leases", s.pending_puts, s.active_leases);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn keys(range: std::ops::Range<u64>) -> Vec<BlockKey> {
    range.map(BlockKey).collect()
}

async fn put_blocks(client: &StoreClient, keys: &[BlockKey], len: usize) -> Vec<PutOutcome> {
    let data: Vec<Vec<u8>> = keys.iter().map(|k| block(k.0, len)).collect();
    let items: Vec<(BlockKey, &[u8])> = keys.iter().zip(&data).map(|(k, d)| (*k, d.as_slice())).collect();
    client.put(&items).await.unwrap()
}

/// Reads `keys`; asserts every hit has exactly the written bytes; returns the hit count.
async fn check_blocks(client: &StoreClient, keys: &[BlockKey], len: usize) -> usize {
    let got = client.get(keys, len).await.unwrap();
    let mut hits = 0;
    for (k, g) in keys.iter().zip(got) {
        if let Some(bytes) = g {
            assert!(bytes == block(k.0, len), "wrong bytes for key {:x}", k.0);
            hits += 1;
        }
    }
    hits
}

#[test]
fn round_trips_bad_input_and_leases_on_a_three_process_cluster() {
    let cluster = Cluster::start(2, "8MiB", "0");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = cluster.client(0);
        for len in [1, 4096, 64 * 1024 + 7, 256 * 1024, 2 * MIB] {
            let ks = keys(len as u64 * 1000..len as u64 * 1000 + 2);
            assert!(put_blocks(&client, &ks, len).await.iter().all(|o| *o == PutOutcome::Stored));
            assert_eq!(check_blocks(&client, &ks, len).await, 2, "len {len}");
        }
        // Writing again is a no-op; unknown keys miss; prefix lookups count.
        let again = put_blocks(&client, &keys(1000..1001), 1).await;
        assert_eq!(again, vec![PutOutcome::Existed]);
        assert_eq!(check_blocks(&client, &keys(5..9), 16).await, 0);
        assert_eq!(client.longest_prefix(&[BlockKey(1000), BlockKey(1001), BlockKey(5)]).await.unwrap(), 2);
        // A block larger than any segment is refused per key, and nothing leaks.
        let big = vec![0u8; 9 * MIB];
        let out = client.put(&[(BlockKey(77), &big)]).await.unwrap();
        assert!(matches!(&out[0], PutOutcome::Failed(why) if why.contains("larger")), "{out:?}");
        // A buffer too small for the block is a miss, not a truncated read.
        let mut small = [0u8; 10];
        assert_eq!(client.get_into(&[BlockKey(2_000_000)], &mut [&mut small[..]]).await.unwrap(), vec![None]);
        cluster.assert_clean();

        // Garbage on a node's data port: the node drops that connection and keeps serving.
        let nodes = client.master().list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
        for n in &nodes {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut junk = tokio::net::TcpStream::connect(&n.data_addr).await.unwrap();
            let garbage: Vec<u8> = block(0xbad, 256 * 1024);
            let _ = junk.write_all(&garbage).await;
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(5), junk.read(&mut buf)).await;
        }
        let tcp_client = StoreClient::new(ClientConfig {
            master: cluster.master_addr.clone(),
            transport: tandem_kvstore::transport::TransportConfig {
                prefer: tandem_kvstore::transport::TransportPreference::Tcp,
                ..Default::default()
            },
            ..ClientConfig::default()
        })
        .unwrap();
        let ks = keys(256 * 1024 * 1000..256 * 1024 * 1000 + 2);
        assert_eq!(check_blocks(&tcp_client, &ks, 256 * 1024).await, 2, "nodes still serve over tcp");

        // Leases hold off eviction: lease one block, then overfill the store.
        let mut master = client.master();
        let leased = master
            .get_replicas(pb::GetReplicasRequest { keys: vec![1000], lease_ms: 60_000 })
            .await
            .unwrap()
            .into_inner();
        assert!(leased.entries[0].found);
        for round in 0..4u64 {
            put_blocks(&client, &keys(10_000 + round * 8..10_000 + round * 8 + 8), MIB).await;
        }
        assert!(client.exists(&[BlockKey(1000)]).await.unwrap()[0], "the leased block was evicted");
        master.release_lease(pb::ReleaseLeaseRequest { lease_id: leased.lease_id }).await.unwrap();
        cluster.assert_clean();
    });
}

#[test]
fn demotion_to_ssd_and_promotion_keep_bytes_intact_and_ssd_survives_a_restart() {
    let mut cluster = Cluster::start(1, "8MiB", "64MiB");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ks = keys(1..25);
    rt.block_on(async {
        let client = cluster.client(0);
        // Written at a pace the demotion keeps up with (a burst faster than
        // that evicts instead, as any cache must): 12 MiB into 8 MiB of DRAM.
        for chunk in ks.chunks(2) {
            assert!(put_blocks(&client, chunk, 512 * 1024).await.iter().all(|o| *o == PutOutcome::Stored));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = client.stats().await.unwrap();
                let dram = s.nodes[0].tiers.iter().find(|t| t.tier == pb::Tier::Dram as i32).unwrap();
                if dram.used * 10 <= dram.capacity * 9 {
                    break;
                }
                assert!(Instant::now() < deadline, "DRAM stayed above the high watermark: {s:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let s = client.stats().await.unwrap();
        assert!(s.counters.get("demotions").copied().unwrap_or(0) >= 8, "{:?}", s.counters);
        let hits = check_blocks(&client, &ks, 512 * 1024).await;
        assert_eq!(hits, ks.len(), "every block survives in DRAM or on SSD");
        // Read SSD-resident blocks twice more: they are promoted back.
        check_blocks(&client, &ks, 512 * 1024).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = client.stats().await.unwrap();
        assert!(s.counters.get("promotions").copied().unwrap_or(0) > 0, "no promotion: {:?}", s.counters);
        assert_eq!(check_blocks(&client, &ks, 512 * 1024).await, hits);
    });
    cluster.assert_clean();
    // kill -9 the node and start it again: its SSD tier comes back.
    let on_ssd = {
        let s = cluster.stats();
        s.nodes[0].tiers.iter().find(|t| t.tier == pb::Tier::Ssd as i32).map_or(0, |t| t.blocks)
    };
    assert!(on_ssd > 0);
    cluster.kill_node(0);
    cluster.wait_nodes(0);
    cluster.start_node(0);
    cluster.wait_nodes(1);
    rt.block_on(async {
        let client = cluster.client(0);
        let hits = check_blocks(&client, &ks, 512 * 1024).await;
        assert!(hits as u64 >= on_ssd, "{hits} blocks readable after restart, {on_ssd} were on SSD");
    });
}

#[test]
fn a_killed_node_costs_no_wrong_bytes_and_a_restarted_master_keeps_metadata() {
    let mut cluster = Cluster::start(2, "32MiB", "0");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ks = keys(100..116);
    let len = MIB;
    rt.block_on(async {
        let client = cluster.client(2);
        assert!(put_blocks(&client, &ks, len).await.iter().all(|o| *o == PutOutcome::Stored));
        assert_eq!(check_blocks(&client, &ks, len).await, ks.len());
    });
    // Readers run while one node dies mid-stream.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let master = cluster.master_addr.clone();
        let ks = ks.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let client = StoreClient::new(ClientConfig { master, ..ClientConfig::default() }).unwrap();
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Errors are allowed; wrong bytes are not (check_blocks asserts).
                    if let Ok(got) = client.get(&ks, len).await {
                        for (k, g) in ks.iter().zip(got) {
                            if let Some(bytes) = g {
                                assert!(bytes == block(k.0, len), "wrong bytes for key {:x}", k.0);
                            }
                        }
                    }
                    reads += 1;
                }
                reads
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    cluster.kill_node(1);
    cluster.wait_nodes(1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().expect("reader saw wrong bytes");
    assert!(reads > 0);
    rt.block_on(async {
        let client = cluster.client(0);
        assert_eq!(check_blocks(&client, &ks, len).await, ks.len(), "every block had a replica on the survivor");
        let s = client.stats().await.unwrap();
        assert_eq!(s.nodes.len(), 1);
        assert!(s.counters.get("nodes_dropped").copied().unwrap_or(0) >= 1);
    });
    // kill -9 the master and start it again from its metadata store.
    if let Some(mut m) = cluster.master.take() {
        m.kill9();
    }
    let addr = cluster.master_addr.clone();
    let config = cluster.config_path();
    let mut cmd = tandem();
    cmd.args(["kvstore", "master", "--config"]).arg(&config);
    let (p, line) = spawn_until(cmd, "master", "kvstore master listening on");
    assert!(line.ends_with(&addr), "the master came back on {line}, expected {addr}");
    cluster.master = Some(p);
    cluster.wait_nodes(1);
    rt.block_on(async {
        let client = cluster.client(0);
        assert_eq!(client.longest_prefix(&ks).await.unwrap(), ks.len(), "metadata survived the restart");
        assert_eq!(check_blocks(&client, &ks, len).await, ks.len());
    });
    cluster.assert_clean();
}

#[test]
fn admin_cli_reports_usage_nodes_and_keys() {
    let cluster = Cluster::start(1, "8MiB", "0");
    let file = cluster.dir.path().join("blob");
    std::fs::write(&file, block(9, 5000)).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["kvstore"])
            .args(args)
            .args(["--master", &cluster.master_addr])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = run(&["put", "--key", "abc", "--file", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let out_file = cluster.dir.path().join("out");
    let (ok, _, err) = run(&["get", "--key", "0xabc", "--out", out_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&out_file).unwrap(), block(9, 5000));
    let (ok, _, err) = run(&["get", "--key", "def"]);
    assert!(!ok && err.contains("not in the store"), "{err}");
    let (ok, _, err) = run(&["get", "--key", "xyz"]);
    assert!(!ok && err.contains("hex key"), "{err}");
    let (ok, out, _) = run(&["stats"]);
    assert!(ok && out.contains("store-0") && out.contains("dram") && out.contains("objects 1"), "{out}");
    let (ok, out, _) = run(&["keys"]);
    assert!(ok && out.contains("0000000000000abc") && out.contains("store-0:dram"), "{out}");
    let (ok, out, _) = run(&["nodes", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && v[0]["name"] == "store-0");
    // A config with a typo is a clear error naming the field.
    let bad = cluster.dir.path().join("bad.toml");
    std::fs::write(&bad, "[kvstore.master]\nlisten_adr = \"127.0.0.1:1\"\n").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_tandem")).args(["kvstore", "master", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_adr"));
}

#[test]
fn example_cluster_files_parse_and_validate() {
    let etc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc");
    let mut seen = 0;
    for entry in std::fs::read_dir(&etc).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = tandem_conductor::cli::cluster::ClusterConfig::load(&path)
                .unwrap_or_else(|e| panic!("{} does not load: {e:#}", path.display()));
            assert!(!cfg.kvstore.storage.is_empty(), "{} names no storage node", path.display());
            assert!(!cfg.prefill.is_empty() && !cfg.decode.is_empty(), "{} names no workers", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 1, "no example configs in etc/");
}
