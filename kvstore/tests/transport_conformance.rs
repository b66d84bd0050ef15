//! One conformance suite for every [`Transport`] (tcp, shm, faulty-over-tcp
//! with no faults, and rdma when a device is present), plus the checks that
//! only make sense for one of them: the tcp server's defences against bad
//! peers, peer death, and each injected fault.
//!
//! `cargo test -p tandem-kvstore --release --test transport_conformance`;
//! the throughput report is `-- --ignored --nocapture throughput`.

use std::io::{BufRead, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::segment::Segment;
use tandem_kvstore::ssd::block_file_name;
use tandem_kvstore::transport::frame::{self, FrameHeader, Opcode, Status, HEADER_LEN, TRAILER_LEN};
use tandem_kvstore::transport::{
    connect, local_host_id, rdma_available, DataServer, DataTarget, FaultConfig, Faults, FaultyTransport, ReadOp,
    ShmConfig, ShmTransport, TcpConfig, TcpTransport, TransferError, Transport, TransportConfig, TransportKind,
    TransportPreference, WriteOp,
};
use tandem_kvstore::types::{Location, PeerInfo, SegmentDesc};
use tandem_proto::BlockKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEGMENTS: u32 = 3;
const SEGMENT_BYTES: u64 = 24 << 20;
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- fixture

/// A storage node's data, served in this process.
struct Node {
    segments: Vec<Arc<Segment>>,
    ssd_dir: PathBuf,
}

impl DataTarget for Node {
    fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        self.segments.get(id as usize).cloned()
    }

    fn read_ssd(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), TransferError> {
        use std::os::unix::fs::FileExt;
        let path = self.ssd_dir.join(block_file_name(key));
        let file = std::fs::File::open(path).map_err(|_| TransferError::NotFound)?;
        file.read_exact_at(dst, 0).map_err(|e| TransferError::Io(e.to_string()))
    }
}

/// A node with `SEGMENTS` segments and an SSD directory, its data server,
/// and the `PeerInfo` a client would get from the master.
struct Fixture {
    node: Arc<Node>,
    server: Option<DataServer>,
    peer: PeerInfo,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        Fixture::with_server_config(TcpConfig::default()).await
    }

    async fn with_server_config(cfg: TcpConfig) -> Fixture {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
        let ssd_dir = dir.path().join("ssd");
        std::fs::create_dir_all(ssd_dir.join("blocks")).unwrap();
        let mut segments = Vec::new();
        let mut descs = Vec::new();
        for id in 0..SEGMENTS {
            let path = dir.path().join(format!("seg{id}"));
            segments.push(Arc::new(Segment::create(&path, SEGMENT_BYTES, false).unwrap()));
            descs.push(SegmentDesc { id, bytes: SEGMENT_BYTES, path });
        }
        let node = Arc::new(Node { segments, ssd_dir: ssd_dir.clone() });
        let server = DataServer::bind("127.0.0.1:0".parse().unwrap(), node.clone(), cfg).await.unwrap();
        let peer = PeerInfo {
            name: "node-a".to_owned(),
            incarnation: 1,
            data_addr: server.local_addr(),
            host_id: local_host_id(),
            segments: descs,
            ssd_dir: Some(ssd_dir),
        };
        Fixture { node, server: Some(server), peer, _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.peer.data_addr
    }

    /// Writes an SSD block file of `len` bytes (padded, as the node may).
    fn put_ssd_block(&self, key: BlockKey, data: &[u8]) {
        let mut padded = data.to_vec();
        padded.extend_from_slice(&[0xee; 512]);
        std::fs::write(self.node.ssd_dir.join(block_file_name(key)), padded).unwrap();
    }

    /// The bytes a segment holds, read directly.
    fn peek(&self, segment: u32, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.node.segments[segment as usize].read_at(offset, &mut out).unwrap();
        out
    }
}

fn tcp_config() -> TcpConfig {
    TcpConfig { op_timeout_ms: 20_000, ..TcpConfig::default() }
}

fn seeded(test: &str) -> StdRng {
    let seed = std::env::var("TANDEM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (TANDEM_TEST_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

fn dram(segment: u32, offset: u64) -> Location {
    Location::Dram { segment, offset }
}

async fn write_all(t: &dyn Transport, blocks: &[(Location, Vec<u8>)]) -> Vec<Result<(), TransferError>> {
    let ops: Vec<WriteOp<'_>> = blocks.iter().map(|(dst, src)| WriteOp { dst: *dst, src, grant: None }).collect();
    t.write(&ops).await
}

async fn read_all(t: &dyn Transport, locs: &[(Location, usize)]) -> (Vec<Result<(), TransferError>>, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = locs.iter().map(|(_, len)| vec![0u8; *len]).collect();
    let mut ops: Vec<ReadOp<'_>> =
        locs.iter().zip(bufs.iter_mut()).map(|((src, _), dst)| ReadOp::new(*src, dst)).collect();
    let results = t.read(&mut ops).await;
    let sums: Vec<Option<u64>> = ops.iter().map(|op| op.checksum).collect();
    drop(ops);
    // A checksum a transport hands back must be the bytes' own (readers
    // skip hashing when one is given).
    for (i, (sum, buf)) in sums.iter().zip(&bufs).enumerate() {
        if let (Some(sum), Ok(())) = (sum, &results[i]) {
            assert_eq!(*sum, BlockChecksum::of(buf).0, "op {i}: the transport's checksum is not its bytes'");
        }
    }
    (results, bufs)
}

fn assert_all_ok(results: &[Result<(), TransferError>]) {
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "op {i}: {r:?}");
    }
}

fn is_rejected(r: &Result<(), TransferError>) -> bool {
    matches!(r, Err(TransferError::Rejected(_)))
}

// ------------------------------------------------------ the shared suite

/// Builds the transport under test for a fixture.
type Make = fn(&Fixture) -> Arc<dyn Transport>;

mod suite {
    use super::*;

    pub async fn round_trips_of_many_sizes(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        let mut rng = seeded("round_trips_of_many_sizes");
        let sizes = [1, 7, 4096, 4097, 65_536, 65_537, 262_144, 1_000_003, 4 * MIB, 4 * MIB + 3];
        let mut offset = 13u64;
        for (k, &len) in sizes.iter().enumerate() {
            let seg = k as u32 % SEGMENTS;
            let data = random_bytes(&mut rng, len);
            let loc = dram(seg, offset);
            assert_all_ok(&write_all(&*t, &[(loc, data.clone())]).await);
            assert!(f.peek(seg, offset, len) == data, "size {len}: write did not land");
            let (results, bufs) = read_all(&*t, &[(loc, len)]).await;
            assert_all_ok(&results);
            assert!(bufs[0] == data, "size {len}: read back differs");
            offset += len as u64 + 1;
        }
    }

    pub async fn batches_span_segments(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        let mut rng = seeded("batches_span_segments");
        let mut next = [0u64; SEGMENTS as usize];
        let mut blocks = Vec::new();
        for i in 0..300 {
            let seg = rng.random_range(0..SEGMENTS);
            let len = match i % 4 {
                0 => rng.random_range(1..4096),
                1 => 4096,
                2 => rng.random_range(4096..200_000),
                _ => 65_536,
            };
            let loc = dram(seg, next[seg as usize]);
            next[seg as usize] += len as u64 + rng.random_range(0..64);
            blocks.push((loc, random_bytes(&mut rng, len)));
        }
        assert_all_ok(&write_all(&*t, &blocks).await);
        let locs: Vec<(Location, usize)> = blocks.iter().map(|(l, d)| (*l, d.len())).collect();
        let (results, bufs) = read_all(&*t, &locs).await;
        assert_all_ok(&results);
        for (i, ((_, want), got)) in blocks.iter().zip(&bufs).enumerate() {
            assert!(want == got, "op {i} differs");
        }
    }

    pub async fn ssd_locations_are_read_and_missing_blocks_are_misses(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        let mut rng = seeded("ssd_locations");
        let a = random_bytes(&mut rng, 4096);
        let b = random_bytes(&mut rng, 300_001);
        f.put_ssd_block(BlockKey(1), &a);
        f.put_ssd_block(BlockKey(u64::MAX), &b);
        let d = random_bytes(&mut rng, 5000);
        assert_all_ok(&write_all(&*t, &[(dram(1, 4096), d.clone())]).await);
        let locs = [
            (Location::Ssd { key: BlockKey(1) }, a.len()),
            (Location::Ssd { key: BlockKey(2) }, 100),
            (dram(1, 4096), d.len()),
            (Location::Ssd { key: BlockKey(u64::MAX) }, b.len()),
        ];
        let (results, bufs) = read_all(&*t, &locs).await;
        assert!(results[0].is_ok() && bufs[0] == a, "{:?}", results[0]);
        assert_eq!(results[1], Err(TransferError::NotFound));
        assert!(results[2].is_ok() && bufs[2] == d, "{:?}", results[2]);
        assert!(results[3].is_ok() && bufs[3] == b, "{:?}", results[3]);
    }

    pub async fn concurrent_batches_from_many_tasks(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        let mut tasks = Vec::new();
        for task in 0..16u64 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(task);
                let base = task * (SEGMENT_BYTES / 16);
                for round in 0..8u64 {
                    let blocks: Vec<(Location, Vec<u8>)> = (0..12u64)
                        .map(|i| {
                            let len = [1usize, 4096, 65_536, 100_000][(i % 4) as usize];
                            let loc = dram((task % 3) as u32, base + i * 120_000);
                            (loc, random_bytes(&mut rng, len))
                        })
                        .collect();
                    assert_all_ok(&write_all(&*t, &blocks).await);
                    let locs: Vec<(Location, usize)> = blocks.iter().map(|(l, d)| (*l, d.len())).collect();
                    let (results, bufs) = read_all(&*t, &locs).await;
                    assert_all_ok(&results);
                    for ((_, want), got) in blocks.iter().zip(&bufs) {
                        assert!(want == got, "task {task} round {round} read back differs");
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }

    pub async fn bad_ops_fail_alone(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        let good = vec![0x5au8; 1000];
        let end = SEGMENT_BYTES - 100;
        let blocks = vec![
            (dram(0, 0), good.clone()),
            (dram(0, end), good.clone()),
            (dram(SEGMENTS + 7, 0), good.clone()),
            (dram(2, u64::MAX - 10), good.clone()),
            (Location::Ssd { key: BlockKey(9) }, good.clone()),
            (dram(2, end - 1000), good.clone()),
        ];
        let results = write_all(&*t, &blocks).await;
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(is_rejected(&results[1]), "past the end: {:?}", results[1]);
        assert!(is_rejected(&results[2]), "unknown segment: {:?}", results[2]);
        assert!(is_rejected(&results[3]), "offset overflow: {:?}", results[3]);
        assert!(is_rejected(&results[4]), "write to SSD: {:?}", results[4]);
        assert!(results[5].is_ok(), "{:?}", results[5]);
        assert_eq!(f.peek(2, end - 1000, 1000), good);
        assert_eq!(f.peek(0, end, 100), vec![0u8; 100], "a rejected write must not land partially");

        let locs: Vec<(Location, usize)> = blocks.iter().map(|(l, d)| (*l, d.len())).collect();
        let (results, bufs) = read_all(&*t, &locs).await;
        assert!(results[0].is_ok() && bufs[0] == good);
        assert!(is_rejected(&results[1]) && is_rejected(&results[2]) && is_rejected(&results[3]), "{results:?}");
        assert_eq!(results[4], Err(TransferError::NotFound));
        assert!(results[5].is_ok() && bufs[5] == good);
    }

    pub async fn empty_batches_and_empty_blocks(make: Make) {
        let f = Fixture::new().await;
        let t = make(&f);
        assert!(t.read(&mut []).await.is_empty());
        assert!(t.write(&[]).await.is_empty());
        assert_all_ok(&write_all(&*t, &[(dram(0, 10), Vec::new())]).await);
        let (results, _) = read_all(&*t, &[(dram(0, 10), 0)]).await;
        assert_all_ok(&results);
    }
}

macro_rules! conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;

            const MAKE: Make = $make;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn round_trips_of_many_sizes() {
                suite::round_trips_of_many_sizes(MAKE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn batches_span_segments() {
                suite::batches_span_segments(MAKE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ssd_locations_are_read_and_missing_blocks_are_misses() {
                suite::ssd_locations_are_read_and_missing_blocks_are_misses(MAKE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_batches_from_many_tasks() {
                suite::concurrent_batches_from_many_tasks(MAKE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_ops_fail_alone() {
                suite::bad_ops_fail_alone(MAKE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn empty_batches_and_empty_blocks() {
                suite::empty_batches_and_empty_blocks(MAKE).await;
            }
        }
    };
}

conformance!(tcp, |f| Arc::new(TcpTransport::new(f.addr(), tcp_config())));
conformance!(tcp_one_stripe, |f| Arc::new(TcpTransport::new(f.addr(), TcpConfig { stripes: 1, ..tcp_config() })));
conformance!(shm, |f| Arc::new(ShmTransport::new(&f.peer, ShmConfig::default())));
conformance!(shm_parallel_copies, |f| {
    let cfg = ShmConfig { copy_threads: 3, parallel_min_bytes: bytesize::ByteSize::b(1) };
    Arc::new(ShmTransport::new(&f.peer, cfg))
});
conformance!(faulty_tcp_without_faults, |f| {
    let tcp = Arc::new(TcpTransport::new(f.addr(), tcp_config()));
    Arc::new(FaultyTransport::new(tcp, Faults::new(7)))
});

/// RDMA settings for the test: `TANDEM_RDMA_GID_INDEX` picks the GID
/// (RoCE v2, e.g. soft-RoCE, wants the IPv4-mapped one).
fn rdma_config() -> TransportConfig {
    let mut cfg = TransportConfig { prefer: TransportPreference::Rdma, ..TransportConfig::default() };
    if let Some(index) = std::env::var("TANDEM_RDMA_GID_INDEX").ok().and_then(|s| s.parse().ok()) {
        cfg.rdma.gid_index = index;
    }
    cfg
}

/// The suite over RDMA, when this build and machine can do it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdma_conformance_when_a_device_is_present() {
    if let Err(reason) = rdma_available(&rdma_config().rdma) {
        println!("skipped rdma conformance: {reason}");
        return;
    }
    fn make(f: &Fixture) -> Arc<dyn Transport> {
        connect(&f.peer, "another-host", &rdma_config()).expect("rdma transport")
    }
    suite::round_trips_of_many_sizes(make).await;
    suite::batches_span_segments(make).await;
    suite::ssd_locations_are_read_and_missing_blocks_are_misses(make).await;
    suite::concurrent_batches_from_many_tasks(make).await;
    suite::bad_ops_fail_alone(make).await;
    suite::empty_batches_and_empty_blocks(make).await;
}

// ----------------------------------------------------------- selection

#[tokio::test]
async fn connect_picks_by_locality_and_preference() {
    let f = Fixture::new().await;
    let me = local_host_id();
    assert_eq!(me, local_host_id(), "host id is stable");
    let auto = TransportConfig::default();
    assert_eq!(connect(&f.peer, &me, &auto).unwrap().kind(), TransportKind::Shm);
    assert_eq!(connect(&f.peer, "elsewhere", &auto).unwrap().kind(), TransportKind::Tcp);
    let tcp = TransportConfig { prefer: TransportPreference::Tcp, ..TransportConfig::default() };
    assert_eq!(connect(&f.peer, &me, &tcp).unwrap().kind(), TransportKind::Tcp);
    let shm = TransportConfig { prefer: TransportPreference::Shm, ..TransportConfig::default() };
    assert!(matches!(connect(&f.peer, "elsewhere", &shm), Err(TransferError::Rejected(_))));
    let rdma = TransportConfig { prefer: TransportPreference::Rdma, ..TransportConfig::default() };
    match (connect(&f.peer, "elsewhere", &rdma), rdma_available(&rdma.rdma)) {
        (Ok(t), Ok(_)) => assert_eq!(t.kind(), TransportKind::Rdma),
        (Err(TransferError::Rejected(msg)), Err(reason)) => assert_eq!(msg, reason),
        (got, available) => panic!("rdma: {got:?} while availability is {available:?}"),
    }
    let mut bad = TransportConfig::default();
    bad.tcp.stripes = 0;
    assert!(matches!(connect(&f.peer, &me, &bad), Err(TransferError::Rejected(_))));
}

// ------------------------------------------------------------- shm only

#[tokio::test]
async fn shm_reports_unmappable_segments_and_short_ssd_files() {
    let f = Fixture::new().await;
    let mut peer = f.peer.clone();
    peer.segments[1].path = PathBuf::from("/nonexistent/tandem-seg");
    peer.segments[2].bytes += 4096;
    let t = ShmTransport::new(&peer, ShmConfig::default());
    std::fs::write(f.node.ssd_dir.join(block_file_name(BlockKey(5))), [1u8; 10]).unwrap();
    let (results, _) = read_all(
        &t,
        &[(dram(0, 0), 16), (dram(1, 0), 16), (dram(2, 0), 16), (Location::Ssd { key: BlockKey(5) }, 4096)],
    )
    .await;
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(TransferError::Unreachable(_))), "{:?}", results[1]);
    assert!(matches!(results[2], Err(TransferError::Unreachable(_))), "size mismatch: {:?}", results[2]);
    assert!(matches!(results[3], Err(TransferError::Io(_))), "{:?}", results[3]);
}

#[tokio::test]
async fn shm_refuses_overlapping_writes_within_a_batch() {
    let f = Fixture::new().await;
    let t = ShmTransport::new(&f.peer, ShmConfig::default());
    let results = write_all(
        &t,
        &[
            (dram(0, 0), vec![1; 100]),
            (dram(0, 50), vec![2; 100]),
            (dram(1, 50), vec![3; 10]),
            (dram(0, 100), vec![4; 8]),
        ],
    )
    .await;
    assert!(results[0].is_ok() && results[2].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(is_rejected(&results[1]), "{:?}", results[1]);
}

// ------------------------------------------------------------- tcp only

/// A raw connection to the data port speaking frames by hand.
struct RawClient {
    stream: tokio::net::TcpStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient { stream: tokio::net::TcpStream::connect(addr).await.unwrap() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame's header and payload (trailer checked), or `None` at EOF.
    async fn recv(&mut self) -> Option<(FrameHeader, Vec<u8>)> {
        let mut raw = [0u8; HEADER_LEN];
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut raw)).await;
        read.expect("server answered within 10 s").ok()?;
        let h = FrameHeader::decode(&raw).expect("server sends valid headers");
        let mut payload = vec![0u8; h.payload_len as usize];
        if !payload.is_empty() {
            self.stream.read_exact(&mut payload).await.unwrap();
            let mut trailer = [0u8; TRAILER_LEN];
            self.stream.read_exact(&mut trailer).await.unwrap();
            assert_eq!(u64::from_le_bytes(trailer), frame::payload_checksum(&payload));
        }
        Some((h, payload))
    }

    /// True once the server has closed the connection.
    async fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn request(op: Opcode, id: u64, segment: u32, offset: u64, len: u64) -> FrameHeader {
    let mut h = FrameHeader::new(op, id);
    h.count = 1;
    h.segment = segment;
    h.offset = offset;
    h.len = len;
    if op == Opcode::Write {
        h.payload_len = len;
    }
    h
}

fn tweak(mut h: FrameHeader, change: impl FnOnce(&mut FrameHeader)) -> FrameHeader {
    change(&mut h);
    h
}

fn write_frame(id: u64, segment: u32, offset: u64, payload: &[u8], trailer: u64) -> Vec<u8> {
    let mut out = request(Opcode::Write, id, segment, offset, payload.len() as u64).encode().to_vec();
    out.extend_from_slice(payload);
    out.extend_from_slice(&trailer.to_le_bytes());
    out
}

/// After an attack, the server must still serve a well-formed client.
async fn assert_still_serving(f: &Fixture) {
    let t = TcpTransport::new(f.addr(), tcp_config());
    assert_all_ok(&write_all(&t, &[(dram(0, 1 << 20), b"still alive".to_vec())]).await);
    let (results, bufs) = read_all(&t, &[(dram(0, 1 << 20), 11)]).await;
    assert_all_ok(&results);
    assert_eq!(bufs[0], b"still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_garbage_on_the_data_port_is_disconnected_and_the_server_stays_up() {
    let f = Fixture::new().await;
    let mut rng = seeded("garbage");
    for len in [1usize, 63, 64, 1000, 100_000] {
        let mut raw = RawClient::connect(f.addr()).await;
        // Writing may fail once the server hangs up; that is the point.
        let _ = raw.stream.write_all(&random_bytes(&mut rng, len)).await;
        if len >= HEADER_LEN {
            assert!(raw.closed().await, "garbage of {len} bytes: connection should be closed");
        }
    }
    assert_still_serving(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_corrupt_header_gets_an_error_frame_then_disconnect() {
    let f = Fixture::new().await;
    let mut raw = RawClient::connect(f.addr()).await;
    let mut bytes = request(Opcode::Read, 1, 0, 0, 4096).encode();
    bytes[30] ^= 0x40;
    raw.send(&bytes).await;
    let (h, msg) = raw.recv().await.expect("an error frame");
    assert_eq!((h.op(), Status::from_u16(h.status), h.request_id), (Some(Opcode::Error), Status::Corrupt, 0));
    assert!(String::from_utf8_lossy(&msg).contains("checksum"));
    assert!(raw.closed().await);
    assert_still_serving(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_wrong_version_is_a_clear_rejection_both_ways() {
    let f = Fixture::new().await;
    // A client from the future.
    let mut raw = RawClient::connect(f.addr()).await;
    let mut h = request(Opcode::Read, 1, 0, 0, 4096);
    h.version = frame::VERSION + 1;
    raw.send(&h.encode()).await;
    let (reply, msg) = raw.recv().await.expect("an error frame");
    assert_eq!(Status::from_u16(reply.status), Status::VersionMismatch);
    assert!(String::from_utf8_lossy(&msg).contains("version"), "{}", String::from_utf8_lossy(&msg));
    assert!(raw.closed().await);

    // A server from the future.
    let addr = fake_server(|_, _| {
        let mut h = FrameHeader::new(Opcode::Data, 1);
        h.version = frame::VERSION + 1;
        h.encode().to_vec()
    })
    .await;
    let t = TcpTransport::new(addr, TcpConfig { stripes: 1, ..tcp_config() });
    let (results, _) = read_all(&t, &[(dram(0, 0), 10)]).await;
    match &results[0] {
        Err(TransferError::Rejected(msg)) => assert!(msg.contains("version"), "{msg}"),
        other => panic!("expected a version rejection, got {other:?}"),
    }
    assert_still_serving(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_oversized_frames_are_refused_on_both_sides() {
    let cfg = TcpConfig { max_frame_bytes: bytesize::ByteSize::mib(1), ..TcpConfig::default() };
    let f = Fixture::with_server_config(cfg.clone()).await;

    // The client refuses before sending.
    let small = TcpTransport::new(f.addr(), TcpConfig { max_frame_bytes: bytesize::ByteSize::mib(1), ..tcp_config() });
    let (results, _) = read_all(&small, &[(dram(0, 0), 2 * MIB), (dram(0, 0), 100)]).await;
    assert!(is_rejected(&results[0]) && results[1].is_ok(), "{results:?}");

    // The server refuses a read it may not answer, and the batch goes on.
    let big = TcpTransport::new(f.addr(), TcpConfig { stripes: 1, ..tcp_config() });
    let (results, _) = read_all(&big, &[(dram(0, 0), 100), (dram(0, 0), 2 * MIB), (dram(1, 0), 100)]).await;
    assert!(results[0].is_ok() && is_rejected(&results[1]) && results[2].is_ok(), "{results:?}");

    // A write it may not receive ends the connection after a clear error.
    let results = write_all(&big, &[(dram(0, 0), vec![1; 2 * MIB])]).await;
    assert!(is_rejected(&results[0]), "{results:?}");

    // Raw: an absurd payload length.
    let mut raw = RawClient::connect(f.addr()).await;
    let mut h = request(Opcode::Write, 1, 0, 0, 0);
    h.payload_len = u64::MAX / 2;
    h.len = h.payload_len;
    raw.send(&h.encode()).await;
    let (reply, _) = raw.recv().await.expect("an error frame");
    assert_eq!(Status::from_u16(reply.status), Status::TooLarge);
    assert!(raw.closed().await);
    assert_still_serving(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_malformed_requests_get_errors_not_panics() {
    let f = Fixture::new().await;
    let read = || request(Opcode::Read, 1, 0, 0, 10);
    let cases: Vec<(FrameHeader, Status, bool)> = vec![
        (FrameHeader::new(Opcode::Read, 1), Status::TooManyOps, false), // count 0
        (request(Opcode::Read, 1, 99, 0, 10), Status::UnknownSegment, false),
        (request(Opcode::Read, 1, 0, SEGMENT_BYTES, 1), Status::OutOfBounds, false),
        (request(Opcode::Read, 1, 0, u64::MAX, 2), Status::OutOfBounds, false),
        (request(Opcode::ReadSsd, 1, 0, 12345, 10), Status::NotFound, false),
        (tweak(read(), |h| h.count = u32::MAX), Status::TooManyOps, false),
        (tweak(read(), |h| h.opcode = 0x42), Status::BadRequest, true),
        (request(Opcode::Data, 1, 0, 0, 0), Status::BadRequest, true),
        (tweak(read(), |h| h.flags = 1), Status::BadRequest, true),
        (request(Opcode::Read, 0, 0, 0, 10), Status::BadRequest, true),
        (tweak(request(Opcode::Write, 1, 0, 0, 10), |h| h.len = 11), Status::BadRequest, true),
    ];
    for (i, (h, want, closes)) in cases.into_iter().enumerate() {
        let mut raw = RawClient::connect(f.addr()).await;
        let mut bytes = h.encode().to_vec();
        if h.payload_len > 0 {
            let payload = vec![0u8; h.payload_len as usize];
            bytes.extend_from_slice(&payload);
            bytes.extend_from_slice(&frame::payload_checksum(&payload).to_le_bytes());
        }
        raw.send(&bytes).await;
        let (reply, _) = raw.recv().await.unwrap_or_else(|| panic!("case {i}: no reply"));
        assert_eq!(Status::from_u16(reply.status), want, "case {i}");
        if closes {
            assert!(raw.closed().await, "case {i} should close the connection");
        } else {
            // The connection stays usable.
            raw.send(&request(Opcode::Read, 2, 0, 0, 3).encode()).await;
            let (ok, data) = raw.recv().await.unwrap_or_else(|| panic!("case {i}: closed"));
            assert_eq!((ok.op(), ok.request_id, data.len()), (Some(Opcode::Data), 2, 3), "case {i}");
        }
    }
    assert_still_serving(&f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_payload_corruption_is_detected_both_ways() {
    let f = Fixture::new().await;
    // Client → server: a write whose trailer does not match fails alone,
    // and the connection stays in sync.
    let mut raw = RawClient::connect(f.addr()).await;
    let payload = vec![7u8; 5000];
    let good = frame::payload_checksum(&payload);
    raw.send(&write_frame(1, 0, 0, &payload, good ^ 1)).await;
    raw.send(&write_frame(2, 0, 8192, &payload, good)).await;
    let (r1, _) = raw.recv().await.unwrap();
    let (r2, _) = raw.recv().await.unwrap();
    assert_eq!((r1.op(), Status::from_u16(r1.status)), (Some(Opcode::Error), Status::Corrupt));
    assert_eq!(r2.op(), Some(Opcode::WriteOk));
    assert_eq!(f.peek(0, 8192, 5000), payload);

    // Server → client: a read reply damaged on the wire is a Protocol
    // error for that op only.
    let addr = fake_server(|id, len| {
        let block = vec![3u8; len as usize];
        let mut h = FrameHeader::new(Opcode::Data, id);
        h.len = len;
        h.payload_len = len;
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&block);
        let sum = frame::payload_checksum(&block);
        out.extend_from_slice(&(if id == 1 { sum ^ 0xff } else { sum }).to_le_bytes());
        out
    })
    .await;
    let t = TcpTransport::new(addr, TcpConfig { stripes: 1, ..tcp_config() });
    let (results, bufs) = read_all(&t, &[(dram(0, 0), 1000), (dram(0, 0), 1000)]).await;
    assert!(matches!(results[0], Err(TransferError::Protocol(_))), "{:?}", results[0]);
    assert!(results[1].is_ok() && bufs[1] == vec![3u8; 1000], "{:?}", results[1]);
}

/// A one-connection-at-a-time server answering each request header (id,
/// len) with `reply(id, len)`; write payloads are skipped.
async fn fake_server(reply: fn(u64, u64) -> Vec<u8>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut raw = [0u8; HEADER_LEN];
                while s.read_exact(&mut raw).await.is_ok() {
                    let Ok(h) = FrameHeader::decode(&raw) else { return };
                    if h.payload_len > 0 {
                        let mut skip = vec![0u8; h.payload_len as usize + TRAILER_LEN];
                        if s.read_exact(&mut skip).await.is_err() {
                            return;
                        }
                    }
                    if s.write_all(&reply(h.request_id, h.len)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A server that accepts and then says nothing.
async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_a_silent_peer_times_out_and_an_absent_one_is_unreachable() {
    let (addr, _task) = silent_server().await;
    let t = TcpTransport::new(addr, TcpConfig { op_timeout_ms: 200, ..tcp_config() });
    let (results, _) = read_all(&t, &[(dram(0, 0), 10), (dram(0, 10), 10)]).await;
    for r in &results {
        assert_eq!(*r, Err(TransferError::Timeout(200)));
    }
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let t = TcpTransport::new(closed, tcp_config());
    let (results, _) = read_all(&t, &[(dram(0, 0), 10)]).await;
    assert!(matches!(results[0], Err(TransferError::Unreachable(_))), "{:?}", results[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_reconnects_after_the_server_restarts() {
    let mut f = Fixture::new().await;
    let t = TcpTransport::new(f.addr(), TcpConfig { stripes: 2, ..tcp_config() });
    let data = vec![9u8; 300_000];
    assert_all_ok(&write_all(&t, &[(dram(0, 0), data.clone()), (dram(1, 0), data.clone())]).await);
    // Every pooled connection is now dead.
    f.server.take().unwrap().shutdown().await;
    let (results, _) = read_all(&t, &[(dram(0, 0), 10)]).await;
    assert!(results[0].is_err(), "no server: {:?}", results[0]);
    f.server = Some(DataServer::bind(f.addr(), f.node.clone(), TcpConfig::default()).await.unwrap());
    let (results, bufs) = read_all(&t, &[(dram(0, 0), data.len()), (dram(1, 0), data.len())]).await;
    assert_all_ok(&results);
    assert!(bufs[0] == data && bufs[1] == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stale_pooled_connections_are_retried_transparently() {
    let cfg = TcpConfig { idle_timeout_ms: 50, ..TcpConfig::default() };
    let f = Fixture::with_server_config(cfg).await;
    let t = TcpTransport::new(f.addr(), TcpConfig { stripes: 1, ..tcp_config() });
    assert_all_ok(&write_all(&t, &[(dram(0, 0), vec![1; 10])]).await);
    // Wait until the server has dropped our idle connection: a raw probe
    // connection opened later is closed by then too.
    let mut probe = RawClient::connect(f.addr()).await;
    assert!(probe.closed().await);
    let (results, bufs) = read_all(&t, &[(dram(0, 0), 10)]).await;
    assert_all_ok(&results);
    assert_eq!(bufs[0], vec![1; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_beyond_the_limit_are_refused_as_busy() {
    let cfg = TcpConfig { max_connections: 1, ..TcpConfig::default() };
    let f = Fixture::with_server_config(cfg).await;
    let first = TcpTransport::new(f.addr(), TcpConfig { stripes: 1, ..tcp_config() });
    assert_all_ok(&write_all(&first, &[(dram(0, 0), vec![1; 10])]).await);
    let second = TcpTransport::new(f.addr(), TcpConfig { stripes: 1, ..tcp_config() });
    let (results, _) = read_all(&second, &[(dram(0, 0), 10)]).await;
    match &results[0] {
        Err(TransferError::Unreachable(msg)) => assert!(msg.contains("busy"), "{msg}"),
        // The refusal may race the request; either way it is not served.
        Err(TransferError::ConnectionLost(_)) => {}
        other => panic!("expected busy, got {other:?}"),
    }
    let (results, _) = read_all(&first, &[(dram(0, 0), 10)]).await;
    assert_all_ok(&results);
}

/// The test peer process: a data server we can SIGKILL.
struct TestPeer {
    child: std::process::Child,
    stdout: StdBufReader<std::process::ChildStdout>,
    addr: SocketAddr,
}

impl TestPeer {
    fn spawn(dir: &Path) -> Result<TestPeer> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-kvstore-testpeer"))
            .arg(dir)
            .arg((64u64 << 20).to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("spawning tandem-kvstore-testpeer")?;
        let mut stdout = StdBufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        if words.next() != Some("READY") {
            bail!("test peer said {line:?}");
        }
        let addr = words.next().context("address")?.parse()?;
        Ok(TestPeer { child, stdout, addr })
    }

    /// Blocks until the peer reports a stalled SSD read.
    fn wait_stalled(&mut self) -> Result<()> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "STALLED" {
            bail!("test peer said {line:?}");
        }
        Ok(())
    }
}

impl Drop for TestPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peer_killed_mid_batch_fails_unfinished_ops_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mut peer = TestPeer::spawn(dir.path()).unwrap();
    for stripes in [1usize, 4] {
        if stripes == 4 {
            drop(peer);
            peer = TestPeer::spawn(dir.path()).unwrap();
        }
        let t = Arc::new(TcpTransport::new(peer.addr, TcpConfig { stripes, ..tcp_config() }));
        let block = vec![0xabu8; MIB];
        let blocks: Vec<(Location, Vec<u8>)> = (0..8).map(|i| (dram(0, i * MIB as u64), block.clone())).collect();
        assert_all_ok(&write_all(&*t, &blocks).await);
        // 64 reads; op 20 stalls in the peer until it is killed.
        let locs: Vec<(Location, usize)> = (0..64u64)
            .map(|i| {
                if i == 20 {
                    (Location::Ssd { key: BlockKey(0xdead) }, 4096)
                } else {
                    (dram(0, (i % 8) * MIB as u64), MIB)
                }
            })
            .collect();
        let batch = {
            let t = t.clone();
            tokio::spawn(async move { read_all(&*t, &locs).await })
        };
        let mut killer =
            tokio::task::spawn_blocking(move || peer.wait_stalled().map(|()| peer)).await.unwrap().unwrap();
        killer.child.kill().unwrap();
        killer.child.wait().unwrap();
        let (results, bufs) = tokio::time::timeout(Duration::from_secs(30), batch).await.expect("batch hung").unwrap();
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(()) => assert!(bufs[i] == block, "op {i} reported success with wrong bytes"),
                Err(TransferError::ConnectionLost(_) | TransferError::Timeout(_)) => {}
                Err(e) => panic!("op {i}: unexpected {e:?}"),
            }
        }
        assert!(results[20].is_err(), "the stalled op cannot have succeeded");
        if stripes == 1 {
            assert!(results[..20].iter().all(Result::is_ok), "ops before the stall were answered: {results:?}");
            assert!(results[20..].iter().all(Result::is_err));
        }
        // The peer is gone for good: the next batch fails fast.
        let (results, _) = read_all(&*t, &[(dram(0, 0), 10)]).await;
        assert!(matches!(results[0], Err(TransferError::Unreachable(_))), "{:?}", results[0]);
        peer = killer;
    }
}

// ---------------------------------------------------------- faulty only

async fn faulty_fixture() -> (Fixture, FaultyTransport, Faults) {
    let f = Fixture::new().await;
    let faults = Faults::from_env_or_random();
    let tcp = Arc::new(TcpTransport::new(f.addr(), tcp_config()));
    let t = FaultyTransport::new(tcp, faults.clone());
    (f, t, faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_drop_fails_ops_with_connection_lost() {
    let (_f, t, faults) = faulty_fixture().await;
    faults.set(FaultConfig { drop: 1.0, ..FaultConfig::default() });
    let results = write_all(&t, &[(dram(0, 0), vec![1; 10]), (dram(0, 10), vec![2; 10])]).await;
    assert!(results.iter().all(|r| matches!(r, Err(TransferError::ConnectionLost(_)))), "{results:?}");
    assert_eq!(faults.stats().dropped, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_partition_then_heal() {
    let (f, t, faults) = faulty_fixture().await;
    faults.set(FaultConfig { partition: 1.0, ..FaultConfig::default() });
    let results = write_all(&t, &[(dram(0, 0), vec![1; 10])]).await;
    assert!(matches!(results[0], Err(TransferError::Unreachable(_))), "{results:?}");
    assert_eq!(f.peek(0, 0, 10), vec![0; 10], "a partitioned write reaches nobody");
    let (results, _) = read_all(&t, &[(dram(0, 0), 10)]).await;
    assert!(matches!(results[0], Err(TransferError::Unreachable(_))));
    faults.heal();
    assert_all_ok(&write_all(&t, &[(dram(0, 0), vec![1; 10])]).await);
    let (results, bufs) = read_all(&t, &[(dram(0, 0), 10)]).await;
    assert_all_ok(&results);
    assert_eq!(bufs[0], vec![1; 10]);
    assert_eq!(faults.stats().partitioned, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_corrupt_flips_exactly_one_byte_and_reports_success() {
    let (f, t, faults) = faulty_fixture().await;
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    assert_all_ok(&write_all(&t, &[(dram(0, 0), data.clone())]).await);
    faults.set(FaultConfig { corrupt: 1.0, ..FaultConfig::default() });
    let (results, bufs) = read_all(&t, &[(dram(0, 0), data.len())]).await;
    assert_all_ok(&results);
    assert_eq!(bufs[0].iter().zip(&data).filter(|(a, b)| a != b).count(), 1, "read corruption");
    assert_all_ok(&write_all(&t, &[(dram(1, 0), data.clone())]).await);
    assert_eq!(f.peek(1, 0, data.len()).iter().zip(&data).filter(|(a, b)| a != b).count(), 1, "write corruption");
    assert_eq!(faults.stats().corrupted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_delay_holds_the_batch_back() {
    let (_f, t, faults) = faulty_fixture().await;
    faults.set(FaultConfig { delay: 1.0, delay_ms: 100, ..FaultConfig::default() });
    let start = Instant::now();
    assert_all_ok(&write_all(&t, &[(dram(0, 0), vec![1; 10])]).await);
    assert!(start.elapsed() >= Duration::from_millis(100));
    assert_eq!(faults.stats().delayed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_same_seed_same_faults() {
    let f = Fixture::new().await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let faults = Faults::new(1234);
        faults.set(FaultConfig { drop: 0.5, ..FaultConfig::default() });
        let t = FaultyTransport::new(Arc::new(ShmTransport::new(&f.peer, ShmConfig::default())), faults.clone());
        let mut outcome = Vec::new();
        for round in 0..10u64 {
            let blocks: Vec<(Location, Vec<u8>)> =
                (0..8).map(|i| (dram(0, round * 1000 + i * 100), vec![1; 10])).collect();
            outcome.extend(write_all(&t, &blocks).await.into_iter().map(|r| r.is_ok()));
        }
        assert_eq!(faults.seed(), 1234);
        runs.push(outcome);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].iter().any(|&ok| ok) && runs[0].iter().any(|&ok| !ok), "p = 0.5 over 80 ops");
}

// ------------------------------------------------------------ throughput

fn gbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

/// Best of five runs: other work on a shared machine only ever slows a run.
async fn best_of<F: std::future::Future<Output = f64>>(mut run: impl FnMut() -> F) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..5 {
        best = best.max(run().await);
    }
    best
}

async fn read_round(t: &dyn Transport, locs: &[(Location, usize)], bufs: &mut [Vec<u8>]) {
    let mut ops: Vec<ReadOp<'_>> =
        locs.iter().zip(bufs.iter_mut()).map(|((src, _), dst)| ReadOp::new(*src, dst)).collect();
    assert_all_ok(&t.read(&mut ops).await);
}

/// Reads `rounds` batches of `count` distinct blocks of `len` bytes; GB/s.
async fn measure_reads(t: &dyn Transport, len: usize, count: usize, rounds: usize) -> f64 {
    let locs: Vec<(Location, usize)> =
        (0..count).map(|i| (dram((i % SEGMENTS as usize) as u32, ((i / 3) * len) as u64), len)).collect();
    let mut bufs: Vec<Vec<u8>> = locs.iter().map(|(_, len)| vec![1u8; *len]).collect();
    read_round(t, &locs, &mut bufs).await;
    let start = Instant::now();
    for _ in 0..rounds {
        read_round(t, &locs, &mut bufs).await;
    }
    gbps(len * count * rounds, start.elapsed())
}

/// The shm baseline: plain copies between the same number of distinct
/// source and destination blocks.
async fn measure_memcpy(len: usize, count: usize, rounds: usize) -> f64 {
    let src: Vec<Vec<u8>> = (0..count).map(|_| vec![3u8; len]).collect();
    let mut dst: Vec<Vec<u8>> = (0..count).map(|_| vec![1u8; len]).collect();
    let start = Instant::now();
    for _ in 0..rounds {
        for (s, d) in src.iter().zip(dst.iter_mut()) {
            d.copy_from_slice(std::hint::black_box(s));
        }
    }
    std::hint::black_box(&dst);
    gbps(len * count * rounds, start.elapsed())
}

/// The tcp baseline: a raw tokio blast over loopback on `conns`
/// connections, sending from and receiving into the same number of distinct
/// `len`-byte blocks as the transport does, with no framing or checksums.
async fn measure_raw_tcp(len: usize, count: usize, rounds: usize, conns: usize) -> f64 {
    let per_conn = count / conns;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut senders = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            senders.push(tokio::spawn(async move {
                let blocks: Vec<Vec<u8>> = (0..per_conn).map(|_| vec![5u8; len]).collect();
                let mut go = [0u8; 1];
                s.read_exact(&mut go).await.unwrap();
                for _ in 0..rounds {
                    for b in &blocks {
                        s.write_all(b).await.unwrap();
                    }
                }
            }));
        }
        for s in senders {
            s.await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for _ in 0..conns {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        clients.push(s);
    }
    let start = Instant::now();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut bufs: Vec<Vec<u8>> = (0..per_conn).map(|_| vec![0u8; len]).collect();
                s.write_all(&[1]).await.unwrap();
                for _ in 0..rounds {
                    for b in bufs.iter_mut() {
                        s.read_exact(b).await.unwrap();
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.await.unwrap();
    }
    let elapsed = start.elapsed();
    server.await.unwrap();
    gbps(len * per_conn * conns * rounds, elapsed)
}

/// Prints GB/s of shm and tcp reads against memcpy and a raw tcp blast
/// (best of five runs each). Not a pass/fail check — speed is for
/// benchmarks: run with `--release -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints throughput numbers; run explicitly in release mode"]
async fn throughput_report() {
    let f = Fixture::new().await;
    for (len, count) in [(256 * 1024usize, 64usize), (4 * MIB, 16)] {
        let kib = len / 1024;
        let rounds = (1 << 30) / (len * count);
        let memcpy = best_of(|| measure_memcpy(len, count, rounds)).await;
        for threads in [1usize, 2] {
            let shm = ShmTransport::new(&f.peer, ShmConfig { copy_threads: threads, ..ShmConfig::default() });
            let got = best_of(|| measure_reads(&shm, len, count, rounds)).await;
            println!(
                "{kib:>5} KiB x{count}: shm ({threads} copy thread(s)) {got:.2} GB/s, memcpy {memcpy:.2} GB/s: {:.2}x",
                got / memcpy
            );
        }
        let rounds = rounds / 4;
        for stripes in [1usize, 4] {
            let tcp = TcpTransport::new(f.addr(), TcpConfig { stripes, ..tcp_config() });
            let got = best_of(|| measure_reads(&tcp, len, count, rounds)).await;
            let raw = best_of(|| measure_raw_tcp(len, count, rounds, stripes)).await;
            println!(
                "{kib:>5} KiB x{count}: tcp ({stripes} stripe(s)) {got:.2} GB/s, raw tokio tcp {raw:.2} GB/s: {:.2}x",
                got / raw
            );
        }
    }
}
