//! Byte-range allocation inside one DRAM segment (the master owns it; the
//! node never allocates). Best fit over free ranges, coalescing on free.

use std::collections::{BTreeMap, BTreeSet};

/// Offsets and lengths are rounded up to this, so blocks start cache-line
/// aligned and tiny fragments never appear.
pub const ALIGN: u64 = 64;

/// Free-range allocator of one segment.
#[derive(Debug, Clone)]
pub struct RangeAllocator {
    size: u64,
    /// offset -> len of each free range.
    free_by_offset: BTreeMap<u64, u64>,
    /// (len, offset) of each free range, for best fit.
    free_by_len: BTreeSet<(u64, u64)>,
    used: u64,
}

pub fn round_up(len: u64) -> u64 {
    len.div_ceil(ALIGN).saturating_mul(ALIGN)
}

impl RangeAllocator {
    pub fn new(size: u64) -> Self {
        let size = size / ALIGN * ALIGN;
        let mut a = RangeAllocator { size, free_by_offset: BTreeMap::new(), free_by_len: BTreeSet::new(), used: 0 };
        if size > 0 {
            a.insert_free(0, size);
        }
        a
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn free(&self) -> u64 {
        self.size - self.used
    }

    /// The largest single range that could be allocated now.
    pub fn largest_free(&self) -> u64 {
        self.free_by_len.last().map_or(0, |&(len, _)| len)
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.insert(offset, len);
        self.free_by_len.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.remove(&offset);
        self.free_by_len.remove(&(len, offset));
    }

    /// Reserves `len` bytes (rounded up to [`ALIGN`]); returns the offset.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let need = round_up(len.max(1));
        let &(free_len, offset) = self.free_by_len.range((need, 0)..).next()?;
        self.remove_free(offset, free_len);
        if free_len > need {
            self.insert_free(offset + need, free_len - need);
        }
        self.used += need;
        Some(offset)
    }

    /// Marks `[offset, offset+len)` used, e.g. when rebuilding from persisted
    /// metadata. False if any of it is not free (a conflict the caller drops).
    pub fn reserve_at(&mut self, offset: u64, len: u64) -> bool {
        let need = round_up(len.max(1));
        if !offset.is_multiple_of(ALIGN) {
            return false;
        }
        let Some((&start, &free_len)) = self.free_by_offset.range(..=offset).next_back() else {
            return false;
        };
        let Some(end) = offset.checked_add(need) else { return false };
        if end > start + free_len {
            return false;
        }
        self.remove_free(start, free_len);
        if offset > start {
            self.insert_free(start, offset - start);
        }
        if start + free_len > end {
            self.insert_free(end, start + free_len - end);
        }
        self.used += need;
        true
    }

    /// Returns a range from [`alloc`](Self::alloc) or
    /// [`reserve_at`](Self::reserve_at), merging it with free neighbours.
    pub fn release(&mut self, offset: u64, len: u64) {
        let mut start = offset;
        let mut len = round_up(len.max(1));
        debug_assert!(start + len <= self.size, "released range outside the segment");
        self.used = self.used.saturating_sub(len);
        if let Some((&prev, &prev_len)) = self.free_by_offset.range(..start).next_back() {
            debug_assert!(prev + prev_len <= start, "double free at {start}");
            if prev + prev_len == start {
                self.remove_free(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free_by_offset.get(&(start + len)) {
            self.remove_free(start + len, next_len);
            len += next_len;
        }
        self.insert_free(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn alloc_free_coalesces_back_to_one_range() {
        let mut a = RangeAllocator::new(1 << 20);
        let x = a.alloc(1000).unwrap();
        let y = a.alloc(5000).unwrap();
        let z = a.alloc(64).unwrap();
        assert_eq!(a.used(), round_up(1000) + round_up(5000) + 64);
        a.release(y, 5000);
        a.release(x, 1000);
        a.release(z, 64);
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), 1 << 20);
        assert!(a.alloc((1 << 20) + 1).is_none());
    }

    #[test]
    fn reserve_at_splits_and_rejects_overlap() {
        let mut a = RangeAllocator::new(4096);
        assert!(a.reserve_at(1024, 100));
        assert!(!a.reserve_at(1024, 100), "already used");
        assert!(!a.reserve_at(1000, 100), "unaligned");
        assert!(!a.reserve_at(4032, 128), "past the end");
        assert_eq!(a.free(), 4096 - 128);
        a.release(1024, 100);
        assert_eq!(a.largest_free(), 4096);
    }

    #[test]
    fn random_workload_never_overlaps() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut a = RangeAllocator::new(1 << 22);
        let mut live: Vec<(u64, u64)> = Vec::new();
        for _ in 0..20_000 {
            if rng.random_bool(0.55) {
                let len = rng.random_range(1..200_000);
                if let Some(off) = a.alloc(len) {
                    for &(o, l) in &live {
                        assert!(off + round_up(len) <= o || o + round_up(l) <= off, "overlap");
                    }
                    live.push((off, len));
                }
            } else if !live.is_empty() {
                let (o, l) = live.swap_remove(rng.random_range(0..live.len()));
                a.release(o, l);
            }
            let sum: u64 = live.iter().map(|&(_, l)| round_up(l)).sum();
            assert_eq!(a.used(), sum);
        }
    }
}
