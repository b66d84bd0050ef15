//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction",
//! SOSP'23): a small FIFO that filters one-hit wonders, a main FIFO with
//! reinsertion on a 2-bit frequency, and a ghost FIFO of recently filtered keys.
//!
//! The policy does not know the byte capacity of its tier, so the queues are
//! sized relative to the current resident count `n` when a victim is chosen:
//! the small queue is drained while it holds at least 10% of `n`, and the
//! ghost queue remembers at most 90% of `n` keys (the paper's defaults).

use std::collections::HashMap;
use std::hash::Hash;

use super::list::{List, Slab, NIL};
use super::EvictionPolicy;

/// Share of the resident keys the small queue may hold before it is drained, in percent.
const SMALL_PERCENT: usize = 10;
/// Ghost entries kept, as a percentage of the resident count.
const GHOST_PERCENT: usize = 90;
/// Frequency saturates here (two bits).
const MAX_FREQ: u8 = 3;

const SMALL: u8 = 0;
const MAIN: u8 = 1;
const GHOST: u8 = 2;

/// S3-FIFO; every operation is O(1) amortized. Ghost entries share the index
/// and slab with resident ones and are bounded by 90% of the resident count.
#[derive(Debug)]
pub struct S3Fifo<K> {
    /// Resident and ghost keys; the node's list tag says which.
    index: HashMap<K, u32>,
    slab: Slab<K>,
    small: List,
    main: List,
    ghost: List,
}

impl<K: Copy + Eq + Hash> S3Fifo<K> {
    /// An empty policy.
    pub fn new() -> S3Fifo<K> {
        S3Fifo { index: HashMap::new(), slab: Slab::new(), small: List::new(), main: List::new(), ghost: List::new() }
    }

    fn resident(&self) -> usize {
        self.small.len() + self.main.len()
    }

    /// Walks the small queue from its oldest end: keys read while there move
    /// to the main queue with their frequency cleared; the first unread
    /// evictable key leaves for the ghost queue and is returned.
    fn evict_small(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        let mut cur = self.small.tail();
        while cur != NIL {
            let newer = self.slab.newer(cur);
            let key = self.slab.key(cur);
            if self.slab.freq(cur) > 0 {
                self.slab.move_to_head(&mut self.small, &mut self.main, cur);
                self.slab.set_list(cur, MAIN);
                self.slab.set_freq(cur, 0);
            } else if evictable(&key) {
                self.slab.move_to_head(&mut self.small, &mut self.ghost, cur);
                self.slab.set_list(cur, GHOST);
                self.trim_ghost();
                return Some(key);
            }
            cur = newer;
        }
        None
    }

    /// FIFO-reinsertion over the main queue: a key read since it was last
    /// looked at is reinserted with its frequency decremented; the first
    /// unread evictable key is evicted. Each pass visits every key once, so
    /// `MAX_FREQ + 1` passes either find a victim or prove there is none.
    fn evict_main(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        for _pass in 0..=MAX_FREQ {
            let mut reinserted = false;
            let mut cur = self.main.tail();
            for _ in 0..self.main.len() {
                if cur == NIL {
                    break;
                }
                let newer = self.slab.newer(cur);
                let freq = self.slab.freq(cur);
                let key = self.slab.key(cur);
                if freq > 0 {
                    self.slab.set_freq(cur, freq - 1);
                    self.slab.refresh(&mut self.main, cur);
                    reinserted = true;
                } else if evictable(&key) {
                    self.slab.unlink(&mut self.main, cur);
                    self.slab.release(cur);
                    self.index.remove(&key);
                    return Some(key);
                }
                cur = newer;
            }
            if !reinserted {
                break;
            }
        }
        None
    }

    fn trim_ghost(&mut self) {
        let target = self.resident() * GHOST_PERCENT / 100;
        while self.ghost.len() > target {
            let idx = self.ghost.tail();
            let key = self.slab.key(idx);
            self.slab.unlink(&mut self.ghost, idx);
            self.slab.release(idx);
            self.index.remove(&key);
        }
    }
}

impl<K: Copy + Eq + Hash> Default for S3Fifo<K> {
    fn default() -> Self {
        S3Fifo::new()
    }
}

impl<K: Copy + Eq + Hash + Send + std::fmt::Debug> EvictionPolicy<K> for S3Fifo<K> {
    fn name(&self) -> &'static str {
        "s3-fifo"
    }

    fn insert(&mut self, key: K) {
        match self.index.get(&key) {
            Some(&idx) if self.slab.list_of(idx) == GHOST => {
                // Seen recently enough to be remembered: skip the filter.
                self.slab.move_to_head(&mut self.ghost, &mut self.main, idx);
                self.slab.set_list(idx, MAIN);
            }
            Some(_) => self.touch(&key),
            None => {
                let idx = self.slab.alloc(key, SMALL);
                self.slab.push_head(&mut self.small, idx);
                self.index.insert(key, idx);
            }
        }
    }

    fn touch(&mut self, key: &K) {
        if let Some(&idx) = self.index.get(key) {
            if self.slab.list_of(idx) != GHOST {
                let freq = self.slab.freq(idx);
                self.slab.set_freq(idx, (freq + 1).min(MAX_FREQ));
            }
        }
    }

    fn remove(&mut self, key: &K) {
        let Some(&idx) = self.index.get(key) else { return };
        let list = match self.slab.list_of(idx) {
            SMALL => &mut self.small,
            MAIN => &mut self.main,
            // Not resident: the ghost entry is history, not a block.
            _ => return,
        };
        self.slab.unlink(list, idx);
        self.slab.release(idx);
        self.index.remove(key);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        let n = self.resident();
        if self.small.len() * 100 >= n * SMALL_PERCENT || self.main.is_empty() {
            self.evict_small(evictable).or_else(|| self.evict_main(evictable))
        } else {
            self.evict_main(evictable).or_else(|| self.evict_small(evictable))
        }
    }

    fn len(&self) -> usize {
        self.resident()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hit_wonders_leave_before_read_keys() {
        let mut p = S3Fifo::new();
        for k in 0..10u32 {
            p.insert(k);
        }
        p.touch(&0);
        p.touch(&5);
        // The small queue holds everything: unread keys go first, oldest first;
        // the read keys 0 and 5 move to the main queue on the way.
        let order: Vec<u32> = std::iter::from_fn(|| p.evict(&mut |_| true)).collect();
        assert_eq!(order, vec![1, 2, 3, 4, 6, 7, 8, 9, 0, 5]);
    }

    #[test]
    fn ghost_hit_goes_straight_to_main() {
        let mut p = S3Fifo::new();
        for k in 0..20u32 {
            p.insert(k);
        }
        for k in 10..20u32 {
            p.touch(&k);
        }
        assert_eq!(p.evict(&mut |_| true), Some(0)); // 0 is now a ghost
        p.insert(0); // ghost hit: main, not small
        assert_eq!(p.slab.list_of(p.index[&0]), MAIN);
        assert_eq!(p.len(), 20);
        // Small (1..10) is at least 10% of the resident keys: it is drained first.
        let order: Vec<u32> = std::iter::from_fn(|| p.evict(&mut |_| true)).take(9).collect();
        assert_eq!(order, (1..10).collect::<Vec<_>>());
    }

    #[test]
    fn main_queue_reinserts_read_keys() {
        let mut p = S3Fifo::new();
        for k in 0..4u32 {
            p.insert(k);
            p.touch(&k);
        }
        // Nothing may go, but the pass promotes all four read keys to main
        // (oldest first: 0, 1, 2, 3) with their counts cleared.
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!((p.small.len(), p.main.len()), (0, 4));
        p.touch(&0);
        assert_eq!(p.evict(&mut |_| true), Some(1));
        assert_eq!(p.evict(&mut |_| true), Some(2));
        assert_eq!(p.evict(&mut |_| true), Some(3));
        assert_eq!(p.evict(&mut |_| true), Some(0));
        assert_eq!(p.evict(&mut |_| true), None);
    }

    #[test]
    fn skipped_keys_stay_in_place() {
        let mut p = S3Fifo::new();
        for k in 0..5u32 {
            p.insert(k);
        }
        assert_eq!(p.evict(&mut |k| *k != 0), Some(1));
        assert_eq!(p.slab.keys(&p.small), vec![4, 3, 2, 0]);
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn ghost_is_bounded_by_resident_count() {
        let mut p = S3Fifo::new();
        for k in 0..10_000u32 {
            p.insert(k);
            while p.len() > 100 {
                p.evict(&mut |_| true);
            }
        }
        assert_eq!(p.len(), 100);
        assert!(p.ghost.len() <= 90, "ghost holds {}", p.ghost.len());
        assert_eq!(p.index.len(), p.len() + p.ghost.len());
    }
}
