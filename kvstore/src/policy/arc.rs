//! ARC, Adaptive Replacement Cache (Megiddo & Modha, FAST'03).
//!
//! Keys seen once live in `t1` (recency), keys seen again in `t2`
//! (frequency); `b1`/`b2` remember the keys recently evicted from each. A
//! miss that hits `b1` means `t1` was too small and grows its target `p`; a
//! hit in `b2` shrinks it. A scan only ever enters `t1`, so it cannot push
//! out `t2` unless the workload has shown that recency pays.
//!
//! The cache size `c` of the paper is taken to be the current resident count,
//! since the policy does not know its tier's capacity: ghosts are trimmed so
//! that `|t1| + |b1| <= c` and `|t1| + |t2| + |b1| + |b2| <= 2c`.

use std::collections::HashMap;
use std::hash::Hash;

use super::list::{List, Slab, NIL};
use super::EvictionPolicy;

const T1: u8 = 0;
const T2: u8 = 1;
const B1: u8 = 2;
const B2: u8 = 3;

/// ARC; every operation is O(1) amortized (eviction also walks past
/// non-evictable keys). Ghost entries are bounded by the resident count.
#[derive(Debug)]
pub struct ArcPolicy<K> {
    /// Resident and ghost keys; the node's list tag says which.
    index: HashMap<K, u32>,
    slab: Slab<K>,
    /// `t1`, `t2`, `b1`, `b2`, indexed by the tags above.
    lists: [List; 4],
    /// Target size of `t1`, adapted by ghost hits.
    p: usize,
    /// The last insertion was a `b2` hit: on a tie, evict from `t1`.
    last_hit_b2: bool,
}

impl<K: Copy + Eq + Hash> ArcPolicy<K> {
    /// An empty policy.
    pub fn new() -> ArcPolicy<K> {
        ArcPolicy { index: HashMap::new(), slab: Slab::new(), lists: [List::new(); 4], p: 0, last_hit_b2: false }
    }

    fn len_of(&self, tag: u8) -> usize {
        self.lists[tag as usize].len()
    }

    fn resident(&self) -> usize {
        self.len_of(T1) + self.len_of(T2)
    }

    /// Moves `idx` to the head of the list tagged `to` (possibly its own).
    fn relink(&mut self, idx: u32, to: u8) {
        let from = self.slab.list_of(idx);
        self.slab.unlink(&mut self.lists[from as usize], idx);
        self.slab.push_head(&mut self.lists[to as usize], idx);
        self.slab.set_list(idx, to);
    }

    /// Forgets `idx` entirely.
    fn drop_node(&mut self, idx: u32) {
        let (tag, key) = (self.slab.list_of(idx), self.slab.key(idx));
        self.slab.unlink(&mut self.lists[tag as usize], idx);
        self.slab.release(idx);
        self.index.remove(&key);
    }

    /// Evicts the oldest evictable key of `from` (t1 or t2) into ghost list `to`.
    fn evict_from(&mut self, from: u8, to: u8, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        let mut cur = self.lists[from as usize].tail();
        while cur != NIL {
            let key = self.slab.key(cur);
            if evictable(&key) {
                self.relink(cur, to);
                return Some(key);
            }
            cur = self.slab.newer(cur);
        }
        None
    }

    fn trim_ghosts(&mut self) {
        let c = self.resident();
        while self.len_of(T1) + self.len_of(B1) > c && self.len_of(B1) > 0 {
            self.drop_node(self.lists[B1 as usize].tail());
        }
        while self.resident() + self.len_of(B1) + self.len_of(B2) > 2 * c {
            let tag = if self.len_of(B2) > 0 { B2 } else { B1 };
            let idx = self.lists[tag as usize].tail();
            if idx == NIL {
                break;
            }
            self.drop_node(idx);
        }
    }
}

impl<K: Copy + Eq + Hash> Default for ArcPolicy<K> {
    fn default() -> Self {
        ArcPolicy::new()
    }
}

impl<K: Copy + Eq + Hash + Send + std::fmt::Debug> EvictionPolicy<K> for ArcPolicy<K> {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn insert(&mut self, key: K) {
        let Some(&idx) = self.index.get(&key) else {
            let idx = self.slab.alloc(key, T1);
            self.slab.push_head(&mut self.lists[T1 as usize], idx);
            self.index.insert(key, idx);
            self.last_hit_b2 = false;
            return;
        };
        // The cache size once this key is resident again.
        let c = self.resident() + 1;
        match self.slab.list_of(idx) {
            B1 => {
                let delta = (self.len_of(B2) / self.len_of(B1)).max(1);
                self.p = (self.p + delta).min(c);
                self.relink(idx, T2);
                self.last_hit_b2 = false;
            }
            B2 => {
                let delta = (self.len_of(B1) / self.len_of(B2)).max(1);
                self.p = self.p.saturating_sub(delta);
                self.relink(idx, T2);
                self.last_hit_b2 = true;
            }
            _ => self.touch(&key),
        }
    }

    fn touch(&mut self, key: &K) {
        if let Some(&idx) = self.index.get(key) {
            if matches!(self.slab.list_of(idx), T1 | T2) {
                self.relink(idx, T2);
            }
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some(&idx) = self.index.get(key) {
            // A ghost is history, not a block: only resident keys leave.
            if matches!(self.slab.list_of(idx), T1 | T2) {
                self.drop_node(idx);
            }
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        self.p = self.p.min(self.resident());
        let t1_len = self.len_of(T1);
        let from_t1 = t1_len > 0 && (t1_len > self.p || (self.last_hit_b2 && t1_len == self.p) || self.len_of(T2) == 0);
        self.last_hit_b2 = false;
        let victim = if from_t1 {
            self.evict_from(T1, B1, evictable).or_else(|| self.evict_from(T2, B2, evictable))
        } else {
            self.evict_from(T2, B2, evictable).or_else(|| self.evict_from(T1, B1, evictable))
        };
        if victim.is_some() {
            self.trim_ghosts();
        }
        victim
    }

    fn len(&self) -> usize {
        self.resident()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut ArcPolicy<u32>) -> Vec<u32> {
        std::iter::from_fn(|| p.evict(&mut |_| true)).collect()
    }

    #[test]
    fn keys_seen_once_leave_before_keys_seen_twice() {
        let mut p = ArcPolicy::new();
        for k in 0..6u32 {
            p.insert(k);
        }
        p.touch(&1);
        p.touch(&3);
        p.touch(&1);
        assert_eq!(drain(&mut p), vec![0, 2, 4, 5, 3, 1]);
    }

    #[test]
    fn ghost_hits_adapt_the_target() {
        let mut p = ArcPolicy::new();
        for k in 0..4u32 {
            p.insert(k);
        }
        p.touch(&3); // t1 = [2, 1, 0], t2 = [3]
        assert_eq!(p.evict(&mut |_| true), Some(0));
        assert_eq!(p.slab.list_of(p.index[&0]), B1);
        p.insert(0); // b1 hit: recency would have paid
        assert_eq!(p.p, 1);
        assert_eq!(p.slab.list_of(p.index[&0]), T2); // t1 = [2, 1], t2 = [0, 3]
        assert_eq!(p.evict(&mut |_| true), Some(1)); // |t1| = 2 > p = 1
        assert_eq!(p.evict(&mut |_| true), Some(3)); // |t1| = 1 = p: from t2
        p.insert(3); // b2 hit: frequency would have paid
        assert_eq!(p.p, 0);
        assert_eq!(p.evict(&mut |_| true), Some(2));
    }

    #[test]
    fn skipped_keys_stay_in_place() {
        let mut p = ArcPolicy::new();
        for k in 0..4u32 {
            p.insert(k);
        }
        p.touch(&3);
        assert_eq!(p.evict(&mut |k| *k != 0), Some(1));
        assert_eq!(p.slab.keys(&p.lists[T1 as usize]), vec![2, 0]);
        // Nothing in t1 may go: fall back to t2.
        assert_eq!(p.evict(&mut |k| *k == 3), Some(3));
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn ghosts_are_bounded_by_resident_count() {
        let mut p = ArcPolicy::new();
        for k in 0..10_000u32 {
            p.insert(k);
            if k % 3 == 0 {
                p.touch(&k);
            }
            if k % 7 == 0 {
                p.insert(k / 2);
            }
            while p.len() > 100 {
                p.evict(&mut |_| true);
            }
        }
        assert_eq!(p.len(), 100);
        let ghosts = p.len_of(B1) + p.len_of(B2);
        assert!(p.len_of(T1) + p.len_of(B1) <= 100);
        assert!(ghosts <= 100, "{ghosts} ghosts");
        assert_eq!(p.index.len(), p.len() + ghosts);
    }
}
