//! The paged KV cache: a pool of fixed-size pages, each holding
//! `page_tokens` tokens for all layers in the layout of DESIGN.md §3
//! (`[layer][k|v][token][kv_head][head_dim]`), and per-sequence block
//! tables.
//!
//! Pages are reference-counted so sequences can share a cached prefix: a
//! full page may be shared; a sequence only ever writes into pages it owns
//! alone (the page that holds its next token).

use crate::error::{ModelError, Result};
use half::bf16;
use std::str::FromStr;
use tandem_kernels::attention::KvGeometry;

/// Element type of cached K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDType {
    #[default]
    F32,
    BF16,
}

impl KvDType {
    pub fn name(self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::BF16 => "bf16",
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::BF16 => 2,
        }
    }
}

impl FromStr for KvDType {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(KvDType::F32),
            "bf16" => Ok(KvDType::BF16),
            other => Err(ModelError::Request(format!("unknown KV dtype '{other}' (use f32 or bf16)"))),
        }
    }
}

/// The pool's storage, one variant per element type.
#[derive(Debug)]
pub enum KvPool {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
}

/// A sequence's place in the cache: its pages, in order, and how many
/// tokens they hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqKv {
    pages: Vec<u32>,
    len: usize,
}

impl SeqKv {
    pub fn block_table(&self) -> &[u32] {
        &self.pages
    }
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The paged KV cache of one engine.
#[derive(Debug)]
pub struct KvCache {
    geometry: KvGeometry,
    pool: KvPool,
    refs: Vec<u32>,
    free: Vec<u32>,
}

/// `n` copies of `value` in memory the kernel may back with transparent huge
/// pages (Linux `MADV_HUGEPAGE`, asked before the first touch; elsewhere, or
/// where the kernel says no, ordinary pages). Attention reads a KV pool one
/// page (a few KiB) at a time at scattered addresses: with 4 KiB pages each
/// of those pieces costs TLB misses that a contiguous scan does not.
pub fn huge_page_vec<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let (start, len) = (v.as_mut_ptr() as usize, n.saturating_mul(std::mem::size_of::<T>()));
        let aligned = start.next_multiple_of(PAGE);
        let usable = (start + len).saturating_sub(aligned) / PAGE * PAGE;
        if usable > 0 {
            // SAFETY: the range lies inside this vector's allocation (rounded
            // inwards to whole pages), which nothing else references yet;
            // `MADV_HUGEPAGE` is advice and does not change the contents.
            // Failure (no THP in this kernel) leaves ordinary pages.
            let _ = unsafe { libc::madvise(aligned as *mut libc::c_void, usable, libc::MADV_HUGEPAGE) };
        }
    }
    v.resize(n, value);
    v
}

/// Pools larger than this are refused (a config error, not an OOM).
const MAX_POOL_BYTES: usize = 256 << 30;

impl KvCache {
    pub fn new(geometry: KvGeometry, num_pages: usize, dtype: KvDType) -> Result<Self> {
        if geometry.page_tokens == 0 || num_pages == 0 {
            return Err(ModelError::Request("KV cache needs page_tokens > 0 and at least one page".into()));
        }
        if num_pages > u32::MAX as usize {
            return Err(ModelError::Request(format!("{num_pages} KV pages is too many")));
        }
        let elems = geometry
            .page_elems()
            .checked_mul(num_pages)
            .filter(|e| e.saturating_mul(dtype.bytes()) <= MAX_POOL_BYTES)
            .ok_or_else(|| {
                ModelError::Request(format!("a KV pool of {num_pages} pages exceeds {MAX_POOL_BYTES} bytes"))
            })?;
        let pool = match dtype {
            KvDType::F32 => KvPool::F32(huge_page_vec(elems, 0.0)),
            KvDType::BF16 => KvPool::BF16(huge_page_vec(elems, bf16::ZERO)),
        };
        Ok(Self { geometry, pool, refs: vec![0; num_pages], free: (0..num_pages as u32).rev().collect() })
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geometry
    }
    pub fn pool(&self) -> &KvPool {
        &self.pool
    }
    pub fn dtype(&self) -> KvDType {
        match self.pool {
            KvPool::F32(_) => KvDType::F32,
            KvPool::BF16(_) => KvDType::BF16,
        }
    }
    pub fn num_pages(&self) -> usize {
        self.refs.len()
    }
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }
    /// Pages needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.geometry.page_tokens)
    }

    /// Grows `seq`'s block table so it can hold `tokens` tokens. On failure
    /// nothing is allocated.
    pub fn reserve(&mut self, seq: &mut SeqKv, tokens: usize) -> Result<()> {
        let needed = self.pages_for(tokens).saturating_sub(seq.pages.len());
        if needed > self.free.len() {
            return Err(ModelError::CacheFull { needed, free: self.free.len() });
        }
        for _ in 0..needed {
            let page = self.free.pop().expect("checked above");
            debug_assert_eq!(self.refs[page as usize], 0);
            self.refs[page as usize] = 1;
            seq.pages.push(page);
        }
        Ok(())
    }

    /// A new sequence sharing the first `tokens` tokens of `src`, which must
    /// be a whole number of pages (only full pages are ever shared).
    pub fn share_prefix(&mut self, src: &SeqKv, tokens: usize) -> Result<SeqKv> {
        if !tokens.is_multiple_of(self.geometry.page_tokens) || tokens > src.len {
            return Err(ModelError::Request(format!(
                "can only share whole cached pages: {tokens} tokens of {} with pages of {}",
                src.len, self.geometry.page_tokens
            )));
        }
        let pages = src.pages[..tokens / self.geometry.page_tokens].to_vec();
        for &p in &pages {
            self.refs[p as usize] += 1;
        }
        Ok(SeqKv { pages, len: tokens })
    }

    /// Returns `seq`'s pages to the pool (shared pages when their last user
    /// lets go).
    pub fn release(&mut self, seq: SeqKv) {
        for p in seq.pages {
            let r = &mut self.refs[p as usize];
            assert!(*r > 0, "page {p} released twice");
            *r -= 1;
            if *r == 0 {
                self.free.push(p);
            }
        }
    }

    /// Records that `seq` now holds `len` tokens (after the forward pass
    /// wrote them).
    pub(crate) fn set_len(&self, seq: &mut SeqKv, len: usize) {
        assert!(len <= seq.pages.len() * self.geometry.page_tokens, "sequence outgrew its pages");
        seq.len = len;
    }

    /// Whether `seq` may write token position `pos` (its page is not shared).
    pub(crate) fn is_writable(&self, seq: &SeqKv, pos: usize) -> bool {
        seq.pages.get(pos / self.geometry.page_tokens).is_some_and(|&p| self.refs[p as usize] == 1)
    }

    /// Writes K and V rows (all heads) of the token at `pos` of `seq` for
    /// `layer`.
    pub(crate) fn write(&mut self, seq: &SeqKv, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let g = self.geometry;
        let page = seq.pages[pos / g.page_tokens] as usize;
        let slot = pos % g.page_tokens;
        let (ko, vo, n) = (g.k_offset(page, layer, slot), g.v_offset(page, layer, slot), g.row_elems());
        match &mut self.pool {
            KvPool::F32(p) => {
                p[ko..ko + n].copy_from_slice(k);
                p[vo..vo + n].copy_from_slice(v);
            }
            KvPool::BF16(p) => {
                for (d, &s) in p[ko..ko + n].iter_mut().zip(k) {
                    *d = bf16::from_f32(s);
                }
                for (d, &s) in p[vo..vo + n].iter_mut().zip(v) {
                    *d = bf16::from_f32(s);
                }
            }
        }
    }
}

/// Exchange of whole pages with the KV store: one page is one store block
/// (DESIGN.md §3), `[layer][k|v][token][kv_head][head_dim]` for all layers,
/// so one layer of a page is one contiguous byte range.
impl KvCache {
    /// Bytes of one page (one store block).
    pub fn block_bytes(&self) -> usize {
        self.geometry.page_elems() * self.dtype().bytes()
    }

    /// Bytes of one layer of one page.
    pub fn layer_block_bytes(&self) -> usize {
        self.geometry.layer_elems() * self.dtype().bytes()
    }

    fn page_range(&self, page: u32) -> Result<std::ops::Range<usize>> {
        let page = page as usize;
        if page >= self.num_pages() {
            return Err(ModelError::Request(format!("page {page} is outside a pool of {}", self.num_pages())));
        }
        let n = self.geometry.page_elems();
        Ok(page * n..(page + 1) * n)
    }

    /// The bytes of `page`, as stored in the KV store.
    pub fn page_bytes(&self, page: u32) -> Result<&[u8]> {
        let r = self.page_range(page)?;
        Ok(match &self.pool {
            KvPool::F32(p) => bytemuck::cast_slice(&p[r]),
            KvPool::BF16(p) => bytemuck::cast_slice(&p[r]),
        })
    }

    /// The bytes of `layer` of `page` (a prefix writes them while the next
    /// layer computes).
    pub fn layer_bytes(&self, page: u32, layer: usize) -> Result<&[u8]> {
        if layer >= self.geometry.num_layers {
            return Err(ModelError::Request(format!("layer {layer} of {}", self.geometry.num_layers)));
        }
        let n = self.layer_block_bytes();
        Ok(&self.page_bytes(page)?[layer * n..(layer + 1) * n])
    }

    /// Appends full blocks fetched from the store to `seq`, which must hold
    /// a whole number of pages. On error nothing is allocated or changed.
    pub fn append_blocks(&mut self, seq: &mut SeqKv, blocks: &[&[u8]]) -> Result<()> {
        let pt = self.geometry.page_tokens;
        if !seq.len.is_multiple_of(pt) || seq.pages.len() != seq.len / pt {
            return Err(ModelError::Request(format!(
                "blocks can only extend a sequence of whole pages ({} tokens, {} pages of {pt})",
                seq.len,
                seq.pages.len()
            )));
        }
        let want = self.block_bytes();
        if let Some(bad) = blocks.iter().find(|b| b.len() != want) {
            return Err(ModelError::Fetch(format!("a KV block of {} bytes, expected {want}", bad.len())));
        }
        let tokens = seq.len + blocks.len() * pt;
        let first_new = seq.pages.len();
        self.reserve(seq, tokens)?;
        for (i, block) in blocks.iter().enumerate() {
            let r = self.page_range(seq.pages[first_new + i])?;
            match &mut self.pool {
                KvPool::F32(p) => bytemuck::cast_slice_mut::<f32, u8>(&mut p[r]).copy_from_slice(block),
                KvPool::BF16(p) => bytemuck::cast_slice_mut::<bf16, u8>(&mut p[r]).copy_from_slice(block),
            }
        }
        seq.len = tokens;
        Ok(())
    }
}

impl KvCache {
    /// Appends one partial block: the first `tokens` token slots of
    /// `block` (a whole page's bytes, as [`KvCache::page_bytes`] gives
    /// them; the slots past `tokens` are ignored). `seq` must hold a whole
    /// number of pages. On error nothing changes.
    pub fn append_partial(&mut self, seq: &mut SeqKv, block: &[u8], tokens: usize) -> Result<()> {
        let pt = self.geometry.page_tokens;
        if tokens == 0 || tokens >= pt {
            return Err(ModelError::Fetch(format!("a partial block of {tokens} tokens (pages hold {pt})")));
        }
        self.append_blocks(seq, &[block])?;
        seq.len -= pt - tokens;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(pages: usize) -> KvCache {
        let g = KvGeometry { page_tokens: 4, num_layers: 2, num_kv_heads: 1, head_dim: 2 };
        KvCache::new(g, pages, KvDType::F32).unwrap()
    }

    #[test]
    fn huge_page_vectors_hold_exactly_their_values() {
        for n in [0, 1, 1023, (4 << 20) + 3] {
            let v = huge_page_vec(n, 1.5f32);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 1.5));
            let b = huge_page_vec(n, bf16::from_f32(-2.0));
            assert!(b.len() == n && b.iter().all(|&x| x.to_f32() == -2.0));
        }
        // A pool starts zeroed whatever memory backs it.
        let g = KvGeometry { page_tokens: 16, num_layers: 2, num_kv_heads: 3, head_dim: 64 };
        let c = KvCache::new(g, 4096, KvDType::BF16).unwrap();
        assert!((0..4096).all(|p| c.page_bytes(p).unwrap().iter().all(|&x| x == 0)));
    }

    #[test]
    fn reserve_and_release_return_every_page() {
        let mut c = cache(5);
        let mut a = SeqKv::default();
        c.reserve(&mut a, 9).unwrap();
        assert_eq!(a.block_table().len(), 3);
        assert_eq!(c.free_pages(), 2);
        let mut b = SeqKv::default();
        let err = c.reserve(&mut b, 12).unwrap_err();
        assert!(matches!(err, ModelError::CacheFull { needed: 3, free: 2 }));
        assert!(b.block_table().is_empty(), "a failed reserve allocates nothing");
        c.release(a);
        assert_eq!(c.free_pages(), 5);
    }

    #[test]
    fn shared_prefix_pages_live_until_the_last_user_releases() {
        let mut c = cache(4);
        let mut a = SeqKv::default();
        c.reserve(&mut a, 8).unwrap();
        c.set_len(&mut a, 8);
        assert!(c.share_prefix(&a, 6).is_err(), "only whole pages are shared");
        let mut b = c.share_prefix(&a, 4).unwrap();
        assert!(!c.is_writable(&b, 3));
        c.reserve(&mut b, 6).unwrap();
        assert!(c.is_writable(&b, 5));
        c.release(a);
        assert_eq!(c.free_pages(), 2);
        c.release(b);
        assert_eq!(c.free_pages(), 4);
    }

    #[test]
    fn blocks_round_trip_between_caches() {
        for dtype in [KvDType::F32, KvDType::BF16] {
            let g = KvGeometry { page_tokens: 4, num_layers: 2, num_kv_heads: 1, head_dim: 2 };
            let mut a = KvCache::new(g, 4, dtype).unwrap();
            let mut s = SeqKv::default();
            a.reserve(&mut s, 8).unwrap();
            for pos in 0..8 {
                for layer in 0..2 {
                    let k = [pos as f32, layer as f32];
                    let v = [-(pos as f32), 0.5];
                    a.write(&s, layer, pos, &k, &v);
                }
            }
            a.set_len(&mut s, 8);
            let blocks: Vec<Vec<u8>> = s.block_table().iter().map(|&p| a.page_bytes(p).unwrap().to_vec()).collect();
            assert_eq!(blocks[0].len(), a.block_bytes());
            assert_eq!(a.layer_bytes(s.block_table()[1], 1).unwrap(), &blocks[1][a.layer_block_bytes()..]);
            let mut b = KvCache::new(g, 3, dtype).unwrap();
            let mut t = SeqKv::default();
            let views: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            b.append_blocks(&mut t, &views).unwrap();
            assert_eq!(t.len(), 8);
            for (i, &p) in t.block_table().iter().enumerate() {
                assert_eq!(b.page_bytes(p).unwrap(), blocks[i].as_slice());
            }
            // Wrong sizes and a full pool change nothing.
            let mut u = SeqKv::default();
            assert!(b.append_blocks(&mut u, &[&blocks[0][1..]]).is_err());
            assert!(b.append_blocks(&mut u, &[&blocks[0], &blocks[1]]).is_err(), "only one page left");
            assert_eq!((u.len(), b.free_pages()), (0, 1));
            assert!(b.page_bytes(99).is_err());
        }
    }

    #[test]
    fn absurd_pools_are_refused() {
        let g = KvGeometry { page_tokens: 1 << 20, num_layers: 1 << 10, num_kv_heads: 64, head_dim: 128 };
        assert!(KvCache::new(g, 1 << 20, KvDType::F32).is_err());
        assert!("f16".parse::<KvDType>().is_err());
    }
}
