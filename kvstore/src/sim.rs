//! Cache simulation over a trace's block references.
//!
//! Hits are counted the way the Mooncake trace README counts them: a block
//! is a hit only while every earlier block of the same request also hit
//! (prefill can reuse a cached prefix, not a cached island after a gap).
//!
//! A request is replayed block by block, in prompt order:
//! - while the prefix still hits, a block resident in DRAM is a DRAM hit (a
//!   touch); one resident on SSD is an SSD hit and is promoted to DRAM;
//! - from the first block that is not resident on, prefill recomputes the
//!   rest of the prompt and writes every block: an absent block is inserted
//!   into DRAM, a resident one is refreshed where it is (a write of a
//!   resident key is a touch), whichever tier holds it.
//!
//! DRAM victims are dropped, or with an SSD tier demoted to it; SSD victims
//! are dropped. The tiers are exclusive: a block lives in one tier at a time.
//! Every block is evictable at any moment (no leases or pins are modelled).
//!
//! With LRU in DRAM these rules reproduce the trace README's published
//! numbers (0.083 / 0.424 / 0.624 / 0.640 at 1k / 10k / 30k / 50k blocks).
//! [`ideal`] is the infinite cache and [`optimal`] Belady's clairvoyant
//! policy under the same counting: the ceilings a policy is measured against.

use std::collections::{BinaryHeap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::policy::{EvictionPolicy, PolicyKind};
use crate::trace::TraceRequest;
use crate::types::Tier;

/// One simulated cache: a DRAM tier and optionally an SSD tier below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// DRAM capacity in blocks.
    pub dram_blocks: usize,
    /// DRAM eviction policy.
    #[serde(default)]
    pub dram_policy: PolicyKind,
    /// SSD tier, if any.
    #[serde(default)]
    pub ssd: Option<SsdSimConfig>,
}

/// The SSD tier of a [`SimConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsdSimConfig {
    /// SSD capacity in blocks.
    pub blocks: usize,
    /// SSD eviction policy (its own instance).
    #[serde(default)]
    pub policy: PolicyKind,
}

impl SimConfig {
    /// DRAM only.
    pub fn dram(dram_blocks: usize, policy: PolicyKind) -> SimConfig {
        SimConfig { dram_blocks, dram_policy: policy, ssd: None }
    }

    /// DRAM over an SSD tier of `ssd_blocks`, both tiers with `policy`.
    pub fn tiered(dram_blocks: usize, ssd_blocks: usize, policy: PolicyKind) -> SimConfig {
        SimConfig { dram_blocks, dram_policy: policy, ssd: Some(SsdSimConfig { blocks: ssd_blocks, policy }) }
    }
}

/// What a replay counted. Ratios are of [`SimResult::refs`] (0 for an empty trace).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimResult {
    /// The cache replayed.
    pub config: SimConfig,
    /// Requests replayed.
    pub requests: u64,
    /// Block references replayed, counting repeats.
    pub refs: u64,
    /// Prefix hits served from DRAM.
    pub dram_hits: u64,
    /// Prefix hits served from SSD (and promoted to DRAM).
    pub ssd_hits: u64,
    /// `(dram_hits + ssd_hits) / refs`.
    pub hit_ratio: f64,
    /// `dram_hits / refs`.
    pub dram_hit_ratio: f64,
    /// `ssd_hits / refs`.
    pub ssd_hit_ratio: f64,
    /// Absent blocks written to DRAM after a request's first miss.
    pub inserts: u64,
    /// Blocks that left DRAM (dropped or demoted).
    pub dram_evictions: u64,
    /// DRAM victims written to SSD.
    pub demotions: u64,
    /// SSD hits moved to DRAM.
    pub promotions: u64,
    /// Blocks that left SSD (dropped).
    pub ssd_evictions: u64,
}

/// Hits of a policy-free cache model ([`ideal`], [`optimal`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefixHits {
    /// Capacity in blocks; `None` for an infinite cache.
    pub capacity_blocks: Option<usize>,
    /// Requests replayed.
    pub requests: u64,
    /// Block references replayed, counting repeats.
    pub refs: u64,
    /// Distinct blocks referenced.
    pub unique_blocks: u64,
    /// Prefix hits.
    pub hits: u64,
    /// `hits / refs` (0 for an empty trace).
    pub hit_ratio: f64,
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// One simulated tier: its policy and capacity in blocks.
struct TierSim {
    // One virtual call per block operation is deliberate: the replay drives
    // the same boxed policies the master builds, and each call's cost is a
    // hash-map probe inside the policy, not the dispatch.
    policy: Box<dyn EvictionPolicy<u64>>,
    capacity: usize,
}

impl TierSim {
    fn new(policy: PolicyKind, capacity: usize) -> TierSim {
        TierSim { policy: policy.build(), capacity }
    }

    /// The next victim while the tier is over capacity.
    fn overflow(&mut self) -> Option<u64> {
        if self.policy.len() > self.capacity {
            self.policy.evict(&mut |_| true)
        } else {
            None
        }
    }
}

struct Replay {
    dram: TierSim,
    ssd: Option<TierSim>,
    /// Where each resident block is.
    location: HashMap<u64, Tier>,
    result: SimResult,
}

impl Replay {
    fn new(config: &SimConfig) -> Replay {
        Replay {
            dram: TierSim::new(config.dram_policy, config.dram_blocks),
            ssd: config.ssd.map(|s| TierSim::new(s.policy, s.blocks)),
            location: HashMap::new(),
            result: SimResult {
                config: *config,
                requests: 0,
                refs: 0,
                dram_hits: 0,
                ssd_hits: 0,
                hit_ratio: 0.0,
                dram_hit_ratio: 0.0,
                ssd_hit_ratio: 0.0,
                inserts: 0,
                dram_evictions: 0,
                demotions: 0,
                promotions: 0,
                ssd_evictions: 0,
            },
        }
    }

    fn request(&mut self, hash_ids: &[u64]) {
        self.result.requests += 1;
        self.result.refs += hash_ids.len() as u64;
        let mut prefix_hit = true;
        for &id in hash_ids {
            match (self.location.get(&id).copied(), prefix_hit) {
                (Some(Tier::Dram), true) => {
                    self.result.dram_hits += 1;
                    self.dram.policy.touch(&id);
                }
                (Some(Tier::Ssd), true) => {
                    self.result.ssd_hits += 1;
                    self.promote(id);
                }
                (Some(Tier::Dram), false) => self.dram.policy.touch(&id),
                (Some(Tier::Ssd), false) => {
                    if let Some(ssd) = &mut self.ssd {
                        ssd.policy.touch(&id);
                    }
                }
                (None, _) => {
                    prefix_hit = false;
                    self.result.inserts += 1;
                    self.place_in_dram(id);
                }
            }
        }
    }

    fn promote(&mut self, id: u64) {
        if let Some(ssd) = &mut self.ssd {
            ssd.policy.remove(&id);
        }
        self.result.promotions += 1;
        self.place_in_dram(id);
    }

    /// Makes `id` DRAM-resident and evicts what no longer fits.
    fn place_in_dram(&mut self, id: u64) {
        self.location.insert(id, Tier::Dram);
        self.dram.policy.insert(id);
        while let Some(victim) = self.dram.overflow() {
            self.result.dram_evictions += 1;
            if self.ssd.is_some() {
                self.demote(victim);
            } else {
                self.location.remove(&victim);
            }
        }
    }

    fn demote(&mut self, id: u64) {
        let Some(ssd) = &mut self.ssd else { return };
        self.result.demotions += 1;
        self.location.insert(id, Tier::Ssd);
        ssd.policy.insert(id);
        while let Some(victim) = ssd.overflow() {
            self.result.ssd_evictions += 1;
            self.location.remove(&victim);
        }
    }

    fn finish(mut self) -> SimResult {
        let r = &mut self.result;
        r.hit_ratio = ratio(r.dram_hits + r.ssd_hits, r.refs);
        r.dram_hit_ratio = ratio(r.dram_hits, r.refs);
        r.ssd_hit_ratio = ratio(r.ssd_hits, r.refs);
        self.result
    }
}

/// Replays `trace` through the cache `config` describes (rules in the module docs).
pub fn simulate(trace: &[TraceRequest], config: &SimConfig) -> SimResult {
    let mut replay = Replay::new(config);
    for request in trace {
        replay.request(&request.hash_ids);
    }
    replay.finish()
}

/// Hits of an infinite cache: every block ever written stays.
pub fn ideal(trace: &[TraceRequest]) -> PrefixHits {
    let mut seen = HashSet::new();
    let (mut refs, mut hits) = (0u64, 0u64);
    for request in trace {
        let mut prefix_hit = true;
        for &id in &request.hash_ids {
            refs += 1;
            prefix_hit &= !seen.insert(id);
            hits += u64::from(prefix_hit);
        }
    }
    PrefixHits {
        capacity_blocks: None,
        requests: trace.len() as u64,
        refs,
        unique_blocks: seen.len() as u64,
        hits,
        hit_ratio: ratio(hits, refs),
    }
}

/// Hits of Belady's clairvoyant policy with `capacity_blocks`: on overflow it
/// drops the resident block whose next reference is furthest away (possibly
/// the one just written). The same replay rules as [`simulate`] otherwise.
pub fn optimal(trace: &[TraceRequest], capacity_blocks: usize) -> PrefixHits {
    let ids: Vec<u64> = trace.iter().flat_map(|r| r.hash_ids.iter().copied()).collect();
    // next_use[i]: index of the next reference to ids[i], usize::MAX if none.
    let mut next_use = vec![usize::MAX; ids.len()];
    let mut later: HashMap<u64, usize> = HashMap::new();
    for (i, &id) in ids.iter().enumerate().rev() {
        if let Some(j) = later.insert(id, i) {
            next_use[i] = j;
        }
    }
    let unique_blocks = later.len() as u64;
    drop(later);

    // Resident block -> its next use; the heap holds (next use, id) with stale
    // entries skipped when popped.
    let mut resident: HashMap<u64, usize> = HashMap::new();
    let mut heap: BinaryHeap<(usize, u64)> = BinaryHeap::new();
    let (mut pos, mut hits) = (0usize, 0u64);
    for request in trace {
        let mut prefix_hit = true;
        for &id in &request.hash_ids {
            prefix_hit &= resident.contains_key(&id);
            hits += u64::from(prefix_hit);
            resident.insert(id, next_use[pos]);
            heap.push((next_use[pos], id));
            pos += 1;
            while resident.len() > capacity_blocks {
                let Some((next, victim)) = heap.pop() else { break };
                if resident.get(&victim) == Some(&next) {
                    resident.remove(&victim);
                }
            }
        }
    }
    PrefixHits {
        capacity_blocks: Some(capacity_blocks),
        requests: trace.len() as u64,
        refs: ids.len() as u64,
        unique_blocks,
        hits,
        hit_ratio: ratio(hits, ids.len() as u64),
    }
}

/// A request as the serving path meets the store: the keys of its
/// prompt's full blocks, in order, how many leading ones prefill may
/// reuse (every full block but one holding the last prompt token, which
/// is always computed), and whether a decode node reads them back (not
/// when the first token, which prefill samples, ends the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRequest {
    pub keys: Vec<u64>,
    pub reusable: usize,
    pub read_back: bool,
}

/// How many blocks the decode node reads back per store call.
pub const SERVED_FETCH_BATCH: usize = 16;

/// Prefix hits of requests served one after another by a disaggregated
/// cluster whose store holds `capacity_blocks` in DRAM and evicts by
/// `policy`: the store's operations of the serving path, in its order.
///
/// 1. Prefill looks up the longest resident prefix of the reusable blocks
///    (a lookup touches nothing) and reads it (a read touches each block,
///    in order): those blocks are the request's hits.
/// 2. It reserves every block it computes that the store lacks, in order,
///    evicting a victim while the store is full (blocks already there are
///    left alone), and publishes them together (an insert each, in order).
/// 3. Unless the first token ended the request, the decode node reads
///    every full block back in batches of [`SERVED_FETCH_BATCH`] (each
///    resident block of a batch is touched; a batch with a missing block
///    ends the reads).
///
/// When requests do not overlap in time (`tandem bench replay
/// --concurrency 1`), the cluster's measured block hit ratio equals this
/// replay's `hit_ratio` (`refs` counts reusable blocks): the check that the
/// store does what its policy says on the served path.
pub fn serve(requests: &[ServedRequest], capacity_blocks: usize, policy: PolicyKind) -> PrefixHits {
    let mut tier = TierSim::new(policy, capacity_blocks);
    let mut resident: HashSet<u64> = HashSet::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let (mut refs, mut hits) = (0u64, 0u64);
    for r in requests {
        let reusable = r.reusable.min(r.keys.len());
        refs += reusable as u64;
        seen.extend(r.keys.iter().copied());
        let hit = r.keys[..reusable].iter().take_while(|k| resident.contains(k)).count();
        for k in &r.keys[..hit] {
            tier.policy.touch(k);
        }
        hits += hit as u64;
        let mut reserved: Vec<u64> = Vec::new();
        for &k in &r.keys[hit..] {
            if resident.contains(&k) || reserved.contains(&k) {
                continue;
            }
            let mut room = resident.len() + reserved.len() < capacity_blocks;
            while !room {
                let Some(victim) = tier.policy.evict(&mut |_| true) else { break };
                tier.policy.remove(&victim);
                resident.remove(&victim);
                room = resident.len() + reserved.len() < capacity_blocks;
            }
            if room {
                reserved.push(k);
            }
        }
        for k in reserved {
            resident.insert(k);
            tier.policy.insert(k);
        }
        let read_back = if r.read_back { &r.keys[..] } else { &[] };
        for batch in read_back.chunks(SERVED_FETCH_BATCH) {
            let mut whole = true;
            for k in batch {
                if resident.contains(k) {
                    tier.policy.touch(k);
                } else {
                    whole = false;
                }
            }
            if !whole {
                break;
            }
        }
    }
    PrefixHits {
        capacity_blocks: Some(capacity_blocks),
        requests: requests.len() as u64,
        refs,
        unique_blocks: seen.len() as u64,
        hits,
        hit_ratio: ratio(hits, refs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[u64]) -> TraceRequest {
        TraceRequest { timestamp_ms: 0, input_length: 512 * ids.len() as u32, output_length: 1, hash_ids: ids.to_vec() }
    }

    #[test]
    fn hits_stop_at_the_first_miss() {
        // [0 1 2] then [0 1 3] then [0 4 2]: block 2 of the third request is
        // cached but follows a miss, so it does not count.
        let trace = [req(&[0, 1, 2]), req(&[0, 1, 3]), req(&[0, 4, 2])];
        let r = simulate(&trace, &SimConfig::dram(100, PolicyKind::Lru));
        assert_eq!((r.refs, r.dram_hits, r.ssd_hits, r.inserts), (9, 3, 0, 5));
        assert_eq!(r.hit_ratio, 3.0 / 9.0);
        let i = ideal(&trace);
        assert_eq!((i.refs, i.hits, i.unique_blocks), (9, 3, 5));
        assert_eq!(optimal(&trace, 100).hits, 3);
    }

    #[test]
    fn blocks_after_a_miss_are_written_and_refreshed() {
        // Capacity 4, LRU. Request 2 misses on 9, then rewrites 1 and 2, which
        // become the most recent: LRU order 0, 9, 1, 2. Request 3's 7 and 8
        // evict 0 and 9. Had the rewrite not refreshed 1 and 2, they would
        // have gone instead of 9, and request 4 would hit.
        let trace = [req(&[0, 1, 2]), req(&[9, 1, 2]), req(&[7, 8]), req(&[9])];
        let r = simulate(&trace, &SimConfig::dram(4, PolicyKind::Lru));
        assert_eq!((r.dram_hits, r.inserts, r.dram_evictions), (0, 7, 3));
    }

    #[test]
    fn ssd_tier_catches_dram_victims() {
        let trace = [req(&[0, 1]), req(&[2, 3]), req(&[0, 1]), req(&[0, 1])];
        let dram_only = simulate(&trace, &SimConfig::dram(2, PolicyKind::Lru));
        assert_eq!(dram_only.hit_ratio, 0.25); // only request 4
        let tiered = simulate(&trace, &SimConfig::tiered(2, 8, PolicyKind::Lru));
        // Request 3 finds 0 and 1 on SSD and promotes them; request 4 hits DRAM.
        assert_eq!((tiered.dram_hits, tiered.ssd_hits, tiered.promotions), (2, 2, 2));
        assert_eq!(tiered.demotions, 4);
        assert_eq!(tiered.ssd_evictions, 0);
        assert_eq!(tiered.hit_ratio, 0.5);
        assert_eq!(tiered.ssd_hit_ratio + tiered.dram_hit_ratio, tiered.hit_ratio);
    }

    #[test]
    fn ssd_victims_are_dropped() {
        let trace = [req(&[0]), req(&[1]), req(&[2]), req(&[3]), req(&[0])];
        let r = simulate(&trace, &SimConfig::tiered(1, 2, PolicyKind::Lru));
        // 0 fell off the end of SSD (request 4) before request 5 came back for it.
        assert_eq!((r.dram_hits, r.ssd_hits, r.ssd_evictions), (0, 0, 2));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let trace = [req(&[0, 1]), req(&[0, 1])];
        for &kind in PolicyKind::ALL {
            let r = simulate(&trace, &SimConfig::tiered(0, 0, kind));
            assert_eq!(r.dram_hits + r.ssd_hits, 0, "{kind}");
        }
        assert_eq!(optimal(&trace, 0).hits, 0);
        assert_eq!(simulate(&[], &SimConfig::dram(1, PolicyKind::Lru)).hit_ratio, 0.0);
    }

    #[test]
    fn belady_keeps_what_is_used_soonest() {
        // Capacity 2: after [0 1], 2 arrives; 0 is used next, 1 never: drop 1.
        let trace = [req(&[0, 1]), req(&[2]), req(&[0]), req(&[2])];
        let best = optimal(&trace, 2);
        assert_eq!(best.hits, 2);
        assert!(simulate(&trace, &SimConfig::dram(2, PolicyKind::Lru)).dram_hits < 2);
    }

    #[test]
    fn config_parses_with_defaults() {
        let c: SimConfig = serde_json::from_str(r#"{"dram_blocks": 10, "ssd": {"blocks": 40, "policy": "lru"}}"#)
            .expect("valid config");
        assert_eq!(c.dram_policy, PolicyKind::DEFAULT);
        assert_eq!(c.ssd, Some(SsdSimConfig { blocks: 40, policy: PolicyKind::Lru }));
        assert!(serde_json::from_str::<SimConfig>(r#"{"dram_blocks": 1, "ram": 2}"#).is_err());
    }

    fn served(keys: &[u64], reusable: usize) -> ServedRequest {
        ServedRequest { keys: keys.to_vec(), reusable, read_back: true }
    }

    #[test]
    fn served_requests_hit_their_reusable_prefix_and_reads_refresh() {
        // Capacity 4, LRU. [0 1 2] (2 reusable), [0 1 3] hits 0 1, writes 3;
        // the decode read-back touched 0 1 2 then 0 1 3: LRU order 2, 0, 1, 3.
        // [5] evicts 2, so [0 1 2] hits 0 1 only (2 follows as a write).
        let rs = [served(&[0, 1, 2], 2), served(&[0, 1, 3], 2), served(&[5], 0), served(&[0, 1, 2], 3)];
        let r = serve(&rs, 4, PolicyKind::Lru);
        assert_eq!((r.refs, r.hits, r.unique_blocks), (7, 4, 5));
        let r = serve(&rs, 100, PolicyKind::Lru);
        assert_eq!(r.hits, 5, "an unbounded store keeps 2 as well");
    }

    #[test]
    fn the_decode_read_back_refreshes_blocks_prefill_only_found() {
        // [9 1 2] misses on 9, so prefill neither reads nor rewrites 1 and
        // 2; only the decode node's read-back refreshes them (and 9). Then
        // [7 8] evicts 0 and 9 (read back) or 0 and 1 (not read back).
        let mut rs = vec![served(&[0, 1, 2], 3), served(&[9, 1, 2], 3), served(&[7, 8], 0), served(&[9, 1, 2], 2)];
        assert_eq!(serve(&rs, 4, PolicyKind::Lru).hits, 0);
        rs[1].read_back = false;
        assert_eq!(serve(&rs, 4, PolicyKind::Lru).hits, 1, "9 stays, 1 went");
    }

    #[test]
    fn a_full_store_of_one_request_still_serves_the_next() {
        // Capacity 2: a 3-block prompt stores its first two blocks and finds
        // no room for the third (reservations evict published blocks only,
        // never each other).
        let rs = [served(&[1, 2, 3], 2), served(&[1, 2, 3], 2), served(&[9, 8], 1)];
        for policy in PolicyKind::ALL {
            let r = serve(&rs, 2, *policy);
            assert_eq!(r.refs, 5, "{policy:?}");
            assert!(r.hits <= 2, "{policy:?}: {r:?}");
        }
        assert_eq!(serve(&rs, 3, PolicyKind::Lru).hits, 2, "with room for the prompt, its prefix hits");
    }
}
