//! Least recently used: the baseline every other policy is compared against.

use std::collections::HashMap;
use std::hash::Hash;

use super::list::{List, Slab, NIL};
use super::EvictionPolicy;

/// LRU over an index-linked list; every operation is O(1) (eviction is O(1)
/// plus the number of non-evictable keys it walks past).
#[derive(Debug)]
pub struct Lru<K> {
    index: HashMap<K, u32>,
    slab: Slab<K>,
    /// Head = most recently used.
    order: List,
}

impl<K: Copy + Eq + Hash> Lru<K> {
    /// An empty policy.
    pub fn new() -> Lru<K> {
        Lru { index: HashMap::new(), slab: Slab::new(), order: List::new() }
    }
}

impl<K: Copy + Eq + Hash> Default for Lru<K> {
    fn default() -> Self {
        Lru::new()
    }
}

impl<K: Copy + Eq + Hash + Send + std::fmt::Debug> EvictionPolicy<K> for Lru<K> {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: K) {
        if let Some(&idx) = self.index.get(&key) {
            self.slab.refresh(&mut self.order, idx);
            return;
        }
        let idx = self.slab.alloc(key, 0);
        self.slab.push_head(&mut self.order, idx);
        self.index.insert(key, idx);
    }

    fn touch(&mut self, key: &K) {
        if let Some(&idx) = self.index.get(key) {
            self.slab.refresh(&mut self.order, idx);
        }
    }

    fn remove(&mut self, key: &K) {
        if let Some(idx) = self.index.remove(key) {
            self.slab.unlink(&mut self.order, idx);
            self.slab.release(idx);
        }
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K> {
        let mut cur = self.order.tail();
        while cur != NIL {
            let key = self.slab.key(cur);
            if evictable(&key) {
                self.slab.unlink(&mut self.order, cur);
                self.slab.release(cur);
                self.index.remove(&key);
                return Some(key);
            }
            cur = self.slab.newer(cur);
        }
        None
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn drain(p: &mut Lru<u32>) -> Vec<u32> {
        std::iter::from_fn(|| p.evict(&mut |_| true)).collect()
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut p = Lru::new();
        for k in 0..5 {
            p.insert(k);
        }
        p.touch(&1);
        p.insert(0); // inserting a resident key is a touch
        assert_eq!(p.len(), 5);
        assert_eq!(drain(&mut p), vec![2, 3, 4, 1, 0]);
        assert!(p.is_empty());
    }

    #[test]
    fn skipped_keys_keep_their_place() {
        let mut p = Lru::new();
        for k in 0..4 {
            p.insert(k);
        }
        assert_eq!(p.evict(&mut |k| *k != 0), Some(1));
        // 0 is still the least recently used.
        assert_eq!(p.evict(&mut |_| true), Some(0));
        assert_eq!(p.evict(&mut |_| false), None);
        assert_eq!(p.len(), 2);
    }

    /// The obvious O(n) LRU: a vector ordered oldest first.
    #[derive(Default)]
    struct Reference(Vec<u32>);

    impl Reference {
        fn touch(&mut self, key: u32) -> bool {
            let Some(pos) = self.0.iter().position(|&k| k == key) else { return false };
            self.0.remove(pos);
            self.0.push(key);
            true
        }
        fn insert(&mut self, key: u32) {
            if !self.touch(key) {
                self.0.push(key);
            }
        }
        fn remove(&mut self, key: u32) {
            self.0.retain(|&k| k != key);
        }
        fn evict(&mut self, pinned: &dyn Fn(u32) -> bool) -> Option<u32> {
            let pos = self.0.iter().position(|&k| !pinned(k))?;
            Some(self.0.remove(pos))
        }
    }

    #[test]
    fn matches_reference_model_on_random_operations() {
        let seed = std::env::var("TANDEM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_u64);
        println!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        for round in 0..50 {
            let (mut p, mut r) = (Lru::new(), Reference::default());
            let keys = rng.random_range(1..40u32);
            for step in 0..2_000 {
                let key = rng.random_range(0..keys);
                match rng.random_range(0..10) {
                    0..=3 => {
                        p.insert(key);
                        r.insert(key);
                    }
                    4..=5 => {
                        p.touch(&key);
                        r.touch(key);
                    }
                    6 => {
                        p.remove(&key);
                        r.remove(key);
                    }
                    _ => {
                        // Pin a random residue class so skipping is exercised.
                        let (m, pinned_class) = (rng.random_range(2..5u32), rng.random_range(0..5u32));
                        let pinned = |k: u32| k % m == pinned_class;
                        let got = p.evict(&mut |k| !pinned(*k));
                        assert_eq!(got, r.evict(&pinned), "seed {seed} round {round} step {step}");
                    }
                }
                assert_eq!(p.len(), r.0.len(), "seed {seed} round {round} step {step}");
            }
            let mut rest = Vec::new();
            while let Some(k) = p.evict(&mut |_| true) {
                rest.push(k);
            }
            assert_eq!(rest, r.0, "seed {seed} round {round}: final order");
        }
    }
}
