//! Malformed and hostile control-plane requests get clear gRPC errors (never
//! a panic, never a leak), and the master keeps serving afterwards.

use tandem_kvstore::master::{self, MasterConfig};
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_client::MasterClient;
use tonic::Code;

/// The error of a call that must fail.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Status {
    r.expect_err("the request should have been rejected")
}

async fn master() -> (master::MasterHandle, MasterClient<tonic::transport::Channel>) {
    let cfg = MasterConfig { listen: "127.0.0.1:0".parse().unwrap(), max_batch: 64, ..MasterConfig::default() };
    let handle = master::serve(cfg).await.unwrap();
    let client = MasterClient::connect(format!("http://{}", handle.local_addr())).await.unwrap();
    (handle, client)
}

fn endpoint(name: &str, data_addr: &str) -> pb::NodeEndpoint {
    pb::NodeEndpoint {
        name: name.into(),
        incarnation: 1,
        control_addr: "127.0.0.1:1".into(),
        data_addr: data_addr.into(),
        host_id: "h".into(),
        segments: vec![pb::SegmentInfo { id: 0, bytes: 1 << 20, path: "/nonexistent".into() }],
        ssd_dir: String::new(),
    }
}

#[tokio::test]
async fn malformed_requests_are_rejected_with_reasons() {
    let (handle, mut m) = master().await;

    // Oversized batches.
    let items = (0..65).map(|k| pb::PutItem { key: k, len: 10 }).collect();
    let e = code(m.put_start(pb::PutStartRequest { items, ..Default::default() }).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit 64"), "{}", e.message());
    let e = code(m.get_replicas(pb::GetReplicasRequest { keys: (0..65).collect(), lease_ms: 0 }).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = code(m.lookup(pb::LookupRequest { keys: (0..1000).collect() }).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = code(m.touch(pb::TouchRequest { keys: (0..65).collect() }).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    // Touching keys nobody stored is harmless: none found.
    assert_eq!(m.touch(pb::TouchRequest { keys: vec![7, 8] }).await.unwrap().into_inner().found, 0);

    // Registrations that make no sense.
    let reg = |ep: Option<pb::NodeEndpoint>| pb::RegisterNodeRequest { endpoint: ep, ..Default::default() };
    let e = code(m.register_node(reg(None)).await);
    assert!(e.message().contains("endpoint missing"));
    let e = code(m.register_node(reg(Some(endpoint("", "127.0.0.1:5")))).await);
    assert!(e.message().contains("name is empty"));
    let e = code(m.register_node(reg(Some(endpoint("a", "not an address")))).await);
    assert!(e.message().contains("host:port"), "{}", e.message());
    let e = code(m.register_node(reg(Some(endpoint(&"x".repeat(10_000), "127.0.0.1:5")))).await);
    assert!(e.message().contains("limit"));
    let mut dup = endpoint("a", "127.0.0.1:5");
    dup.segments.push(dup.segments[0].clone());
    let e = code(m.register_node(reg(Some(dup))).await);
    assert!(e.message().contains("repeated"));
    let mut empty = endpoint("a", "127.0.0.1:5");
    empty.segments[0].bytes = 0;
    let e = code(m.register_node(reg(Some(empty))).await);
    assert!(e.message().contains("no bytes"));

    // Unknown puts, unknown leases, bad replicas, unknown keys.
    let e =
        code(m.put_end(pb::PutEndRequest { put_id: 12345, items: vec![pb::PutDone { key: 1, checksum: 2 }] }).await);
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(m.put_revoke(pb::PutRevokeRequest { put_id: 999 }).await.unwrap().into_inner().revoked, 0);
    m.release_lease(pb::ReleaseLeaseRequest { lease_id: 777 }).await.unwrap();
    let bad = pb::Replica { node: "a".into(), tier: 99, ..Default::default() };
    let e = code(
        m.report_bad_replica(pb::ReportBadReplicaRequest { key: 1, replica: Some(bad), reason: "x".into() }).await,
    );
    assert!(e.message().contains("unknown tier"));
    let r = m.get_replicas(pb::GetReplicasRequest { keys: vec![1, 2, 3], lease_ms: 0 }).await.unwrap().into_inner();
    assert!(r.entries.iter().all(|e| !e.found));
    assert_eq!(r.lease_id, 0, "no lease for misses");

    // A put of zero length is a malformed request; an absurd length, with
    // no node at all, is a per-key answer.
    let items = vec![pb::PutItem { key: 1, len: 0 }, pb::PutItem { key: 2, len: 10 }];
    let e = code(m.put_start(pb::PutStartRequest { items, ..Default::default() }).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("length 0"), "{}", e.message());
    let items = vec![pb::PutItem { key: 2, len: u64::MAX }];
    let r = m.put_start(pb::PutStartRequest { items, ..Default::default() }).await.unwrap().into_inner();
    assert!(r.slots.iter().all(|s| s.status == pb::PutStatus::TooLarge as i32));

    // A node must hand over its 32-byte grant key.
    let mut short = reg(Some(endpoint("a", "127.0.0.1:5")));
    short.grant_key = vec![1; 16];
    let e = code(m.register_node(short).await);
    assert!(e.message().contains("grant_key is 16 bytes"), "{}", e.message());

    // Still serving, nothing leaked.
    let s = m.stats(pb::StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((s.pending_puts, s.active_leases, s.objects), (0, 0, 0));
    handle.shutdown().await;
}
