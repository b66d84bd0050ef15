//! The master's state machine with a fake clock: two-phase puts, leases,
//! eviction, node death, tiering, replication and recovery.

use std::net::SocketAddr;
use std::path::PathBuf;

use tandem_proto::BlockKey;

use super::*;
use crate::master::persist::MetaStore;
use crate::types::SegmentDesc;

const MIB: u64 = 1 << 20;

fn peer(name: &str, incarnation: u64, dram: u64) -> PeerInfo {
    PeerInfo {
        name: name.into(),
        incarnation,
        data_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        host_id: "h".into(),
        segments: vec![SegmentDesc { id: 0, bytes: dram, path: PathBuf::from(format!("/nonexistent/{name}")) }],
        ssd_dir: None,
    }
}

fn cfg() -> MasterConfig {
    MasterConfig { hot_threshold: 0, ..MasterConfig::default() }
}

fn master_with(nodes: &[(&str, u64, u64)]) -> MasterState {
    let mut m = MasterState::new(cfg());
    for &(name, dram, ssd) in nodes {
        m.register_node(peer(name, 1, dram), format!("{name}:1"), ssd, &[], 1000).unwrap();
    }
    m
}

fn put(m: &mut MasterState, key: u64, len: u64, now: u64) -> Vec<Replica> {
    let (id, slots) = m.put_start(&[(BlockKey(key), len)], 0, None, now).unwrap();
    let PutSlot::Reserved(p) = &slots[0] else { panic!("expected a reservation, got {:?}", slots[0]) };
    assert_eq!(m.put_end(id, &[(BlockKey(key), key * 7)]).unwrap(), 1);
    p.clone()
}

fn used(m: &MasterState, node: &str, tier: Tier) -> u64 {
    let s = m.stats(0);
    let n = s.nodes.iter().find(|n| n.peer.name == node).unwrap();
    n.tiers.iter().find(|t| t.tier == tier).unwrap().used
}

#[test]
fn two_phase_put_publishes_only_at_end_and_revoke_frees() {
    let mut m = master_with(&[("a", 8 * MIB, 0)]);
    let (id, slots) = m.put_start(&[(BlockKey(1), MIB), (BlockKey(2), MIB)], 0, None, 1000).unwrap();
    assert!(matches!(slots[0], PutSlot::Reserved(_)));
    assert_eq!(m.lookup(&[BlockKey(1)]).0, vec![false], "pending blocks are invisible");
    let (_, slots2) = m.put_start(&[(BlockKey(1), MIB)], 0, None, 1000).unwrap();
    assert_eq!(slots2[0], PutSlot::InProgress);
    assert_eq!(m.put_end(id, &[(BlockKey(1), 11)]).unwrap(), 1);
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(2)]), (vec![true, false], 1));
    assert_eq!(m.put_revoke(id), 1, "key 2 was still pending");
    assert_eq!(used(&m, "a", Tier::Dram), MIB);
    assert_eq!(m.put_end(id, &[(BlockKey(2), 1)]), Err(MasterError::UnknownPut(id)));
    let (_, again) = m.put_start(&[(BlockKey(1), MIB)], 0, None, 1000).unwrap();
    assert_eq!(again[0], PutSlot::Exists);
}

#[test]
fn stuck_puts_time_out_and_their_space_returns() {
    let mut m = master_with(&[("a", 4 * MIB, 0)]);
    let (id, _) = m.put_start(&[(BlockKey(1), 2 * MIB)], 0, None, 1000).unwrap();
    let t = 1000 + cfg().put_timeout_ms;
    assert!(m.heartbeat("a", 1, t - 1));
    m.tick(t - 1).unwrap();
    assert_eq!(used(&m, "a", Tier::Dram), 2 * MIB);
    m.tick(t + 1).unwrap();
    assert_eq!(used(&m, "a", Tier::Dram), 0);
    assert_eq!(m.stats(0).pending_puts, 0);
    assert_eq!(m.put_end(id, &[(BlockKey(1), 1)]), Err(MasterError::UnknownPut(id)));
}

#[test]
fn too_large_and_no_space_are_reported_per_key() {
    let mut m = master_with(&[("a", 2 * MIB, 0)]);
    let (_, slots) = m.put_start(&[(BlockKey(1), 3 * MIB), (BlockKey(2), u64::MAX)], 0, None, 1000).unwrap();
    assert_eq!(slots, vec![PutSlot::TooLarge, PutSlot::TooLarge]);
    let err = m.put_start(&[(BlockKey(3), 10), (BlockKey(4), 0)], 0, None, 1000).unwrap_err();
    assert!(err.to_string().contains("0000000000000004 has length 0"), "{err}");
    // Fill it with pending (unevictable) puts: the next one has no space.
    let (_, s) = m.put_start(&[(BlockKey(3), 2 * MIB)], 0, None, 1000).unwrap();
    assert!(matches!(s[0], PutSlot::Reserved(_)));
    let (_, s) = m.put_start(&[(BlockKey(4), MIB)], 0, None, 1000).unwrap();
    assert_eq!(s[0], PutSlot::NoSpace);
}

#[test]
fn leased_blocks_are_not_evicted_and_unleased_ones_are() {
    let mut m = master_with(&[("a", 4 * MIB, 0)]);
    for k in 1..=4 {
        put(&mut m, k, MIB, 1000);
    }
    let (lease, _, sets) = m.get_replicas(&[BlockKey(1), BlockKey(2), BlockKey(3), BlockKey(4)], 0, 1000).unwrap();
    assert!(sets.iter().all(Option::is_some));
    let (_, s) = m.put_start(&[(BlockKey(5), MIB)], 0, None, 1000).unwrap();
    assert_eq!(s[0], PutSlot::NoSpace, "every block is leased");
    m.release_lease(lease).unwrap();
    let (_, s) = m.put_start(&[(BlockKey(5), MIB)], 0, None, 1000).unwrap();
    assert!(matches!(s[0], PutSlot::Reserved(_)), "an unleased block was evicted");
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(2), BlockKey(3), BlockKey(4)]).0.iter().filter(|e| **e).count(), 3);
}

#[test]
fn leases_expire_and_pins_hold() {
    let mut m = master_with(&[("a", 2 * MIB, 0)]);
    put(&mut m, 1, MIB, 1000);
    put(&mut m, 2, MIB, 1000);
    m.pin(&[BlockKey(1)], true).unwrap();
    m.get_replicas(&[BlockKey(2)], 500, 1000).unwrap();
    assert_eq!(m.stats(0).active_leases, 1);
    m.tick(1600).unwrap();
    assert_eq!(m.stats(0).active_leases, 0, "the lease expired");
    let (_, s) = m.put_start(&[(BlockKey(3), MIB)], 0, None, 1600).unwrap();
    assert!(matches!(s[0], PutSlot::Reserved(_)));
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(2)]).0, vec![true, false], "the pinned block stayed");
}

#[test]
fn removal_of_a_leased_block_waits_for_the_lease() {
    let mut m = master_with(&[("a", 4 * MIB, 0)]);
    put(&mut m, 1, MIB, 1000);
    let (lease, _, _) = m.get_replicas(&[BlockKey(1)], 0, 1000).unwrap();
    assert_eq!(m.remove(&[BlockKey(1)]).unwrap(), 1);
    assert_eq!(m.lookup(&[BlockKey(1)]).0, vec![false]);
    assert_eq!(used(&m, "a", Tier::Dram), MIB, "still held for the reader");
    m.release_lease(lease).unwrap();
    assert_eq!(used(&m, "a", Tier::Dram), 0);
}

#[test]
fn replicas_go_to_distinct_nodes_by_free_ratio_and_die_with_them() {
    let mut m = master_with(&[("a", 8 * MIB, 0), ("b", 8 * MIB, 0), ("c", 8 * MIB, 0)]);
    put(&mut m, 100, 4 * MIB, 1000); // lands on one node, making it the fullest
    let (id, slots) = m.put_start(&[(BlockKey(1), MIB)], 2, None, 1000).unwrap();
    let PutSlot::Reserved(p) = &slots[0] else { panic!() };
    assert_eq!(p.len(), 2);
    assert_ne!(p[0].node, p[1].node);
    let first = m.get_replicas(&[BlockKey(100)], 0, 1000).unwrap().2[0].clone().unwrap().replicas[0].node.clone();
    assert!(p.iter().all(|r| r.node != first), "the fullest node is not chosen");
    m.put_end(id, &[(BlockKey(1), 5)]).unwrap();
    // Node p[0] goes silent; the block survives on p[1].
    let dead = p[0].node.clone();
    for name in ["a", "b", "c"] {
        if name != dead {
            assert!(m.heartbeat(name, 1, 5500));
        }
    }
    m.tick(1000 + cfg().node_timeout_ms + 600).unwrap();
    assert!(!m.heartbeat(&dead, 1, 7000), "the dead node must register again");
    let set = m.get_replicas(&[BlockKey(1)], 0, 7000).unwrap().2[0].clone().unwrap();
    assert_eq!(set.replicas.len(), 1);
    assert_eq!(set.replicas[0].node, p[1].node);
}

#[test]
fn demotion_above_the_watermark_then_promotion_on_ssd_hits() {
    let mut m = master_with(&[("a", 10 * MIB, 100 * MIB)]);
    for k in 1..=10 {
        put(&mut m, k, MIB, 1000);
    }
    let cmds = m.tick(1100).unwrap();
    let Some(Command::Demote { node, blocks }) = cmds.first() else { panic!("expected a demotion, got {cmds:?}") };
    assert_eq!(node, "a");
    assert_eq!(blocks.len(), 2, "from 100% down to the 80% low watermark");
    assert_eq!(blocks[0].checksum, blocks[0].key.0 * 7);
    // No second plan while the first is in flight.
    assert!(m.tick(1200).unwrap().iter().all(|c| !matches!(c, Command::Demote { .. })));
    let demoted: Vec<BlockKey> = blocks.iter().map(|b| b.key).collect();
    for k in &demoted {
        m.demote_done("a", *k, true).unwrap();
    }
    assert_eq!(used(&m, "a", Tier::Dram), 8 * MIB);
    assert_eq!(used(&m, "a", Tier::Ssd), 2 * MIB);
    let set = m.get_replicas(&[demoted[0]], 0, 1300).unwrap().2[0].clone().unwrap();
    assert_eq!(set.replicas[0].tier(), Tier::Ssd);
    m.get_replicas(&[demoted[0]], 0, 1300).unwrap();
    let cmds = m.tick(1400).unwrap();
    let promote = cmds.iter().find_map(|c| match c {
        Command::Promote { blocks, .. } => Some(blocks.clone()),
        _ => None,
    });
    let blocks = promote.expect("two SSD hits promote the block");
    assert_eq!(blocks[0].key, demoted[0]);
    m.promote_done("a", demoted[0], true).unwrap();
    let set = m.get_replicas(&[demoted[0]], 0, 1500).unwrap().2[0].clone().unwrap();
    assert_eq!(set.replicas.iter().map(Replica::tier).collect::<Vec<_>>(), vec![Tier::Dram, Tier::Ssd]);
}

#[test]
fn failed_demotion_keeps_the_dram_copy() {
    let mut m = master_with(&[("a", 10 * MIB, 100 * MIB)]);
    for k in 1..=10 {
        put(&mut m, k, MIB, 1000);
    }
    let cmds = m.tick(1100).unwrap();
    let Some(Command::Demote { blocks, .. }) = cmds.first() else { panic!() };
    for b in blocks {
        m.demote_done("a", b.key, false).unwrap();
    }
    assert_eq!(used(&m, "a", Tier::Dram), 10 * MIB);
    assert_eq!(used(&m, "a", Tier::Ssd), 0);
    assert_eq!(m.lookup(&blocks.iter().map(|b| b.key).collect::<Vec<_>>()).1 as usize, blocks.len());
}

#[test]
fn demotions_to_a_failing_disk_back_off_until_one_succeeds() {
    let mut m = master_with(&[("a", 10 * MIB, 100 * MIB)]);
    for k in 1..=10 {
        put(&mut m, k, MIB, 1000);
    }
    let demotes = |cmds: Vec<Command>| -> Vec<BlockKey> {
        cmds.into_iter()
            .filter_map(|c| match c {
                Command::Demote { blocks, .. } => Some(blocks),
                _ => None,
            })
            .flatten()
            .map(|b| b.key)
            .collect()
    };
    let mut now = 1000;
    // Each failed round pauses demotions, from the next tick, twice as
    // long as the one before: 100, 200, 400 ms.
    for pause in [100, 200, 400] {
        let keys = demotes(m.tick(now).unwrap());
        assert!(!keys.is_empty(), "a round is due at {now}");
        for k in keys {
            m.demote_done("a", k, false).unwrap();
        }
        now += 1;
        assert!(demotes(m.tick(now).unwrap()).is_empty(), "paused after a failed round");
        assert!(demotes(m.tick(now + pause - 1).unwrap()).is_empty(), "paused until {}", now + pause);
        now += pause;
    }
    // A round that works ends the backoff.
    let keys = demotes(m.tick(now).unwrap());
    for k in keys {
        m.demote_done("a", k, true).unwrap();
    }
    for k in 11..=12 {
        put(&mut m, k, MIB, now);
    }
    assert!(!demotes(m.tick(now + 1).unwrap()).is_empty(), "demotions resume at once");
}

#[test]
fn hot_blocks_get_a_second_replica() {
    let mut m = MasterState::new(MasterConfig { hot_threshold: 3, hot_replicas: 2, ..MasterConfig::default() });
    for name in ["a", "b"] {
        m.register_node(peer(name, 1, 8 * MIB), format!("{name}:1"), 0, &[], 1000).unwrap();
    }
    put(&mut m, 1, MIB, 1000);
    for _ in 0..3 {
        m.get_replicas(&[BlockKey(1)], 0, 1000).unwrap();
    }
    let cmds = m.tick(1100).unwrap();
    let Some(Command::Replicate { node, dest, source, .. }) = cmds.first() else { panic!("{cmds:?}") };
    assert_ne!(node, &source.node);
    m.replicate_done(node, dest.key, true).unwrap();
    let set = m.get_replicas(&[BlockKey(1)], 0, 1200).unwrap().2[0].clone().unwrap();
    assert_eq!(set.replicas.len(), 2);
}

#[test]
fn ssd_reports_rebuild_replicas_and_conflicts_are_rejected() {
    let mut m = master_with(&[]);
    let reject = m
        .register_node(
            peer("a", 1, 4 * MIB),
            "a:1".into(),
            10 * MIB,
            &[(BlockKey(1), 100, 9), (BlockKey(2), 200, 8)],
            1000,
        )
        .unwrap();
    assert!(reject.is_empty());
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(2)]).1, 2);
    // A second node reporting key 1 with another checksum is told to drop it.
    let reject =
        m.register_node(peer("b", 1, 4 * MIB), "b:1".into(), 10 * MIB, &[(BlockKey(1), 100, 1234)], 1000).unwrap();
    assert_eq!(reject, vec![BlockKey(1)]);
}

#[test]
fn bad_replica_reports_drop_the_copy() {
    let mut m = master_with(&[("a", 4 * MIB, 0)]);
    let p = put(&mut m, 1, MIB, 1000);
    m.report_bad_replica(BlockKey(1), &p[0]).unwrap();
    assert_eq!(m.lookup(&[BlockKey(1)]).0, vec![false]);
    assert_eq!(used(&m, "a", Tier::Dram), 0);
}

#[test]
fn metadata_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let placements;
    {
        let store = MetaStore::open(dir.path()).unwrap();
        let mut m = MasterState::recover(cfg(), store, 1000).unwrap();
        m.register_node(peer("a", 7, 8 * MIB), "a:1".into(), 0, &[], 1000).unwrap();
        placements = put(&mut m, 1, MIB, 1000);
        put(&mut m, 2, 2 * MIB, 1000);
        m.pin(&[BlockKey(2)], true).unwrap();
        m.remove(&[BlockKey(2)]).unwrap();
        put(&mut m, 3, MIB, 1000);
    }
    let store = MetaStore::open(dir.path()).unwrap();
    let mut m = MasterState::recover(cfg(), store, 50_000).unwrap();
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(2), BlockKey(3)]).0, vec![true, false, true]);
    assert!(m.heartbeat("a", 7, 50_001), "the node's incarnation is remembered");
    let set = m.get_replicas(&[BlockKey(1)], 0, 50_001).unwrap().2[0].clone().unwrap();
    assert_eq!(set.replicas, placements);
    assert_eq!(set.checksum, 7);
    assert_eq!(used(&m, "a", Tier::Dram), 2 * MIB, "allocations rebuilt");
    // A new incarnation of the node loses its DRAM replicas.
    m.register_node(peer("a", 8, 8 * MIB), "a:1".into(), 0, &[], 50_002).unwrap();
    assert_eq!(m.lookup(&[BlockKey(1), BlockKey(3)]).1, 0);
}
