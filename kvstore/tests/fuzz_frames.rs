//! Fuzz targets of the tcp data plane (`transport::frame`):
//!
//! - `frame_header`: [`FrameHeader::decode`] on arbitrary 64-byte headers,
//!   valid ones, valid ones mutated, and mutations re-sealed with a correct
//!   checksum (so the fields behind the checksum are reached). Its answer
//!   must equal a reference model of the table in `frame.rs`.
//! - `tcp_server_stream`: byte streams sent to a real [`DataServer`] on
//!   loopback: generated request sequences (valid and invalid fields,
//!   payloads with right and wrong trailers), then mutated. The server must
//!   answer only with well-formed frames, close or serve without hanging,
//!   never panic, and keep serving other clients.
//!
//! See `fuzz/README.md`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tandem_kvstore::segment::Segment;
use tandem_kvstore::transport::frame::{
    self, FrameHeader, HeaderError, Opcode, HEADER_LEN, MAGIC, MAX_ERROR_MESSAGE, TRAILER_LEN, VERSION,
};
use tandem_kvstore::transport::{DataServer, DataTarget, TcpConfig, TransferError};
use tandem_proto::BlockKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twox_hash::XxHash3_64;
fn xxh3_64(b: &[u8]) -> u64 {
    XxHash3_64::oneshot(b)
}

// ----------------------------------------------------------- frame_header

fn header_fields() -> impl Strategy<Value = FrameHeader> {
    let opcode = prop_oneof![
        Just(Opcode::Read as u8),
        Just(Opcode::ReadSsd as u8),
        Just(Opcode::Write as u8),
        Just(Opcode::RdmaConnect as u8),
        Just(Opcode::Data as u8),
        Just(Opcode::WriteOk as u8),
        Just(Opcode::Error as u8),
        any::<u8>(),
    ];
    let small_or_any = || prop_oneof![0u64..8192, any::<u64>()];
    (opcode, any::<u8>(), any::<u64>(), any::<u32>(), any::<u32>(), small_or_any(), small_or_any(), small_or_any())
        .prop_flat_map(|(opcode, flags, request_id, count, segment, offset, len, payload_len)| {
            any::<u16>().prop_map(move |status| FrameHeader {
                version: VERSION,
                opcode,
                flags,
                request_id,
                count,
                segment,
                offset,
                len,
                payload_len,
                status,
            })
        })
}

/// Rewrites the checksum of a 64-byte header so that it matches bytes 0..56.
fn reseal(b: &mut [u8]) {
    let sum = xxh3_64(&b[..56]);
    b[56..64].copy_from_slice(&sum.to_le_bytes());
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The header table of `frame.rs`, written out independently.
fn reference_decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, HeaderError> {
    if b[..4] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(HeaderError::VersionMismatch { theirs: version });
    }
    if xxh3_64(&b[..56]) != le_u64(b, 56) {
        return Err(HeaderError::BadChecksum);
    }
    Ok(FrameHeader {
        version,
        opcode: b[6],
        flags: b[7],
        request_id: le_u64(b, 8),
        count: le_u32(b, 16),
        segment: le_u32(b, 20),
        offset: le_u64(b, 24),
        len: le_u64(b, 32),
        payload_len: le_u64(b, 40),
        status: u16::from_le_bytes([b[48], b[49]]),
    })
}

fn check_header(input: &[u8]) -> Result<(), String> {
    let mut raw = [0u8; HEADER_LEN];
    let n = input.len().min(HEADER_LEN);
    raw[..n].copy_from_slice(&input[..n]);
    let (got, alloc) = harness::measure(|| FrameHeader::decode(&raw));
    if alloc.peak_bytes != 0 {
        return Err(format!("decoding a header allocated {alloc:?}"));
    }
    let want = reference_decode(&raw);
    if got != want {
        return Err(format!("decode gave {got:?}, the header table says {want:?}"));
    }
    if let Ok(h) = got {
        // Re-encoding gives the same bytes, except the reserved bytes
        // 50..56, which the decoder ignores and the encoder zeroes.
        let mut expect = raw;
        expect[50..56].fill(0);
        reseal(&mut expect);
        if h.encode() != expect {
            return Err(format!("{h:?} does not re-encode to the bytes it was decoded from"));
        }
    }
    Ok(())
}

#[test]
fn frame_headers_decode_exactly_as_the_table_says() {
    let seeds: Vec<Vec<u8>> = harness::corpus("frame_header").into_iter().map(|(_, b)| b).collect();
    let valid = header_fields().prop_map(|h| h.encode().to_vec()).boxed();
    let resealed = harness::mutated_from(valid.clone(), seeds.clone())
        .prop_map(|mut b| {
            b.resize(HEADER_LEN, 0);
            reseal(&mut b);
            b
        })
        .boxed();
    let strategy = prop_oneof![
        valid.clone(),
        harness::mutated_from(valid, seeds.clone()),
        resealed,
        harness::mutated(seeds),
        proptest::collection::vec(any::<u8>(), HEADER_LEN),
    ]
    .boxed();
    harness::fuzz("frame_header", 4096, strategy, check_header);
}

#[test]
fn every_single_bit_flip_of_a_valid_header_is_refused() {
    let strategy = (header_fields(), 0..HEADER_LEN * 8)
        .prop_map(|(h, bit)| {
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            b.to_vec()
        })
        .boxed();
    harness::fuzz("frame_header", 2048, strategy, |b| {
        check_header(b)?;
        match b.len() == HEADER_LEN && b[..4] == MAGIC && b[4..6] == VERSION.to_le_bytes() {
            // Corpus entries are not all bit flips; the table check covers them.
            false => Ok(()),
            true => match FrameHeader::decode(b.try_into().unwrap()) {
                Ok(h) if xxh3_64(&b[..56]) != le_u64(b, 56) => Err(format!("accepted a damaged header: {h:?}")),
                _ => Ok(()),
            },
        }
    });
}

// ------------------------------------------------------ tcp_server_stream

const SEGMENT_BYTES: u64 = 1 << 20;
const MAX_FRAME: u64 = 256 << 10;
const SSD_KEY: u64 = 7;

struct Node {
    segments: Vec<Arc<Segment>>,
}

impl DataTarget for Node {
    fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        self.segments.get(id as usize).cloned()
    }

    fn read_ssd(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), TransferError> {
        if key.0 != SSD_KEY {
            return Err(TransferError::NotFound);
        }
        dst.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        Ok(())
    }
}

/// Panics on the server's threads (named `fuzz-data-server`).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_some_and(|n| n.starts_with("fuzz-data-server")) {
            SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
        }
        default(info);
    }));
}

/// One request as the generator writes it.
#[derive(Debug, Clone)]
struct Req {
    header: FrameHeader,
    payload: Vec<u8>,
    good_trailer: bool,
}

fn request() -> impl Strategy<Value = Req> {
    let opcode = prop_oneof![
        4 => Just(Opcode::Read as u8),
        2 => Just(Opcode::ReadSsd as u8),
        4 => Just(Opcode::Write as u8),
        1 => Just(Opcode::RdmaConnect as u8),
        1 => Just(Opcode::Data as u8),
        1 => any::<u8>(),
    ];
    let offset = prop_oneof![0u64..SEGMENT_BYTES, Just(SSD_KEY), Just(SEGMENT_BYTES - 1), any::<u64>()];
    let len = prop_oneof![4 => 0u64..4096, 1 => Just(MAX_FRAME), 1 => Just(MAX_FRAME + 1), 1 => any::<u64>()];
    let count = prop_oneof![Just(1u32), 0u32..4, any::<u32>()];
    let segment = prop_oneof![Just(0u32), Just(1), any::<u32>()];
    (opcode, offset, len, count, segment, prop::bool::weighted(0.9), prop::bool::weighted(0.95), 1u64..1000).prop_map(
        |(opcode, offset, len, count, segment, clean, good_trailer, id)| {
            let mut header = FrameHeader::new(Opcode::Read, id);
            header.opcode = opcode;
            (header.offset, header.len, header.count, header.segment) = (offset, len, count, segment);
            let carries = opcode == Opcode::Write as u8 || opcode == Opcode::RdmaConnect as u8;
            header.payload_len = if carries { len } else { 0 };
            if !clean {
                header.flags = 1;
                header.request_id = 0;
            }
            // Only payloads the test can afford are written out; a header
            // promising more is cut short by the end of the stream.
            let payload = vec![0xa5; header.payload_len.min(8192) as usize];
            Req { header, payload, good_trailer }
        },
    )
}

fn stream_bytes(reqs: &[Req]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in reqs {
        out.extend_from_slice(&r.header.encode());
        if !r.payload.is_empty() {
            out.extend_from_slice(&r.payload);
            let sum = frame::payload_checksum(&r.payload) ^ u64::from(!r.good_trailer);
            out.extend_from_slice(&sum.to_le_bytes());
        }
    }
    out
}

fn streams() -> BoxedStrategy<Vec<u8>> {
    proptest::collection::vec(request(), 1..6).prop_map(|r| stream_bytes(&r)).boxed()
}

/// Sends `bytes` on a fresh connection while reading every reply; checks
/// each reply is a sealed frame with a matching trailer.
async fn exchange(addr: SocketAddr, bytes: Vec<u8>) -> Result<Vec<(FrameHeader, Vec<u8>)>, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The server may hang up first; that is an allowed answer.
        let _ = w.write_all(&bytes).await;
        let _ = w.shutdown().await;
    });
    let mut replies = Vec::new();
    loop {
        let mut raw = [0u8; HEADER_LEN];
        match r.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            // A reset after the server closed: nothing more to read.
            Err(_) => break,
        }
        let n = replies.len();
        let h = FrameHeader::decode(&raw).map_err(|e| format!("reply #{n}: {e}"))?;
        let op = h.op().ok_or_else(|| format!("reply #{n} has opcode {:#04x}", h.opcode))?;
        let limit = match op {
            Opcode::Data => MAX_FRAME,
            Opcode::Error => MAX_ERROR_MESSAGE as u64,
            // `HELLO_OK` answers a `HELLO` (opcode 5, reached by `any::<u8>()`).
            Opcode::WriteOk | Opcode::HelloOk => 0,
            other => return Err(format!("reply #{n} is a {other:?}")),
        };
        if h.payload_len > limit || (op == Opcode::Data && h.len != h.payload_len) {
            return Err(format!("reply #{n}: {h:?}"));
        }
        let mut data = Vec::new();
        if h.payload_len > 0 {
            let mut payload = vec![0u8; h.payload_len as usize + TRAILER_LEN];
            r.read_exact(&mut payload).await.map_err(|e| format!("reply #{n} cut short: {e}"))?;
            let trailer = payload.split_off(h.payload_len as usize);
            if u64::from_le_bytes(trailer.try_into().unwrap()) != frame::payload_checksum(&payload) {
                return Err(format!("reply #{n}: trailer mismatch"));
            }
            data = payload;
        }
        replies.push((h, data));
    }
    writer.await.map_err(|e| format!("writer: {e}"))?;
    Ok(replies)
}

#[test]
fn the_data_server_answers_any_stream_with_sealed_frames_and_stays_up() {
    count_server_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fuzz-data-server")
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let segments = (0..2)
        .map(|i| Arc::new(Segment::create(&dir.path().join(format!("seg{i}")), SEGMENT_BYTES, false).unwrap()))
        .collect();
    let cfg = TcpConfig {
        max_frame_bytes: bytesize::ByteSize::b(MAX_FRAME),
        max_batch_ops: 64,
        io_timeout_ms: 2_000,
        ..TcpConfig::default()
    };
    let node = Arc::new(Node { segments });
    let server = rt.block_on(DataServer::bind("127.0.0.1:0".parse().unwrap(), node, cfg)).unwrap();
    let addr = server.local_addr();

    let seeds: Vec<Vec<u8>> = harness::corpus("tcp_server_stream").into_iter().map(|(_, b)| b).collect();
    let strategy = prop_oneof![streams(), harness::mutated_from(streams(), seeds.clone()), harness::mutated(seeds)];
    harness::fuzz("tcp_server_stream", 384, strategy.boxed(), |bytes| {
        let answered =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), exchange(addr, bytes.to_vec())).await });
        let panics = SERVER_PANICS.load(Ordering::SeqCst);
        if panics > 0 {
            return Err(format!("the server panicked ({panics} times)"));
        }
        answered.map_err(|_| "the server neither answered nor closed within 20 s".to_string())?.map(drop)
    });

    // A well-formed client is still served, and its bytes land.
    let block: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let mut write = FrameHeader::new(Opcode::Write, 1);
    (write.count, write.offset, write.len, write.payload_len) = (1, 4096, 3000, 3000);
    let mut bytes = write.encode().to_vec();
    bytes.extend_from_slice(&block);
    bytes.extend_from_slice(&frame::payload_checksum(&block).to_le_bytes());
    let mut read = FrameHeader::new(Opcode::Read, 2);
    (read.count, read.offset, read.len) = (1, 4096, 3000);
    bytes.extend_from_slice(&read.encode());
    let replies = rt.block_on(exchange(addr, bytes)).unwrap();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert_eq!((replies[0].0.op(), replies[0].0.request_id), (Some(Opcode::WriteOk), 1));
    assert_eq!((replies[1].0.op(), replies[1].0.request_id), (Some(Opcode::Data), 2));
    assert_eq!(replies[1].1, block);
    assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0);
    rt.block_on(server.shutdown());
}

/// Writes the valid seed inputs of both targets into `fuzz/corpus/`
/// (`-- --ignored write_frame_seed_corpus`); found crashes sit beside them.
#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_frame_seed_corpus() {
    let dir = harness::fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(dir.join(target)).unwrap();
        std::fs::write(dir.join(target).join(name), bytes).unwrap();
    };
    let req = |op: Opcode, id: u64, offset: u64, len: u64| {
        let mut h = FrameHeader::new(op, id);
        (h.count, h.offset, h.len) = (1, offset, len);
        if op == Opcode::Write {
            h.payload_len = len;
        }
        h
    };
    put("frame_header", "read.bin", &req(Opcode::Read, 1, 0, 4096).encode());
    put("frame_header", "write.bin", &req(Opcode::Write, 9, 1 << 40, 1 << 20).encode());
    put("frame_header", "error-reply.bin", &frame::error_frame(3, frame::Status::Busy, "busy")[..HEADER_LEN]);
    let mut v2 = req(Opcode::Read, 1, 0, 1);
    v2.version = VERSION + 1;
    put("frame_header", "version-2.bin", &v2.encode());

    let block = vec![0x5au8; 1000];
    let write = |id: u64, offset: u64, good: bool| Req {
        header: req(Opcode::Write, id, offset, block.len() as u64),
        payload: block.clone(),
        good_trailer: good,
    };
    let plain = |h: FrameHeader| Req { header: h, payload: Vec::new(), good_trailer: true };
    put(
        "tcp_server_stream",
        "write-then-read.bin",
        &stream_bytes(&[write(1, 0, true), plain(req(Opcode::Read, 2, 0, block.len() as u64))]),
    );
    put("tcp_server_stream", "bad-trailer-then-write.bin", &stream_bytes(&[write(1, 0, false), write(2, 4096, true)]));
    put(
        "tcp_server_stream",
        "ssd-hit-and-miss.bin",
        &stream_bytes(&[plain(req(Opcode::ReadSsd, 1, SSD_KEY, 512)), plain(req(Opcode::ReadSsd, 2, 99, 512))]),
    );
    let mut batch = req(Opcode::Read, 1, 0, 10);
    batch.count = 3;
    let mut oob = req(Opcode::Read, 2, SEGMENT_BYTES - 5, 10);
    oob.count = 2;
    put("tcp_server_stream", "batch-with-out-of-bounds.bin", &stream_bytes(&[plain(batch), plain(oob)]));
    put("tcp_server_stream", "version-2.bin", &v2.encode());
}

/// Found by `tcp_server_stream`: a read answered in full, then one byte of
/// the next header, a write whose payload is cut short, or garbage, and a
/// half-close. The server dropped the reply's trailer, still in its write
/// buffer, when the connection ended.
#[test]
fn regression_replies_before_a_partial_header_are_flushed() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let seg = Arc::new(Segment::create(&dir.path().join("seg0"), SEGMENT_BYTES, false).unwrap());
    let cfg = TcpConfig { max_frame_bytes: bytesize::ByteSize::b(MAX_FRAME), ..TcpConfig::default() };
    let server =
        rt.block_on(DataServer::bind("127.0.0.1:0".parse().unwrap(), Arc::new(Node { segments: vec![seg] }), cfg));
    let server = server.unwrap();
    let crashes =
        ["crash-read-then-partial-header.bin", "crash-read-then-cut-write-payload.bin", "crash-read-then-garbage.bin"];
    for name in crashes {
        let input = harness::corpus_file("tcp_server_stream", name);
        let replies = rt.block_on(exchange(server.local_addr(), input)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(replies.len(), 1, "{name}");
        assert_eq!((replies[0].0.op(), replies[0].1.len() as u64), (Some(Opcode::Data), MAX_FRAME), "{name}");
    }
}
