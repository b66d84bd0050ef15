//! Attention over a paged KV cache.
//!
//! The pool is an array of pages; a page holds `page_tokens` tokens for all
//! layers, laid out `[layer][k|v][token][kv_head][head_dim]` (DESIGN.md §3),
//! so one layer of one page is one contiguous range. A sequence's block
//! table lists its pages in order; token `t` lives in page
//! `table[t / page_tokens]`, slot `t % page_tokens`.
//!
//! **Split-K.** A token's context is cut into fixed chunks of
//! [`CHUNK_TOKENS`] positions (`0..64`, `64..128`, …, whatever the page
//! size). Each chunk gives a partial softmax per query head: its score
//! maximum, its sum of exponentials and its unnormalised weighted sum of V
//! rows. The partials are folded strictly left to right, then divided by the
//! final sum. A chunk's partial depends only on its own tokens, so running
//! the chunks of one token in order on one thread ([`attend`]) or spreading
//! them over the pool and folding afterwards ([`attend_batch`]) gives the
//! same bits: a token's result never depends on how requests were batched
//! or chunked, nor on the thread count, and one long decode row still
//! keeps every core busy (flash-decoding).
//!
//! - `chunk` — the portable chunk kernel (the test oracle) and the fold.
//! - `avx2` — the AVX2/FMA chunk kernel: eight tokens' scores per
//!   transposed reduction, a vectorised `exp`, V sums in registers, the next
//!   chunk's rows prefetched.

mod avx2;
mod chunk;
#[cfg(test)]
mod tests;

use crate::cpu::{simd_level, SimdLevel};
use half::bf16;
use rayon::prelude::*;

/// Context positions per split-K chunk. Fixed: chunk boundaries are part of
/// the numerics (see the module docs).
pub const CHUNK_TOKENS: usize = 64;

/// Split tasks per pool thread when a batch is too small to keep every
/// thread busy with whole rows.
const TASKS_PER_THREAD: usize = 4;

mod sealed {
    /// The storage of a KV element, for the SIMD loads.
    pub trait Repr {
        /// Stored as the high half of an f32 (bf16) rather than as f32.
        const BF16: bool;
    }
}

/// A KV cache element type (f32 or bf16; sealed, the SIMD kernels read the
/// storage directly).
pub trait KvElem: sealed::Repr + Copy + Default + Send + Sync + 'static {
    const NAME: &'static str;
    fn from_f32(v: f32) -> Self;
    /// Gives `f` the row as f32: `src` itself for f32, else converted into `buf`.
    fn with_f32<R>(src: &[Self], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R;
}

impl sealed::Repr for f32 {
    const BF16: bool = false;
}

impl KvElem for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn with_f32<R>(src: &[Self], _buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(src)
    }
}

impl sealed::Repr for bf16 {
    const BF16: bool = true;
}

impl KvElem for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn with_f32<R>(src: &[Self], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        let buf = &mut buf[..src.len()];
        for (o, &v) in buf.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
        f(buf)
    }
}

/// The shape of the paged pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub page_tokens: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Elements of one token's K (or V) for one layer, all heads.
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Elements of one layer of one page (K then V).
    pub fn layer_elems(&self) -> usize {
        2 * self.page_tokens * self.row_elems()
    }
    /// Elements of one page.
    pub fn page_elems(&self) -> usize {
        self.num_layers * self.layer_elems()
    }
    /// Offset of the K row of `slot` in `page` at `layer`.
    pub fn k_offset(&self, page: usize, layer: usize, slot: usize) -> usize {
        page * self.page_elems() + layer * self.layer_elems() + slot * self.row_elems()
    }
    /// Offset of the V row of `slot` in `page` at `layer`.
    pub fn v_offset(&self, page: usize, layer: usize, slot: usize) -> usize {
        self.k_offset(page, layer, slot) + self.page_tokens * self.row_elems()
    }
}

/// One attention problem: every query head of one token.
#[derive(Debug, Clone, Copy)]
pub struct AttendArgs<'a> {
    pub geometry: KvGeometry,
    pub layer: usize,
    /// The sequence's pages, in token order.
    pub block_table: &'a [u32],
    /// Attend to tokens `0..context_len` (causal: the query's position + 1).
    pub context_len: usize,
    /// Usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// One query row of a batch: the sequence it reads and how far.
#[derive(Debug, Clone, Copy)]
pub struct BatchRow<'a> {
    /// The sequence's pages, in token order.
    pub block_table: &'a [u32],
    /// Attend to tokens `0..context_len`.
    pub context_len: usize,
}

/// A batch of query rows over one layer of one pool.
#[derive(Debug, Clone, Copy)]
pub struct BatchArgs<'a> {
    pub geometry: KvGeometry,
    pub layer: usize,
    /// Usually `1/sqrt(head_dim)`.
    pub scale: f32,
    pub rows: &'a [BatchRow<'a>],
}

/// Reusable buffers of the chunk kernels.
#[derive(Debug, Default)]
pub struct AttendScratch {
    /// K row offsets of the chunk's tokens (then the next chunk's).
    rows: Vec<usize>,
    /// `heads × CHUNK_TOKENS` scores, then probabilities.
    scores: Vec<f32>,
    /// One chunk's partial.
    part: Vec<f32>,
    /// One row converted to f32 (bf16 on the portable kernel).
    row_buf: Vec<f32>,
}

/// `out[h] = softmax(q[h] · K[kv(h)]ᵀ · scale) · V[kv(h)]` for every query
/// head `h` of `q` (`num_heads × head_dim`, heads grouped by KV head as in
/// Llama: query head `h` uses KV head `h / group`), on the calling thread.
pub fn attend<T: KvElem>(q: &[f32], pool: &[T], args: &AttendArgs<'_>, out: &mut [f32], scratch: &mut AttendScratch) {
    attend_with(simd_level(), q, pool, args, out, scratch)
}

/// [`attend`] at a given SIMD level (tests compare the levels; a level above
/// what the CPU supports is lowered to the detected one).
pub fn attend_with<T: KvElem>(
    level: SimdLevel,
    q: &[f32],
    pool: &[T],
    args: &AttendArgs<'_>,
    out: &mut [f32],
    scratch: &mut AttendScratch,
) {
    let row = BatchRow { block_table: args.block_table, context_len: args.context_len };
    let p = Problem::new(level.min(simd_level()), q, pool, &args.geometry, args.layer, args.scale, &row);
    assert_eq!(q.len(), out.len(), "attend: out length");
    let mut state = vec![0f32; p.part_len()];
    p.fold_chunks(0..p.chunks(), &mut state, scratch);
    p.finish(&state, out);
}

/// [`attend`] for every row of a batch (`q` and `out` are `rows × q_dim`),
/// on the rayon pool: whole rows per task when there are enough of them,
/// else rows split into runs of chunks whose partials are folded after.
/// Bit-identical to [`attend`] row by row.
pub fn attend_batch<T: KvElem>(q: &[f32], pool: &[T], args: &BatchArgs<'_>, out: &mut [f32]) {
    attend_batch_with(simd_level(), q, pool, args, out)
}

/// [`attend_batch`] at a given SIMD level.
pub fn attend_batch_with<T: KvElem>(level: SimdLevel, q: &[f32], pool: &[T], args: &BatchArgs<'_>, out: &mut [f32]) {
    let level = level.min(simd_level());
    let n = args.rows.len();
    assert_eq!(q.len(), out.len(), "attend_batch: out length");
    if n == 0 {
        return;
    }
    assert!(q.len().is_multiple_of(n), "attend_batch: q is not rows × q_dim");
    let q_dim = q.len() / n;
    let problem = |r: usize| {
        Problem::new(level, &q[r * q_dim..(r + 1) * q_dim], pool, &args.geometry, args.layer, args.scale, &args.rows[r])
    };
    let chunks: Vec<usize> = args.rows.iter().map(|r| r.context_len.div_ceil(CHUNK_TOKENS)).collect();
    let total: usize = chunks.iter().sum();
    let threads = rayon::current_num_threads();
    // Chunks per task: whole rows when rows alone balance the pool.
    let per_task = total.div_ceil(threads * TASKS_PER_THREAD).max(1);

    // Rows longer than `per_task` chunks are split; their partials go to
    // `slots` (one per chunk; the first task of a row stores its own fold
    // in the row's first slot).
    let part_len = problem(0).part_len();
    let split: Vec<bool> = chunks.iter().map(|&c| threads > 1 && c > per_task).collect();
    let slot_base: Vec<usize> = chunks
        .iter()
        .zip(&split)
        .scan(0, |acc, (&c, &s)| {
            let base = *acc;
            *acc += if s { c * part_len } else { 0 };
            Some(base)
        })
        .collect();
    let slot_total = chunks.iter().zip(&split).map(|(&c, &s)| if s { c * part_len } else { 0 }).sum();
    let mut slots = vec![0f32; slot_total];

    let mut tasks: Vec<Task<'_>> = Vec::new();
    // Split rows' outputs, written after their chunks are folded.
    let mut merges: Vec<(usize, &mut [f32])> = Vec::new();
    let mut rest: &mut [f32] = &mut slots;
    for (r, out_row) in out.chunks_exact_mut(q_dim).enumerate().take(n) {
        if !split[r] {
            tasks.push(Task::Row { row: r, out: out_row });
            continue;
        }
        merges.push((r, out_row));
        let runs = chunks[r].div_ceil(per_task);
        for k in 0..runs {
            let (c0, c1) = (chunks[r] * k / runs, chunks[r] * (k + 1) / runs);
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut((c1 - c0) * part_len);
            rest = tail;
            tasks.push(Task::Chunks { row: r, chunks: c0..c1, slots: mine });
        }
    }
    tasks.into_par_iter().for_each_init(AttendScratch::default, |scratch, task| match task {
        Task::Row { row, out } => {
            let p = problem(row);
            let mut state = vec![0f32; part_len];
            p.fold_chunks(0..p.chunks(), &mut state, scratch);
            p.finish(&state, out);
        }
        Task::Chunks { row, chunks, slots } => {
            let p = problem(row);
            if chunks.start == 0 {
                p.fold_chunks(chunks, &mut slots[..part_len], scratch);
            } else {
                for (c, part) in chunks.zip(slots.chunks_exact_mut(part_len)) {
                    p.chunk(c, part, scratch);
                }
            }
        }
    });

    // Fold the split rows: the first run's fold, then every later chunk.
    merges.into_par_iter().for_each(|(r, out)| {
        let p = problem(r);
        let runs = chunks[r].div_ceil(per_task);
        let first_end = chunks[r] / runs;
        let row_slots = &slots[slot_base[r]..slot_base[r] + chunks[r] * part_len];
        let mut state = row_slots[..part_len].to_vec();
        for part in row_slots.chunks_exact(part_len).skip(first_end) {
            p.fold(&mut state, part);
        }
        p.finish(&state, out);
    });
}

/// A unit of [`attend_batch`] work.
enum Task<'a> {
    /// A whole row, folded and normalised into its output.
    Row { row: usize, out: &'a mut [f32] },
    /// A run of one row's chunks, each partial into its slot (the first run
    /// folds its chunks into its first slot).
    Chunks { row: usize, chunks: std::ops::Range<usize>, slots: &'a mut [f32] },
}

/// One query row's attention problem, validated.
struct Problem<'a, T> {
    level: SimdLevel,
    q: &'a [f32],
    pool: &'a [T],
    geo: KvGeometry,
    layer: usize,
    table: &'a [u32],
    context_len: usize,
    scale: f32,
    heads: usize,
}

impl<'a, T: KvElem> Problem<'a, T> {
    fn new(
        level: SimdLevel,
        q: &'a [f32],
        pool: &'a [T],
        geo: &KvGeometry,
        layer: usize,
        scale: f32,
        row: &BatchRow<'a>,
    ) -> Self {
        let d = geo.head_dim;
        assert!(d > 0 && geo.num_kv_heads > 0, "attend: empty heads");
        assert!(q.len().is_multiple_of(geo.row_elems()), "attend: q is not a whole number of head groups");
        assert!(row.context_len > 0, "attend: empty context");
        assert!(layer < geo.num_layers, "attend: layer out of range");
        let pages_needed = row.context_len.div_ceil(geo.page_tokens);
        assert!(row.block_table.len() >= pages_needed, "attend: block table too short");
        Self {
            level,
            q,
            pool,
            geo: *geo,
            layer,
            table: row.block_table,
            context_len: row.context_len,
            scale,
            heads: q.len() / d,
        }
    }

    fn chunks(&self) -> usize {
        self.context_len.div_ceil(CHUNK_TOKENS)
    }

    /// Floats of one partial: per head its max, its sum and `head_dim` sums.
    fn part_len(&self) -> usize {
        self.heads * (self.geo.head_dim + 2)
    }

    /// The K row offsets of chunk `c`'s tokens, appended to `rows`; every
    /// page they touch lies inside the pool.
    fn chunk_rows(&self, c: usize, rows: &mut Vec<usize>) {
        let geo = &self.geo;
        let (t0, t1) = (c * CHUNK_TOKENS, ((c + 1) * CHUNK_TOKENS).min(self.context_len));
        let mut t = t0;
        while t < t1 {
            let page = self.table[t / geo.page_tokens] as usize;
            assert!((page + 1) * geo.page_elems() <= self.pool.len(), "attend: page {page} outside the pool");
            let slot = t % geo.page_tokens;
            let end = t1.min(t - slot + geo.page_tokens);
            let base = geo.k_offset(page, self.layer, slot);
            rows.extend((0..end - t).map(|i| base + i * geo.row_elems()));
            t = end;
        }
    }

    /// Chunk `c`'s partial into `part`.
    fn chunk(&self, c: usize, part: &mut [f32], scratch: &mut AttendScratch) {
        let geo = &self.geo;
        scratch.rows.clear();
        self.chunk_rows(c, &mut scratch.rows);
        let n = scratch.rows.len();
        if c + 1 < self.chunks() {
            self.chunk_rows(c + 1, &mut scratch.rows);
        }
        let (rows, next) = scratch.rows.split_at(n);
        scratch.scores.resize(self.heads * CHUNK_TOKENS, 0.0);
        let v_off = geo.page_tokens * geo.row_elems();
        let shape = chunk::Shape { heads: self.heads, head_dim: geo.head_dim, kv_heads: geo.num_kv_heads, v_off };
        match self.level {
            // SAFETY: `SimdLevel::Avx2` and above are only reported when the
            // CPU has AVX2 and FMA; every row offset addresses a K row (and, `v_off`
            // further, its V row) inside a page that lies in the pool.
            SimdLevel::Avx2 | SimdLevel::Avx512 if geo.head_dim.is_multiple_of(8) => unsafe {
                avx2::chunk(self.q, self.pool, rows, next, &shape, self.scale, part, &mut scratch.scores)
            },
            SimdLevel::Avx2 | SimdLevel::Avx512 => chunk::portable::<T, chunk::Avx2Math>(
                self.q,
                self.pool,
                rows,
                &shape,
                self.scale,
                part,
                &mut scratch.scores,
                &mut scratch.row_buf,
            ),
            SimdLevel::Scalar => chunk::portable::<T, chunk::ScalarMath>(
                self.q,
                self.pool,
                rows,
                &shape,
                self.scale,
                part,
                &mut scratch.scores,
                &mut scratch.row_buf,
            ),
        }
    }

    /// The left fold of chunks `range` (starting at chunk 0) into `state`.
    fn fold_chunks(&self, range: std::ops::Range<usize>, state: &mut [f32], scratch: &mut AttendScratch) {
        debug_assert_eq!(range.start, 0);
        let mut part = std::mem::take(&mut scratch.part);
        part.resize(self.part_len(), 0.0);
        for c in range {
            if c == 0 {
                self.chunk(0, state, scratch);
            } else {
                self.chunk(c, &mut part, scratch);
                self.fold(state, &part);
            }
        }
        scratch.part = part;
    }

    fn fold(&self, state: &mut [f32], part: &[f32]) {
        chunk::fold(state, part, self.geo.head_dim);
    }

    fn finish(&self, state: &[f32], out: &mut [f32]) {
        chunk::finish(state, out, self.geo.head_dim);
    }
}
