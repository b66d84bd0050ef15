//! The cluster token on a real master and storage node (in this process,
//! real loopback sockets): their gRPC services refuse calls without it or
//! with a wrong one, the tcp data plane serves neither reads nor writes to a
//! connection that did not open with it, malformed handshakes are refused
//! without disturbing the server, and a client holding the token works.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use tandem_kvstore::client::{ClientConfig, StoreClient};
use tandem_kvstore::grant::WriteGrant;
use tandem_kvstore::master::{self, MasterConfig};
use tandem_kvstore::node::{self, StorageConfig};
use tandem_kvstore::transport::frame::{self, FrameHeader, Opcode, Status, HEADER_LEN};
use tandem_kvstore::transport::{
    ReadOp, TcpConfig, TcpTransport, TransferError, Transport, TransportConfig, TransportPreference, WriteOp,
};
use tandem_kvstore::types::Location;
use tandem_proto::cluster_token::{authed, AuthChannel, ClusterToken};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_client::MasterClient;
use tandem_proto::kvstore::storage_node_client::StorageNodeClient;
use tandem_proto::BlockKey;

const TOKEN: &str = "cluster-token-0123456789abcdef";
const WRONG: &str = "cluster-token-0123456789abcdeX";
const BLOCK: usize = 4096;

fn token(t: &str) -> ClusterToken {
    ClusterToken::new(t).unwrap()
}

use common::OneNode as Store;

async fn start_store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MasterConfig { cluster_token: Some(token(TOKEN)), ..common::master_config() };
    let master = master::serve(cfg).await.unwrap();
    let cfg = StorageConfig {
        cluster_token: Some(token(TOKEN)),
        ..common::storage_config("n0", &master, dir.path(), 4 << 20, 4 << 20)
    };
    let node = node::start(cfg).await.unwrap();
    let store = Store { master, node, _dir: dir };
    common::wait_for("the node to register with the token", || async {
        !store.master_with(Some(TOKEN)).await.stats(pb::StatsRequest {}).await.unwrap().into_inner().nodes.is_empty()
    })
    .await;
    store
}

async fn channel(addr: std::net::SocketAddr, t: Option<&str>) -> AuthChannel {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    authed(ch, t.map(token).as_ref())
}

impl Store {
    async fn master_with(&self, t: Option<&str>) -> MasterClient<AuthChannel> {
        MasterClient::new(channel(self.master.local_addr(), t).await)
    }

    fn data(&self, t: Option<&str>) -> TcpTransport {
        let cfg = TcpConfig { cluster_token: t.map(token), op_timeout_ms: 5_000, ..TcpConfig::default() };
        TcpTransport::new(self.node.peer.data_addr, cfg)
    }

    fn client(&self, t: Option<&str>) -> StoreClient {
        let cfg = ClientConfig {
            master: self.master.local_addr().to_string(),
            transport: TransportConfig { prefer: TransportPreference::Tcp, ..TransportConfig::default() },
            cluster_token: t.map(token),
            ..ClientConfig::default()
        };
        StoreClient::new(cfg).unwrap()
    }
}

fn bytes(seed: u8) -> Vec<u8> {
    (0..BLOCK).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn read(t: &TcpTransport, at: Location) -> Result<Vec<u8>, TransferError> {
    let mut buf = vec![0u8; BLOCK];
    let mut ops = [ReadOp::new(at, &mut buf)];
    t.read(&mut ops).await.remove(0)?;
    Ok(buf)
}

async fn write(t: &TcpTransport, at: Location, src: &[u8], grant: &WriteGrant) -> Result<(), TransferError> {
    t.write(&[WriteOp { dst: at, src, grant: Some(*grant) }]).await.remove(0)
}

fn assert_refused(r: Result<impl std::fmt::Debug, TransferError>, what: &str) {
    match r {
        Err(TransferError::Rejected(m)) if m.contains("Unauthenticated") => {}
        other => panic!("{what}: expected an Unauthenticated refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn grpc_and_data_plane_need_the_token() {
    let store = start_store().await;

    // gRPC: the master and the node's control service refuse calls without
    // the token or with a wrong one, and serve the right one.
    for t in [None, Some(WRONG)] {
        let e = store.master_with(t).await.stats(pb::StatsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "master, token {t:?}: {e}");
        let mut n = StorageNodeClient::new(channel(store.node.control_addr, t).await);
        let e = n.node_stats(pb::NodeStatsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "node, token {t:?}: {e}");
    }
    let e = store.master_with(None).await.stats(pb::StatsRequest {}).await.unwrap_err();
    assert!(e.message().contains("cluster token"), "the refusal says why: {e}");
    let mut n = StorageNodeClient::new(channel(store.node.control_addr, Some(TOKEN)).await);
    n.node_stats(pb::NodeStatsRequest {}).await.unwrap();

    // A store client with the token puts and gets; without it, neither.
    let good = store.client(Some(TOKEN));
    let block = bytes(1);
    good.put(&[(BlockKey(1), &block)]).await.unwrap();
    assert_eq!(good.get(&[BlockKey(1)], BLOCK).await.unwrap(), vec![Some(block.clone())]);
    assert!(store.client(None).get(&[BlockKey(1)], BLOCK).await.is_err(), "no token: the master refuses");

    // The data plane: find where block 1 sits, and reserve a range for
    // block 2 (with its write grant) the way a writer would.
    let mut m = store.master_with(Some(TOKEN)).await;
    let keys = m.list_keys(pb::ListKeysRequest { after: 0, limit: 10 }).await.unwrap().into_inner().keys;
    let r = &keys.iter().find(|k| k.key == 1).unwrap().replicas[0];
    let stored = Location::Dram { segment: r.segment, offset: r.offset };
    let req = pb::PutStartRequest { items: vec![pb::PutItem { key: 2, len: BLOCK as u64 }], ..Default::default() };
    let reply = m.put_start(req).await.unwrap().into_inner();
    let p = &reply.slots[0].placements[0];
    let reserved = Location::Dram { segment: p.segment, offset: p.offset };
    let grant = WriteGrant::decode(&p.write_grant).unwrap();

    let right = store.data(Some(TOKEN));
    for t in [None, Some(WRONG)] {
        let other = store.data(t);
        assert_refused(read(&other, stored).await, &format!("read with token {t:?}"));
        assert_refused(write(&other, reserved, &bytes(9), &grant).await, &format!("write with token {t:?}"));
        assert_refused(write(&other, stored, &bytes(9), &grant).await, &format!("overwrite with token {t:?}"));
    }
    // Nothing the refused connections sent landed.
    assert_eq!(read(&right, stored).await.unwrap(), block);
    assert_eq!(read(&right, reserved).await.unwrap(), vec![0u8; BLOCK]);
    // The right token reads and writes.
    write(&right, reserved, &bytes(2), &grant).await.unwrap();
    assert_eq!(read(&right, reserved).await.unwrap(), bytes(2));
    store.stop().await;
}

/// Sends `bytes` on a fresh connection to the data port and returns the
/// server's first reply frame (`None`: it closed without one).
fn exchange(addr: std::net::SocketAddr, bytes: &[u8], half_close: bool) -> Option<(FrameHeader, String)> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw).ok()?;
    let h = FrameHeader::decode(&raw).expect("a well-formed reply");
    let mut msg = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut msg).unwrap();
    Some((h, String::from_utf8_lossy(&msg).into_owned()))
}

fn assert_unauthenticated(reply: Option<(FrameHeader, String)>, what: &str) -> String {
    let (h, msg) = reply.unwrap_or_else(|| panic!("{what}: closed without an error frame"));
    assert_eq!(h.op(), Some(Opcode::Error), "{what}");
    assert_eq!(Status::from_u16(h.status), Status::Unauthenticated, "{what}: {msg}");
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_are_refused_and_the_server_keeps_serving() {
    let store = start_store().await;
    let good = store.client(Some(TOKEN));
    good.put(&[(BlockKey(7), &bytes(7))]).await.unwrap();
    let addr = store.node.peer.data_addr;
    let hello = frame::hello_frame(TOKEN.as_bytes());

    let mut oversized = FrameHeader::new(Opcode::Hello, 1);
    oversized.count = 1;
    oversized.payload_len = 1 << 30;
    let mut bad_trailer = hello.clone();
    *bad_trailer.last_mut().unwrap() ^= 1;
    let mut read_first = FrameHeader::new(Opcode::Read, 1);
    read_first.count = 1;
    read_first.len = BLOCK as u64;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xab; 200]),
        ("oversized token", oversized.encode().to_vec()),
        ("bad trailer", bad_trailer),
        ("a read before the handshake", read_first.encode().to_vec()),
        ("a wrong token", frame::hello_frame(WRONG.as_bytes())),
        ("an empty token", frame::hello_frame(b"")),
    ];
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (what, bytes) in cases {
            out.push((what, assert_unauthenticated(exchange(addr, &bytes, false), what)));
        }
        // Truncated: half a header, then the client stops sending. The
        // server closes the connection (no reply can be framed for it).
        let truncated = exchange(addr, &hello[..HEADER_LEN / 2], true);
        assert!(truncated.is_none(), "a truncated handshake gets no reply: {truncated:?}");
        // Truncated inside the token.
        let cut = exchange(addr, &hello[..HEADER_LEN + 4], true);
        assert!(cut.is_none(), "a handshake cut in its token gets no reply: {cut:?}");
        // The right handshake is answered HELLO_OK.
        let (h, _) = exchange(addr, &hello, false).expect("a reply");
        assert_eq!(h.op(), Some(Opcode::HelloOk));
        out
    })
    .await
    .unwrap();
    let msgs: Vec<String> = results.iter().map(|(w, m)| format!("{w}: {m}")).collect();
    assert!(msgs[0].contains("HELLO"), "{msgs:?}");
    assert!(msgs[1].contains("at most"), "{msgs:?}");
    assert!(msgs[4].contains("wrong cluster token"), "{msgs:?}");

    // Still serving: the honest client reads its block.
    assert_eq!(good.get(&[BlockKey(7)], BLOCK).await.unwrap(), vec![Some(bytes(7))]);
    store.stop().await;
}
