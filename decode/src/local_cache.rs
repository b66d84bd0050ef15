//! The colocated mode's own prefix cache: full KV blocks (whole-page
//! bytes) under their prefix-chained keys, least recently used first out,
//! bounded by bytes.
//!
//! The engine thread owns it, so it needs no lock. Equal keys mean equal
//! bytes (the key commits to the model, the layout and the whole token
//! prefix), so a block already held is only touched, never replaced.

use std::collections::{BTreeMap, HashMap};
use tandem_proto::BlockKey;

#[derive(Debug)]
struct Entry {
    bytes: Vec<u8>,
    /// When it was last used: its key in `by_use`.
    used: u64,
}

/// A byte-bounded LRU map from block key to block bytes.
#[derive(Debug)]
pub struct LocalCache {
    capacity_bytes: u64,
    held_bytes: u64,
    entries: HashMap<BlockKey, Entry>,
    /// Use ticks, oldest first: the eviction order.
    by_use: BTreeMap<u64, BlockKey>,
    tick: u64,
}

impl LocalCache {
    /// An empty cache holding at most `capacity_bytes` of blocks (0: off).
    pub fn new(capacity_bytes: u64) -> LocalCache {
        LocalCache { capacity_bytes, held_bytes: 0, entries: HashMap::new(), by_use: BTreeMap::new(), tick: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    pub fn contains(&self, key: BlockKey) -> bool {
        self.entries.contains_key(&key)
    }

    fn touch(&mut self, key: BlockKey) {
        let Some(e) = self.entries.get_mut(&key) else { return };
        self.tick += 1;
        let old = std::mem::replace(&mut e.used, self.tick);
        let moved = self.by_use.remove(&old);
        debug_assert_eq!(moved, Some(key), "the use order lists every entry once");
        self.by_use.insert(self.tick, key);
    }

    /// The blocks of the longest leading run of `keys` held here, each
    /// marked as just used.
    pub fn prefix(&mut self, keys: &[BlockKey]) -> Vec<&[u8]> {
        let run = keys.iter().take_while(|k| self.entries.contains_key(k)).count();
        for &k in &keys[..run] {
            self.touch(k);
        }
        keys[..run].iter().map(|k| self.entries[k].bytes.as_slice()).collect()
    }

    /// Holds a copy of `bytes` under `key`, evicting the least recently
    /// used blocks to make room; a block larger than the whole cache is not
    /// held. A key already held is only marked as used.
    pub fn insert(&mut self, key: BlockKey, bytes: &[u8]) {
        if self.entries.contains_key(&key) {
            self.touch(key);
            return;
        }
        let size = bytes.len() as u64;
        if size > self.capacity_bytes {
            return;
        }
        while self.held_bytes + size > self.capacity_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else { break };
            if let Some(e) = self.entries.remove(&oldest) {
                self.held_bytes -= e.bytes.len() as u64;
            }
        }
        self.tick += 1;
        self.by_use.insert(self.tick, key);
        self.entries.insert(key, Entry { bytes: bytes.to_vec(), used: self.tick });
        self.held_bytes += size;
        debug_assert!(self.held_bytes <= self.capacity_bytes);
        debug_assert_eq!(self.entries.len(), self.by_use.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> BlockKey {
        BlockKey(i)
    }

    #[test]
    fn stays_within_its_byte_bound_evicting_the_least_recently_used() {
        let mut c = LocalCache::new(300);
        for i in 0..3 {
            c.insert(k(i), &[i as u8; 100]);
        }
        assert_eq!((c.len(), c.held_bytes()), (3, 300));
        // Using block 0 makes block 1 the oldest.
        assert_eq!(c.prefix(&[k(0)]).len(), 1);
        c.insert(k(3), &[3; 100]);
        assert!(c.contains(k(0)) && !c.contains(k(1)) && c.contains(k(2)) && c.contains(k(3)));
        assert_eq!(c.held_bytes(), 300);
        // A bigger block evicts as many as it needs.
        c.insert(k(4), &[4; 250]);
        assert_eq!((c.len(), c.held_bytes()), (1, 250));
        // One larger than the whole cache is not held and evicts nothing.
        c.insert(k(5), &[5; 301]);
        assert!(!c.contains(k(5)) && c.contains(k(4)));
        assert!(c.held_bytes() <= c.capacity_bytes());
    }

    #[test]
    fn the_bound_holds_under_a_seeded_random_workload() {
        // xorshift64, seeded: the same sequence every run.
        let seed = 0x5EED_u64;
        eprintln!("seed {seed:#x}");
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut c = LocalCache::new(10_000);
        for _ in 0..5_000 {
            let key = k(next() % 200);
            if next() % 3 == 0 {
                let keys: Vec<BlockKey> = (0..4).map(|i| k((key.0 + i) % 200)).collect();
                for b in c.prefix(&keys) {
                    assert!(!b.is_empty());
                }
            } else {
                let size = 1 + (next() % 1_500) as usize;
                c.insert(key, &vec![key.0 as u8; size]);
            }
            assert!(c.held_bytes() <= c.capacity_bytes());
            assert_eq!(c.entries.len(), c.by_use.len());
            assert_eq!(c.held_bytes(), c.entries.values().map(|e| e.bytes.len() as u64).sum::<u64>());
        }
    }

    #[test]
    fn a_prefix_stops_at_the_first_missing_block_and_held_blocks_keep_their_bytes() {
        let mut c = LocalCache::new(1_000);
        c.insert(k(1), b"one");
        c.insert(k(2), b"two");
        c.insert(k(4), b"four");
        assert_eq!(c.prefix(&[k(1), k(2), k(3), k(4)]), vec![&b"one"[..], &b"two"[..]]);
        assert!(c.prefix(&[k(3), k(1)]).is_empty());
        c.insert(k(1), b"uno");
        assert_eq!(c.prefix(&[k(1)]), vec![&b"one"[..]], "equal keys mean equal bytes: not replaced");
        assert_eq!(c.held_bytes(), 10);
    }

    #[test]
    fn capacity_zero_holds_nothing() {
        let mut c = LocalCache::new(0);
        c.insert(k(1), b"x");
        assert!(c.is_empty());
        assert!(c.prefix(&[k(1)]).is_empty());
    }
}
