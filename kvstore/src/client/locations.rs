//! Block locations a client already knows, so that reading a block again
//! skips the master.
//!
//! A location comes from the master (a `GetReplicas` answer, or the
//! placement of the client's own put) together with the block's length and
//! the checksum its writer published. A read from a known location holds no
//! lease: the master may have evicted, demoted or removed the block since,
//! and another block may be written over the range while it is copied. The
//! copy is therefore checked against the published checksum (xxh3-64, the
//! check every read gets); a mismatch means the location went stale, the
//! entry is forgotten, and the block is read the leased way. Block keys name
//! their contents (a hash of the token prefix, model and tenant), so bytes
//! that still match are the block's bytes even if the master has since freed
//! the range.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_proto::BlockKey;

use crate::types::{Location, Replica};

/// What a client knows about one stored block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Known {
    pub len: u64,
    pub checksum: u64,
    /// DRAM replicas only (SSD copies are read through their node).
    pub replicas: Vec<Replica>,
}

impl Known {
    /// The DRAM replicas of a block the master described; `None` when it has
    /// none (nothing worth remembering).
    pub fn dram(len: u64, checksum: u64, replicas: &[Replica]) -> Option<Known> {
        let replicas: Vec<Replica> =
            replicas.iter().filter(|r| matches!(r.location, Location::Dram { .. }) && r.len == len).cloned().collect();
        (!replicas.is_empty()).then_some(Known { len, checksum, replicas })
    }
}

/// A bounded map of known locations, oldest entries dropped first.
#[derive(Debug)]
pub(crate) struct LocationCache {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<BlockKey, Known>,
    /// Keys in insertion order (may hold keys forgotten since; compacted
    /// when it grows past twice the capacity).
    order: VecDeque<BlockKey>,
}

impl LocationCache {
    /// A cache of at most `capacity` blocks; 0 turns it off.
    pub fn new(capacity: usize) -> LocationCache {
        LocationCache { capacity, inner: Mutex::new(Entries::default()) }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn get(&self, key: &BlockKey) -> Option<Known> {
        if !self.enabled() {
            return None;
        }
        self.inner.lock().ok()?.map.get(key).cloned()
    }

    pub fn insert(&self, key: BlockKey, known: Known) {
        if !self.enabled() {
            return;
        }
        let Ok(mut e) = self.inner.lock() else { return };
        if e.map.insert(key, known).is_none() {
            e.order.push_back(key);
        }
        while e.map.len() > self.capacity {
            let Some(old) = e.order.pop_front() else { break };
            e.map.remove(&old);
        }
        if e.order.len() > 2 * self.capacity.max(16) {
            let Entries { map, order } = &mut *e;
            order.retain(|k| map.contains_key(k));
        }
    }

    pub fn forget(&self, key: &BlockKey) {
        if let Ok(mut e) = self.inner.lock() {
            e.map.remove(key);
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}

/// Reads served from known locations, reported to the master in batches
/// (`Touch`) so its eviction and replication still see them.
#[derive(Debug)]
pub(crate) struct PendingTouches {
    inner: Mutex<(Vec<u64>, Instant)>,
}

impl PendingTouches {
    /// Flush once this many reads are pending (and send at most this many
    /// keys per call) ...
    pub const BATCH: usize = 256;
    /// ... or this long after the last flush.
    const EVERY: Duration = Duration::from_millis(100);

    pub fn new() -> PendingTouches {
        PendingTouches { inner: Mutex::new((Vec::new(), Instant::now())) }
    }

    /// Records `keys`; returns a batch to send when one is due.
    pub fn add(&self, keys: impl IntoIterator<Item = BlockKey>) -> Option<Vec<u64>> {
        let mut g = self.inner.lock().ok()?;
        let (pending, last) = &mut *g;
        pending.extend(keys.into_iter().map(|k| k.0));
        if pending.is_empty() || (pending.len() < Self::BATCH && last.elapsed() < Self::EVERY) {
            return None;
        }
        *last = Instant::now();
        Some(std::mem::take(pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(n: u64) -> Known {
        let r =
            Replica { node: "a".into(), incarnation: 1, location: Location::Dram { segment: 0, offset: n }, len: 8 };
        Known { len: 8, checksum: n, replicas: vec![r] }
    }

    #[test]
    fn the_oldest_entries_go_first_and_the_bound_holds() {
        let c = LocationCache::new(3);
        for k in 0..5 {
            c.insert(BlockKey(k), known(k));
        }
        assert_eq!(c.len(), 3);
        assert!(c.get(&BlockKey(0)).is_none() && c.get(&BlockKey(1)).is_none());
        assert_eq!(c.get(&BlockKey(4)), Some(known(4)));
        c.forget(&BlockKey(4));
        assert!(c.get(&BlockKey(4)).is_none());
        for k in 0..1000 {
            c.insert(BlockKey(k % 7), known(k));
            c.forget(&BlockKey((k + 3) % 7));
        }
        assert!(c.len() <= 3);
        assert!(c.inner.lock().unwrap().order.len() <= 2 * 16 + 1);
    }

    #[test]
    fn a_zero_capacity_cache_keeps_nothing() {
        let c = LocationCache::new(0);
        c.insert(BlockKey(1), known(1));
        assert!(c.get(&BlockKey(1)).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn only_dram_replicas_of_the_right_length_are_kept() {
        let dram =
            Replica { node: "a".into(), incarnation: 1, location: Location::Dram { segment: 0, offset: 0 }, len: 8 };
        let ssd = Replica { node: "b".into(), incarnation: 1, location: Location::Ssd { key: BlockKey(7) }, len: 8 };
        let short = Replica { len: 4, ..dram.clone() };
        assert_eq!(Known::dram(8, 1, &[ssd.clone(), short.clone()]), None);
        assert_eq!(Known::dram(8, 1, &[ssd, dram.clone(), short]).unwrap().replicas, vec![dram]);
    }

    #[test]
    fn touches_flush_in_batches() {
        let t = PendingTouches::new();
        assert_eq!(t.add((0..10).map(BlockKey)), None);
        let batch = t.add((10..PendingTouches::BATCH as u64).map(BlockKey)).unwrap();
        assert_eq!(batch.len(), PendingTouches::BATCH);
        assert_eq!(t.add([]), None);
    }
}
