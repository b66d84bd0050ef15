//! Clients that lie, against a real master and storage node (in this
//! process, real sockets and shared-memory files): sizes that make no sense,
//! writes past or outside their reservation or into someone else's, forged
//! put ids and grants, checksums that do not match the bytes, and puts that
//! are never finished. Each is refused or reclaimed, and the honest client
//! next to it keeps its bytes.

mod common;

use std::time::{Duration, Instant};

use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::client::{BlockWrite, ClientConfig, PutOutcome, StoreClient};
use tandem_kvstore::grant::{GrantKey, WriteGrant};
use tandem_kvstore::master::{self, MasterConfig};
use tandem_kvstore::node;
use tandem_kvstore::transport::{
    ReadOp, TcpConfig, TcpTransport, TransferError, Transport, TransportConfig, TransportPreference, WriteOp,
};
use tandem_kvstore::types::Location;
use tandem_proto::kvstore as pb;
use tandem_proto::kvstore::master_client::MasterClient;
use tandem_proto::kvstore::storage_node_client::StorageNodeClient;
use tandem_proto::BlockKey;
use tonic::transport::Channel;

const BLOCK: usize = 4096;
const SEGMENT: u64 = 4 << 20;

fn block(key: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (key as usize).wrapping_mul(131).wrapping_add(i * 7 + i / 251) as u8).collect()
}

use common::OneNode as Store;

async fn start_store(put_timeout_ms: u64) -> Store {
    let dir = tempfile::tempdir().unwrap();
    let cfg = MasterConfig { node_timeout_ms: 5_000, put_timeout_ms, ..common::master_config() };
    let master = master::serve(cfg).await.unwrap();
    // One segment, so consecutive reservations are neighbours.
    let cfg = common::storage_config("n0", &master, dir.path(), SEGMENT, SEGMENT);
    let node = node::start(cfg).await.unwrap();
    let store = Store { master, node, _dir: dir };
    common::wait_for("the node to register", || async { !store.stats().await.nodes.is_empty() }).await;
    store
}

impl Store {
    /// An honest client on the network data plane (where grants are checked).
    fn client(&self) -> StoreClient {
        let cfg = ClientConfig {
            master: self.master.local_addr().to_string(),
            transport: TransportConfig { prefer: TransportPreference::Tcp, ..TransportConfig::default() },
            ..ClientConfig::default()
        };
        StoreClient::new(cfg).unwrap()
    }

    /// A hostile client's raw handles: the master's gRPC and the node's data port.
    async fn raw(&self) -> (MasterClient<Channel>, TcpTransport) {
        let m = MasterClient::connect(format!("http://{}", self.master.local_addr())).await.unwrap();
        (m, TcpTransport::new(self.node.peer.data_addr, TcpConfig::default()))
    }

    async fn stats(&self) -> pb::StatsReply {
        let mut m = MasterClient::connect(format!("http://{}", self.master.local_addr())).await.unwrap();
        m.stats(pb::StatsRequest {}).await.unwrap().into_inner()
    }

    /// (DRAM bytes in use, objects, pending puts).
    async fn usage(&self) -> (u64, u64, u64) {
        let s = self.stats().await;
        let dram = s.nodes[0].tiers.iter().find(|t| t.tier == pb::Tier::Dram as i32).map_or(0, |t| t.used);
        (dram, s.objects, s.pending_puts)
    }

    async fn node_counter(&self, name: &str) -> u64 {
        let mut c = StorageNodeClient::connect(format!("http://{}", self.node.control_addr)).await.unwrap();
        let reply = c.node_stats(pb::NodeStatsRequest {}).await.unwrap().into_inner();
        reply.counters.get(name).copied().unwrap_or(0)
    }
}

/// A reservation as a hostile client sees it.
struct Reserved {
    put_id: u64,
    segment: u32,
    offset: u64,
    grant: WriteGrant,
}

async fn reserve(m: &mut MasterClient<Channel>, key: u64, len: u64) -> Reserved {
    let req = pb::PutStartRequest { items: vec![pb::PutItem { key, len }], ..Default::default() };
    let reply = m.put_start(req).await.unwrap().into_inner();
    let slot = &reply.slots[0];
    assert_eq!(slot.status, pb::PutStatus::Reserved as i32, "key {key}");
    let p = &slot.placements[0];
    Reserved {
        put_id: reply.put_id,
        segment: p.segment,
        offset: p.offset,
        grant: WriteGrant::decode(&p.write_grant).expect("put_start hands out a grant"),
    }
}

async fn write(
    t: &TcpTransport,
    segment: u32,
    offset: u64,
    src: &[u8],
    grant: Option<WriteGrant>,
) -> Result<(), TransferError> {
    let op = WriteOp { dst: Location::Dram { segment, offset }, src, grant };
    t.write(&[op]).await.remove(0)
}

fn assert_denied(r: Result<(), TransferError>, what: &str) {
    match r {
        Err(TransferError::Rejected(msg)) if msg.starts_with("Denied") => {}
        other => panic!("{what}: expected the node to deny the write, got {other:?}"),
    }
}

async fn raw_bytes(t: &TcpTransport, segment: u32, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let r = t.read(&mut [ReadOp::new(Location::Dram { segment, offset }, &mut buf)]).await.remove(0);
    r.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_that_make_no_sense_are_refused() {
    let store = start_store(30_000).await;
    let (mut m, _) = store.raw().await;
    let start = |items: Vec<(u64, u64)>| pb::PutStartRequest {
        items: items.into_iter().map(|(key, len)| pb::PutItem { key, len }).collect(),
        ..Default::default()
    };
    let e = m.put_start(start(vec![(1, 10), (2, 0)])).await.expect_err("a zero-length block");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("0000000000000002 has length 0"), "{}", e.message());

    // Over the largest segment, over the largest block, absurd: per key.
    let r = m.put_start(start(vec![(3, SEGMENT + 1), (4, 1 << 40), (5, u64::MAX)])).await.unwrap().into_inner();
    assert!(r.slots.iter().all(|s| s.status == pb::PutStatus::TooLarge as i32 && s.placements.is_empty()));
    // Half a segment fits twice; the third has no space (the first two are
    // pending, so nothing can be evicted for it).
    let half = SEGMENT / 2;
    let r = m.put_start(start(vec![(6, half), (7, half), (8, half)])).await.unwrap().into_inner();
    let statuses: Vec<i32> = r.slots.iter().map(|s| s.status).collect();
    let (ok, full) = (pb::PutStatus::Reserved as i32, pb::PutStatus::NoSpace as i32);
    assert_eq!(statuses, vec![ok, ok, full]);
    let revoked = m.put_revoke(pb::PutRevokeRequest { put_id: r.put_id }).await.unwrap().into_inner().revoked;
    assert_eq!(revoked, 2);
    assert_eq!(store.usage().await, (0, 0, 0), "nothing reserved is left behind");
    store.stop().await;
}

/// A writer may only touch the range it reserved: writes past its end, at
/// someone else's range, with no grant, a forged grant or a tampered one
/// are refused before a byte lands, and the neighbour's block is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_outside_the_reservation_are_refused_and_touch_nothing() {
    let store = start_store(30_000).await;
    let (mut m, raw) = store.raw().await;
    let honest = store.client();
    // The hostile reservation first, so the honest block sits right after it.
    let mine = reserve(&mut m, 10, BLOCK as u64).await;
    let theirs = block(11, BLOCK);
    assert_eq!(honest.put(&[(BlockKey(11), &theirs)]).await.unwrap(), vec![PutOutcome::Stored]);
    let keys = m.list_keys(pb::ListKeysRequest { after: 0, limit: 10 }).await.unwrap().into_inner().keys;
    let info = keys.iter().find(|k| k.key == 11).unwrap();
    let (seg, at) = (info.replicas[0].segment, info.replicas[0].offset);
    assert_eq!((seg, at), (mine.segment, mine.offset + BLOCK as u64), "the blocks are neighbours");
    let before = raw_bytes(&raw, seg, at, BLOCK).await;
    assert_eq!(before, theirs);

    let junk = vec![0xa5u8; 2 * BLOCK];
    let g = Some(mine.grant);
    assert_denied(write(&raw, mine.segment, mine.offset, &junk, g).await, "past the end of the reservation");
    assert_denied(write(&raw, seg, at, &junk[..BLOCK], g).await, "at the neighbour with my grant");
    let straddle = mine.offset + BLOCK as u64 / 2;
    assert_denied(write(&raw, mine.segment, straddle, &junk[..BLOCK], g).await, "across the reservation's end");
    assert_denied(write(&raw, seg, at, &junk[..BLOCK], None).await, "without a grant");
    let forged = WriteGrant::mint(&GrantKey::random(), mine.put_id, u64::MAX, (seg, at, BLOCK as u64), u64::MAX);
    assert_denied(write(&raw, seg, at, &junk[..BLOCK], Some(forged)).await, "with a forged grant");
    let mut stretched = mine.grant;
    stretched.len = 2 * BLOCK as u64;
    assert_denied(write(&raw, mine.segment, mine.offset, &junk, Some(stretched)).await, "with a stretched grant");
    assert_eq!(store.node_counter("writes_denied").await, 6);

    // The neighbour's bytes, on the node and as a reader gets them.
    assert_eq!(raw_bytes(&raw, seg, at, BLOCK).await, theirs, "the neighbour's bytes changed");
    assert_eq!(info.checksum, BlockChecksum::of(&theirs).0);
    assert_eq!(honest.get(&[BlockKey(11)], BLOCK).await.unwrap(), vec![Some(theirs.clone())]);

    // The grant does work for what it covers, in pieces too.
    let own = block(10, BLOCK);
    write(&raw, mine.segment, mine.offset, &own[..BLOCK / 2], g).await.unwrap();
    write(&raw, mine.segment, mine.offset + BLOCK as u64 / 2, &own[BLOCK / 2..], g).await.unwrap();
    let done = pb::PutDone { key: 10, checksum: BlockChecksum::of(&own).0 };
    let r = m.put_end(pb::PutEndRequest { put_id: mine.put_id, items: vec![done] }).await.unwrap().into_inner();
    assert_eq!(r.published, 1);
    let got = honest.get(&[BlockKey(10), BlockKey(11)], BLOCK).await.unwrap();
    assert_eq!(got, vec![Some(own), Some(theirs)]);
    store.stop().await;
}

/// Reservations belong to the put that made them: put ids are not
/// guessable from one's own, another put's keys cannot be published or
/// revoked through one's own id, and the owner's put goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clients_put_cannot_be_ended_or_revoked() {
    let store = start_store(30_000).await;
    let (mut m, raw) = store.raw().await;
    let honest = store.client();
    let theirs = block(21, BLOCK);
    let mut put = honest.put_begin(&[(BlockKey(21), BLOCK as u64)]).await.unwrap();
    let mine = reserve(&mut m, 20, BLOCK as u64).await;

    // Ids near one's own (sequential ids gave the victim's away).
    let bogus = pb::PutDone { key: 21, checksum: 0xdead };
    for guess in (mine.put_id.saturating_sub(3)..=mine.put_id.saturating_add(3)).filter(|&g| g != mine.put_id) {
        let e = m
            .put_end(pb::PutEndRequest { put_id: guess, items: vec![bogus] })
            .await
            .expect_err("a guessed put id must be unknown");
        assert_eq!(e.code(), tonic::Code::NotFound, "guess {guess}: {e:?}");
        let r = m.put_revoke(pb::PutRevokeRequest { put_id: guess }).await.unwrap().into_inner();
        assert_eq!(r.revoked, 0, "guess {guess} revoked someone's put");
    }
    // One's own id does not reach another put's keys.
    let r = m.put_end(pb::PutEndRequest { put_id: mine.put_id, items: vec![bogus] }).await.unwrap().into_inner();
    assert_eq!(r.published, 0);
    let exists = m.lookup(pb::LookupRequest { keys: vec![21] }).await.unwrap().into_inner().exists;
    assert_eq!(exists, vec![false], "the victim's block was published by someone else");
    // Nor does one's grant reach the victim's range (checked in detail above).
    let junk = vec![0x5au8; BLOCK];
    let elsewhere = if mine.offset >= BLOCK as u64 { mine.offset - BLOCK as u64 } else { mine.offset + BLOCK as u64 };
    assert_denied(write(&raw, mine.segment, elsewhere, &junk, Some(mine.grant)).await, "into the victim's range");

    honest.put_write(&mut put, &[BlockWrite { item: 0, offset: 0, bytes: &theirs }]).await;
    let outcomes = honest.put_commit(put, &[BlockChecksum::of(&theirs)]).await.unwrap();
    assert_eq!(outcomes, vec![PutOutcome::Stored]);
    assert_eq!(honest.get(&[BlockKey(21)], BLOCK).await.unwrap(), vec![Some(theirs)]);
    m.put_revoke(pb::PutRevokeRequest { put_id: mine.put_id }).await.unwrap();
    assert_eq!(store.usage().await.2, 0);
    store.stop().await;
}

/// A grant outlives its put when the put is revoked early, and the range
/// may go to someone else meanwhile: once the new owner has written, the old
/// grant is refused there, and what it wrote before is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_grant_cannot_touch_the_next_owners_bytes() {
    let store = start_store(30_000).await;
    let (mut m, raw) = store.raw().await;
    let old = reserve(&mut m, 60, BLOCK as u64).await;
    assert_eq!(m.put_revoke(pb::PutRevokeRequest { put_id: old.put_id }).await.unwrap().into_inner().revoked, 1);
    let new = reserve(&mut m, 61, BLOCK as u64).await;
    assert_eq!((new.segment, new.offset), (old.segment, old.offset), "the range went to the next put");
    let junk = vec![0x33u8; BLOCK];
    // Before the new owner writes, the old grant still works (its bytes
    // get overwritten) ...
    write(&raw, old.segment, old.offset, &junk, Some(old.grant)).await.unwrap();
    let theirs = block(61, BLOCK);
    write(&raw, new.segment, new.offset, &theirs[..BLOCK / 2], Some(new.grant)).await.unwrap();
    // ... after, it is refused, however it is cut.
    assert_denied(write(&raw, old.segment, old.offset, &junk, Some(old.grant)).await, "over the new owner's piece");
    let rest = old.offset + BLOCK as u64 / 2;
    assert_denied(write(&raw, old.segment, rest, &junk[..BLOCK / 2], Some(old.grant)).await, "beside it");
    write(&raw, new.segment, new.offset + BLOCK as u64 / 2, &theirs[BLOCK / 2..], Some(new.grant)).await.unwrap();
    let done = pb::PutDone { key: 61, checksum: BlockChecksum::of(&theirs).0 };
    assert_eq!(
        m.put_end(pb::PutEndRequest { put_id: new.put_id, items: vec![done] }).await.unwrap().into_inner().published,
        1
    );
    assert_eq!(store.client().get(&[BlockKey(61)], BLOCK).await.unwrap(), vec![Some(theirs)]);
    store.stop().await;
}

/// A put published with checksums that do not match its bytes reads as a
/// miss (never the bytes), its replica is dropped, and the key can be
/// stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_ended_with_the_wrong_checksum_reads_as_a_miss() {
    let store = start_store(30_000).await;
    let c = store.client();
    let data = block(30, BLOCK);
    let mut put = c.put_begin(&[(BlockKey(30), BLOCK as u64)]).await.unwrap();
    c.put_write(&mut put, &[BlockWrite { item: 0, offset: 0, bytes: &data }]).await;
    let lie = BlockChecksum::of(&block(31, BLOCK));
    assert_eq!(c.put_commit(put, &[lie]).await.unwrap(), vec![PutOutcome::Stored]);
    assert_eq!(c.get(&[BlockKey(30)], BLOCK).await.unwrap(), vec![None], "bad bytes must be a miss");
    assert_eq!(c.metrics().checksum_mismatches.load(std::sync::atomic::Ordering::Relaxed), 1);
    let s = store.stats().await;
    assert_eq!(s.counters.get("bad_replicas"), Some(&1));
    assert_eq!(store.usage().await, (0, 0, 0), "the bad block's space is free again");
    assert_eq!(c.put(&[(BlockKey(30), &data)]).await.unwrap(), vec![PutOutcome::Stored]);
    assert_eq!(c.get(&[BlockKey(30)], BLOCK).await.unwrap(), vec![Some(data)]);
    store.stop().await;
}

/// A put that is never finished is reclaimed after the put timeout: the
/// space and the keys are free again, and the late writer's grant and put
/// id are dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_put_is_reclaimed_after_the_timeout() {
    const TIMEOUT_MS: u64 = 300;
    let store = start_store(TIMEOUT_MS).await;
    let (mut m, raw) = store.raw().await;
    let baseline = store.usage().await;
    assert_eq!(baseline, (0, 0, 0));
    let abandoned = reserve(&mut m, 40, 3 * BLOCK as u64).await;
    let own = block(40, 3 * BLOCK);
    write(&raw, abandoned.segment, abandoned.offset, &own[..BLOCK], Some(abandoned.grant)).await.unwrap();
    let (used, _, pending) = store.usage().await;
    assert_eq!((used, pending), (3 * BLOCK as u64, 1));

    let deadline = Instant::now() + Duration::from_secs(5);
    while store.usage().await != baseline {
        assert!(Instant::now() < deadline, "the abandoned put was not reclaimed: {:?}", store.usage().await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(store.stats().await.counters.get("puts_timed_out").is_some_and(|n| *n == 1));
    assert_denied(
        write(&raw, abandoned.segment, abandoned.offset, &own[BLOCK..2 * BLOCK], Some(abandoned.grant)).await,
        "with the grant of a timed-out put",
    );
    let done = pb::PutDone { key: 40, checksum: BlockChecksum::of(&own).0 };
    let e =
        m.put_end(pb::PutEndRequest { put_id: abandoned.put_id, items: vec![done] }).await.expect_err("late put_end");
    assert_eq!(e.code(), tonic::Code::NotFound);

    // The key and the space serve someone else.
    let c = store.client();
    let fresh = block(41, 3 * BLOCK);
    assert_eq!(c.put(&[(BlockKey(40), &fresh)]).await.unwrap(), vec![PutOutcome::Stored]);
    assert_eq!(c.get(&[BlockKey(40)], 3 * BLOCK).await.unwrap(), vec![Some(fresh)]);
    assert_eq!(store.usage().await, (3 * BLOCK as u64, 1, 0));
    store.stop().await;
}
