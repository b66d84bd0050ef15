//! Network faults between a store client and storage nodes running as their
//! own `tandem kvstore` processes:
//!
//! - the fault-injecting transport (partitions, slow links, dropped ops,
//!   corrupted bytes) in an in-process client, seeded (`TANDEM_FAULT_SEED`);
//! - a TCP proxy that forwards part of a frame and then resets the
//!   connection, in each direction;
//! - where the test may create them, a network namespace joined by a veth
//!   pair: a real slow link (`tc … tbf`) and a real partition (link down)
//!   between this process and a storage node's tcp data port.
//!
//! Whatever the fault: every read is the written bytes or a miss, every
//! call returns within its bound, and the store's reservations and leases
//! return to zero.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_kvstore::client::{ClientConfig, PutOutcome, StoreClient};
use tandem_kvstore::transport::{
    FaultConfig, Faults, ReadOp, TcpConfig, TcpTransport, Transport, TransportConfig, TransportPreference,
};
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;

mod common;
use common::procs::{ProcCluster, Shape};

/// Deterministic contents of block `key`.
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

fn tcp_client(master: &str, replicas: u32) -> StoreClient {
    let transport = TransportConfig {
        prefer: TransportPreference::Tcp,
        tcp: TcpConfig { op_timeout_ms: 3_000, connect_timeout_ms: 1_000, ..TcpConfig::default() },
        ..TransportConfig::default()
    };
    StoreClient::new(ClientConfig {
        master: master.into(),
        replicas,
        rpc_timeout_ms: 5_000,
        transport,
        ..ClientConfig::default()
    })
    .unwrap()
}

fn store_only(storage: usize) -> ProcCluster {
    ProcCluster::start(&Shape {
        storage,
        prefill: 0,
        decode: 0,
        conductor_extra: String::new(),
        master_extra: "put_timeout_ms = 2000\nlease_ms = 2000".into(),
    })
}

async fn put(client: &StoreClient, keys: &[u64], len: usize) -> Vec<PutOutcome> {
    let data: Vec<Vec<u8>> = keys.iter().map(|&k| block(k, len)).collect();
    let items: Vec<(BlockKey, &[u8])> = keys.iter().zip(&data).map(|(&k, d)| (BlockKey(k), d.as_slice())).collect();
    client.put(&items).await.expect("the master answers")
}

/// Reads `keys`; every hit must be exactly the written bytes. Returns hits.
async fn check(client: &StoreClient, keys: &[u64], len: usize) -> usize {
    let ks: Vec<BlockKey> = keys.iter().map(|&k| BlockKey(k)).collect();
    let got = client.get(&ks, len).await.expect("the master answers");
    let mut hits = 0;
    for (&k, g) in keys.iter().zip(got) {
        if let Some(bytes) = g {
            assert!(bytes == block(k, len), "wrong bytes for key {k:x}");
            hits += 1;
        }
    }
    hits
}

/// Waits until the master holds no reservation and no lease.
async fn assert_clean(client: &StoreClient) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = client.stats().await.unwrap();
        if s.pending_puts == 0 && s.active_leases == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "leaked: {} pending puts, {} leases", s.pending_puts, s.active_leases);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_fault_injecting_transport_yields_misses_and_errors_never_wrong_bytes() {
    let c = store_only(2);
    let faults = Faults::from_env_or_random();
    let seed = faults.seed();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let client = tcp_client(&c.master_addr, 2).with_faults(faults.clone());
    const LEN: usize = 64 * 1024;
    rt.block_on(async {
        let mut written: Vec<u64> = Vec::new();
        let phases: [(&str, FaultConfig); 5] = [
            ("clean", FaultConfig::default()),
            ("partitioned", FaultConfig { partition: 1.0, ..FaultConfig::default() }),
            ("slow link", FaultConfig { delay: 1.0, delay_ms: 150, ..FaultConfig::default() }),
            ("dropped ops", FaultConfig { drop: 0.3, ..FaultConfig::default() }),
            ("corrupted bytes", FaultConfig { corrupt: 0.2, ..FaultConfig::default() }),
        ];
        for (p, (name, cfg)) in phases.into_iter().enumerate() {
            faults.set(cfg);
            let keys: Vec<u64> = (0..24).map(|i| 0x1000 * (p as u64 + 1) + i).collect();
            let t = Instant::now();
            let outcomes = put(&client, &keys, LEN).await;
            let stored = outcomes.iter().filter(|o| **o == PutOutcome::Stored).count();
            let hits_new = check(&client, &keys, LEN).await;
            let hits_all = check(&client, &written, LEN).await;
            eprintln!(
                "seed {seed} {name:>15}: {stored}/24 stored, {hits_new}/24 read back, {hits_all}/{} older blocks, {:.0?}",
                written.len(),
                t.elapsed()
            );
            assert!(t.elapsed() < Duration::from_secs(20), "seed {seed} {name}: a call did not return in its bound");
            match name {
                "clean" | "slow link" => {
                    assert_eq!((stored, hits_new), (24, 24), "seed {seed} {name}");
                    assert_eq!(hits_all, written.len(), "seed {seed} {name}");
                }
                "partitioned" => {
                    assert_eq!((stored, hits_new, hits_all), (0, 0, 0), "seed {seed}: bytes crossed a partition");
                    assert!(outcomes.iter().all(|o| matches!(o, PutOutcome::Failed(_))), "{outcomes:?}");
                }
                // Dropped or corrupted ops: each block is stored and read
                // or not, never wrong (`check` asserts the bytes).
                _ => assert!(stored > 0, "seed {seed} {name}: nothing stored at these rates"),
            }
            written.extend(keys.iter().zip(&outcomes).filter(|(_, o)| **o == PutOutcome::Stored).map(|(k, _)| *k));
        }
        let stats = faults.stats();
        eprintln!("seed {seed}: injected {stats:?}; client saw {} checksum mismatches", {
            client.metrics().checksum_mismatches.load(std::sync::atomic::Ordering::Relaxed)
        });
        assert!(stats.partitioned > 0 && stats.dropped > 0 && stats.corrupted > 0 && stats.delayed > 0, "{stats:?}");
        faults.heal();
        assert_clean(&client).await;
    });
    // A fault-free reader: corrupted copies written under a good checksum
    // are caught (and reported, so the master drops them); a second pass
    // meets none.
    let (listed, read, first) = c.read_back_all_blocks();
    eprintln!("seed {seed}: {listed} blocks listed, {read} read back, {first} bad copies caught");
    let (_, read2, second) = c.read_back_all_blocks();
    assert_eq!(second, 0, "seed {seed}: the store still holds blocks whose checksum fails");
    assert!(read2 > 0 && read2 <= listed);
}

/// A one-connection-at-a-time proxy to `upstream` that forwards
/// `to_server` bytes client→server and `to_client` bytes server→client,
/// then resets both connections (RST, not FIN).
fn resetting_proxy(upstream: SocketAddr, to_server: usize, to_client: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for down in l.incoming().map_while(Result::ok) {
            let Ok(up) = TcpStream::connect(upstream) else { continue };
            let pipe = |mut from: TcpStream, mut to: TcpStream, limit: usize| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut sent = 0;
                    while sent < limit {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min(limit - sent),
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                    }
                    reset(&from);
                    reset(&to);
                })
            };
            pipe(down.try_clone().unwrap(), up.try_clone().unwrap(), to_server);
            pipe(up, down, to_client);
        }
    });
    addr
}

/// Closes a socket with RST: SO_LINGER on with a zero timeout, then close.
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own, with a valid `linger` of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[test]
fn a_connection_reset_mid_frame_fails_the_batch_cleanly_and_the_node_keeps_serving() {
    let c = store_only(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let client = tcp_client(&c.master_addr, 1);
    const LEN: usize = 256 * 1024;
    rt.block_on(async {
        let keys: Vec<u64> = (1..=8).collect();
        assert!(put(&client, &keys, LEN).await.iter().all(|o| *o == PutOutcome::Stored));
        let nodes = client.master().list_nodes(pb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
        let data: SocketAddr = nodes[0].data_addr.parse().unwrap();
        let listed = client.master().list_keys(pb::ListKeysRequest { after: 0, limit: 100 }).await.unwrap();
        let locations: Vec<_> = listed
            .into_inner()
            .keys
            .into_iter()
            .map(|k| {
                let r = tandem_kvstore::wire::replica_from_pb(BlockKey(k.key), k.replicas[0].clone()).unwrap();
                (k.key, r.location)
            })
            .collect();
        let read_via = |addr: SocketAddr| {
            let locations = locations.clone();
            async move {
                let cfg = TcpConfig { stripes: 1, op_timeout_ms: 3_000, ..TcpConfig::default() };
                let t: Arc<dyn Transport> = Arc::new(TcpTransport::new(addr, cfg));
                let mut bufs: Vec<Vec<u8>> = locations.iter().map(|_| vec![0u8; LEN]).collect();
                let mut ops: Vec<ReadOp<'_>> =
                    locations.iter().zip(bufs.iter_mut()).map(|((_, src), dst)| ReadOp::new(*src, dst)).collect();
                let start = Instant::now();
                let results = t.read(&mut ops).await;
                let took = start.elapsed();
                let good = results
                    .iter()
                    .zip(&locations)
                    .zip(&bufs)
                    .filter(|((r, (k, _)), b)| r.is_ok() && **b == block(*k, LEN))
                    .count();
                let wrong = results
                    .iter()
                    .zip(&locations)
                    .zip(&bufs)
                    .filter(|((r, (k, _)), b)| r.is_ok() && **b != block(*k, LEN))
                    .count();
                let errors: Vec<String> =
                    results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
                (good, wrong, errors, took)
            }
        };
        // Reset in the middle of the request frame (client → node), then in
        // the middle of a 256 KiB reply frame (node → client).
        for (what, to_server, to_client) in [("request", 20, usize::MAX), ("reply", usize::MAX, 100_000)] {
            let proxy = resetting_proxy(data, to_server, to_client);
            let (good, wrong, errors, took) = read_via(proxy).await;
            eprintln!(
                "reset mid-{what}: {good} good, {wrong} wrong, {} failed in {took:.0?}: {:?}",
                errors.len(),
                errors.first()
            );
            assert_eq!(wrong, 0, "a reset mid-{what} handed back wrong bytes as a success");
            assert!(!errors.is_empty(), "the reset mid-{what} went unnoticed");
            assert!(took < Duration::from_secs(10), "the reset mid-{what} was not noticed within the op timeout");
        }
        // The node is unharmed: a direct connection reads everything, and
        // the client's own path does too.
        let (good, wrong, errors, _) = read_via(data).await;
        assert_eq!((good, wrong, errors.len()), (8, 0, 0), "{errors:?}");
        assert_eq!(check(&client, &keys, LEN).await, 8);
        assert_clean(&client).await;
    });
}

/// A network namespace joined to this one by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let id = std::process::id();
        let net = 16 + id % 200;
        let n = Netns {
            name: format!("tandem-nf-{id}"),
            host_if: format!("tnf{id}h"),
            ns_if: format!("tnf{id}n"),
            host_ip: format!("10.231.{net}.1"),
            ns_ip: format!("10.231.{net}.2"),
        };
        sh(&["ip", "netns", "add", &n.name])?;
        let ns = |cmd: &[&str]| {
            let mut a = vec!["ip", "netns", "exec", &n.name];
            a.extend_from_slice(cmd);
            sh(&a)
        };
        sh(&["ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if])?;
        sh(&["ip", "link", "set", &n.ns_if, "netns", &n.name])?;
        sh(&["ip", "addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_if])?;
        sh(&["ip", "link", "set", &n.host_if, "up"])?;
        ns(&["ip", "addr", "add", &format!("{}/24", n.ns_ip), "dev", &n.ns_if])?;
        ns(&["ip", "link", "set", &n.ns_if, "up"])?;
        ns(&["ip", "link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// `tc qdisc` on both ends (each shapes what it sends).
    fn shape(&self, args: &[&str]) -> Result<(), String> {
        let mut host = vec!["tc", "qdisc", "replace", "dev", &self.host_if, "root"];
        host.extend_from_slice(args);
        sh(&host)?;
        let mut ns = vec!["ip", "netns", "exec", &self.name, "tc", "qdisc", "replace", "dev", &self.ns_if, "root"];
        ns.extend_from_slice(args);
        sh(&ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours.
        let _ = sh(&["ip", "netns", "delete", &self.name]);
        let _ = sh(&["ip", "link", "delete", &self.host_if]);
    }
}

#[test]
fn a_real_slow_link_and_partition_to_a_storage_node_in_another_network_namespace() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot create a network namespace with a veth pair here ({e}); \
                 the fault-injecting transport test covers partitions and slow links instead"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let port = common::http::free_ports(3);
    let master = format!("{}:{}", ns.host_ip, port[0]);
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            "[kvstore.master]\nlisten = \"{master}\"\nheartbeat_interval_ms = 100\nnode_timeout_ms = 1500\n\
             tick_ms = 20\nput_timeout_ms = 2000\nlease_ms = 2000\n\n\
             [[kvstore.storage]]\nname = \"store-0\"\nlisten = \"{ip}:{}\"\ndata_listen = \"{ip}:{}\"\n\
             dram = \"64MiB\"\nsegment_size = \"64MiB\"\nshm_dir = \"{}\"\n",
            port[1],
            port[2],
            dir.path().display(),
            ip = ns.ns_ip
        ),
    )
    .unwrap();
    let mut cmd = common::tandem();
    cmd.args(["kvstore", "master", "--config"]).arg(&config);
    let _master = common::spawn_until(cmd, "master", "kvstore master listening on").0;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_tandem"), "kvstore", "storage", "--node", "store-0"]);
    cmd.arg("--config").arg(&config).env("TANDEM_LOG", "info").stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::piped());
    let _node = common::spawn_until(cmd, "store-0", "listening: control").0;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let client = tcp_client(&master, 1);
    const LEN: usize = 256 * 1024;
    rt.block_on(async {
        let registered = || async { client.stats().await.map(|s| s.nodes.len()).unwrap_or(0) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while registered().await != 1 {
            assert!(Instant::now() < deadline, "the storage node in the namespace did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let keys: Vec<u64> = (1..=16).collect();
        let t = Instant::now();
        assert!(put(&client, &keys, LEN).await.iter().all(|o| *o == PutOutcome::Stored));
        assert_eq!(check(&client, &keys, LEN).await, 16);
        let fast = t.elapsed();

        // A slow link: 16 Mbit/s each way. Reading 4 MiB cannot take less
        // than 2 s through it; it must still arrive intact.
        ns.shape(&["tbf", "rate", "16mbit", "burst", "32kb", "latency", "400ms"]).expect("tc tbf");
        let t = Instant::now();
        assert_eq!(check(&client, &keys, LEN).await, 16, "reads over the slow link");
        let slow = t.elapsed();
        eprintln!("4 MiB put+read on the veth: {fast:.0?}; read through tbf 16mbit: {slow:.0?}");
        assert!(slow >= Duration::from_millis(1_600), "the tbf qdisc did not shape the link ({slow:?})");
        ns.shape(&["pfifo_fast"]).ok();

        // A partition: the host end goes down. Reads miss and puts fail
        // within their bounds; no bytes are claimed.
        sh(&["ip", "link", "set", &ns.host_if, "down"]).expect("link down");
        let t = Instant::now();
        let hits = check(&client, &keys, LEN).await;
        let outcomes = put(&client, &[100, 101], LEN).await;
        let took = t.elapsed();
        eprintln!("partitioned: {hits} hits, puts {outcomes:?} in {took:.0?}");
        assert_eq!(hits, 0, "bytes crossed a downed link");
        // Failed, and for the right reason: a node cut off is no space
        // (retry later), never a block "too large" for the store.
        assert!(
            outcomes.iter().all(|o| matches!(o, PutOutcome::Failed(why) if !why.contains("larger"))),
            "{outcomes:?}"
        );
        assert!(took < Duration::from_secs(15), "calls across the partition hung ({took:?})");
        // Healed: the node comes back (it re-registers) and serves again.
        sh(&["ip", "link", "set", &ns.host_if, "up"]).expect("link up");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored = put(&client, &[200], LEN).await;
            if stored[0] == PutOutcome::Stored {
                break;
            }
            assert!(Instant::now() < deadline, "the node did not serve again after the partition healed: {stored:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(check(&client, &[200], LEN).await, 1);
        assert_clean(&client).await;
    });
}
