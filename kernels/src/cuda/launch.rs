//! Launch parameters of the CUDA kernels and the host-side checks on their
//! inputs, as plain functions: grid and block sizes, shared memory, and the
//! validation that makes every device read land inside its buffer (block
//! tables against the pool, lengths against the shapes). Nothing here needs
//! a GPU, so all of it is unit-tested on the CPU.
//!
//! The sizes the kernels are compiled with live here too and reach the CUDA
//! sources as `-D` options ([`defines`]), so the two cannot disagree.

use crate::attention::{BatchRow, KvGeometry};
use crate::KernelError;

/// Threads of a warp.
pub const WARP: u32 = 32;
/// Largest head the attention kernels take: each lane holds `MAX_HEAD_DIM /
/// WARP` dimensions of a query row in registers.
pub const MAX_HEAD_DIM: usize = 256;
/// Most threads of one block on every CUDA device.
pub const MAX_BLOCK_THREADS: u32 = 1024;
/// Threads per block of the element-wise kernels (RoPE, SwiGLU).
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Most blocks of the grid-stride kernels; their threads loop over the rest.
pub const ELEMENTWISE_MAX_BLOCKS: u32 = 65_535;
/// Warps of one decode-attention block (one block per query head and row).
pub const DECODE_WARPS: u32 = 4;
/// Warps of one prefill-attention block.
pub const PREFILL_WARPS: u32 = 4;
/// Query rows of one prefill block (a multiple of [`PREFILL_WARPS`]).
pub const PREFILL_Q_TILE: u32 = 16;
/// Tokens of K and V a prefill block stages in shared memory at a time.
pub const PREFILL_KV_TILE: u32 = 16;
/// Dynamic shared memory a block gets on every CUDA device without opting in.
pub const MAX_SHARED_BYTES: u32 = 48 * 1024;
/// Largest y and z grid dimension.
pub const MAX_GRID_YZ: u32 = 65_535;
/// Largest x grid dimension.
pub const MAX_GRID_X: u32 = i32::MAX as u32;

const _: () = assert!(PREFILL_Q_TILE.is_multiple_of(PREFILL_WARPS));
const _: () = assert!((MAX_HEAD_DIM as u32).is_multiple_of(WARP));

/// The `-D` options every kernel source is compiled with.
pub fn defines() -> Vec<String> {
    [
        ("TANDEM_WARP", WARP),
        ("TANDEM_MAX_HEAD_DIM", MAX_HEAD_DIM as u32),
        ("TANDEM_DECODE_WARPS", DECODE_WARPS),
        ("TANDEM_PREFILL_WARPS", PREFILL_WARPS),
        ("TANDEM_PREFILL_Q_TILE", PREFILL_Q_TILE),
        ("TANDEM_PREFILL_KV_TILE", PREFILL_KV_TILE),
    ]
    .iter()
    .map(|(name, v)| format!("-D{name}={v}"))
    .collect()
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

fn shape(msg: impl Into<String>) -> KernelError {
    KernelError::Shape(msg.into())
}

/// `v` as a kernel's `unsigned int` argument.
pub fn to_u32(v: usize, what: &str) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| shape(format!("{what} = {v} does not fit the kernel's 32-bit argument")))
}

fn grid_x(blocks: usize, what: &str) -> Result<u32, KernelError> {
    match u32::try_from(blocks) {
        Ok(b) if b <= MAX_GRID_X => Ok(b),
        _ => Err(shape(format!("{what}: {blocks} blocks exceed the grid's x limit"))),
    }
}

fn grid_yz(blocks: usize, what: &str) -> Result<u32, KernelError> {
    match u32::try_from(blocks) {
        Ok(b) if b <= MAX_GRID_YZ => Ok(b),
        _ => Err(shape(format!("{what}: {blocks} exceeds the grid's y/z limit of {MAX_GRID_YZ}"))),
    }
}

fn shared(floats: usize, what: &str) -> Result<u32, KernelError> {
    let bytes = floats * std::mem::size_of::<f32>();
    match u32::try_from(bytes) {
        Ok(b) if b <= MAX_SHARED_BYTES => Ok(b),
        _ => Err(shape(format!("{what} needs {bytes} bytes of shared memory (at most {MAX_SHARED_BYTES})"))),
    }
}

/// RMSNorm: one block per row, one thread per element up to
/// [`MAX_BLOCK_THREADS`] (whole warps), a float of shared memory per warp.
pub fn rms_norm(rows: usize, dim: usize) -> Result<Launch, KernelError> {
    if rows == 0 || dim == 0 {
        return Err(shape(format!("rms_norm: empty input ({rows} rows of {dim})")));
    }
    to_u32(dim, "rms_norm dim")?;
    let threads = dim.next_multiple_of(WARP as usize).min(MAX_BLOCK_THREADS as usize) as u32;
    Ok(Launch {
        grid: (grid_x(rows, "rms_norm rows")?, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: shared((threads / WARP) as usize, "rms_norm")?,
    })
}

/// A grid-stride kernel over `n` items: [`ELEMENTWISE_THREADS`] per block,
/// at most [`ELEMENTWISE_MAX_BLOCKS`] blocks.
pub fn elementwise(n: usize) -> Result<Launch, KernelError> {
    if n == 0 {
        return Err(shape("element-wise kernel over nothing"));
    }
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).min(ELEMENTWISE_MAX_BLOCKS as usize) as u32;
    Ok(Launch { grid: (blocks, 1, 1), block: (ELEMENTWISE_THREADS, 1, 1), shared_bytes: 0 })
}

/// RoPE over `rows × heads` heads of `head_dim`: one thread per rotated pair.
pub fn rope(rows: usize, heads: usize, head_dim: usize) -> Result<Launch, KernelError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(shape(format!("rope: head_dim {head_dim} is not a positive even number")));
    }
    to_u32(rows, "rope rows")?;
    to_u32(heads, "rope heads")?;
    to_u32(head_dim, "rope head_dim")?;
    let pairs = rows
        .checked_mul(heads)
        .and_then(|v| v.checked_mul(head_dim / 2))
        .ok_or_else(|| shape("rope: rows × heads × head_dim overflows"))?;
    elementwise(pairs)
}

fn check_head_dim(head_dim: usize) -> Result<(), KernelError> {
    if head_dim == 0 || head_dim > MAX_HEAD_DIM {
        return Err(shape(format!("attention: head_dim {head_dim} outside 1..={MAX_HEAD_DIM}")));
    }
    Ok(())
}

/// Decode attention: one block of [`DECODE_WARPS`] warps per (query head,
/// row); shared memory for every warp's partial (`head_dim + 2` floats).
pub fn paged_decode(rows: usize, heads: usize, head_dim: usize) -> Result<Launch, KernelError> {
    check_head_dim(head_dim)?;
    if rows == 0 || heads == 0 {
        return Err(shape(format!("paged_decode: {rows} rows of {heads} heads")));
    }
    Ok(Launch {
        grid: (grid_x(heads, "paged_decode heads")?, grid_yz(rows, "paged_decode rows")?, 1),
        block: (DECODE_WARPS * WARP, 1, 1),
        shared_bytes: shared(DECODE_WARPS as usize * (head_dim + 2), "paged_decode")?,
    })
}

/// Prefill attention: one block per ([`PREFILL_Q_TILE`] query rows, head,
/// sequence); shared memory for [`PREFILL_KV_TILE`] tokens of K and of V.
pub fn paged_prefill(seqs: usize, max_q_len: usize, heads: usize, head_dim: usize) -> Result<Launch, KernelError> {
    check_head_dim(head_dim)?;
    if seqs == 0 || max_q_len == 0 || heads == 0 {
        return Err(shape(format!("paged_prefill: {seqs} sequences of up to {max_q_len} rows, {heads} heads")));
    }
    Ok(Launch {
        grid: (
            grid_x(max_q_len.div_ceil(PREFILL_Q_TILE as usize), "paged_prefill query tiles")?,
            grid_yz(heads, "paged_prefill heads")?,
            grid_yz(seqs, "paged_prefill sequences")?,
        ),
        block: (PREFILL_WARPS * WARP, 1, 1),
        shared_bytes: shared(2 * PREFILL_KV_TILE as usize * head_dim, "paged_prefill")?,
    })
}

/// The pool's shape as the kernels' 32-bit arguments, checked: every
/// dimension positive, `layer` in range, the pool a whole number of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolArgs {
    pub kv_heads: u32,
    pub head_dim: u32,
    pub page_tokens: u32,
    pub num_layers: u32,
    pub layer: u32,
    /// Pages in the pool.
    pub pages: usize,
}

pub fn pool_args(geo: &KvGeometry, pool_len: usize, layer: usize) -> Result<PoolArgs, KernelError> {
    check_head_dim(geo.head_dim)?;
    if geo.page_tokens == 0 || geo.num_layers == 0 || geo.num_kv_heads == 0 {
        return Err(shape(format!("attention: empty geometry {geo:?}")));
    }
    if layer >= geo.num_layers {
        return Err(shape(format!("attention: layer {layer} of {}", geo.num_layers)));
    }
    let page_elems = geo
        .num_layers
        .checked_mul(2)
        .and_then(|v| v.checked_mul(geo.page_tokens))
        .and_then(|v| v.checked_mul(geo.row_elems()))
        .ok_or_else(|| shape(format!("attention: page of {geo:?} overflows")))?;
    if !pool_len.is_multiple_of(page_elems) {
        return Err(shape(format!("attention: pool of {pool_len} elements is not whole pages of {page_elems}")));
    }
    Ok(PoolArgs {
        kv_heads: to_u32(geo.num_kv_heads, "num_kv_heads")?,
        head_dim: to_u32(geo.head_dim, "head_dim")?,
        page_tokens: to_u32(geo.page_tokens, "page_tokens")?,
        num_layers: to_u32(geo.num_layers, "num_layers")?,
        layer: to_u32(layer, "layer")?,
        pages: pool_len / page_elems,
    })
}

/// Query heads of `rows` rows of `q_len` floats in all, checked against the
/// output and the KV heads (query head `h` reads KV head `h / group`).
pub fn query_heads(q_len: usize, out_len: usize, rows: usize, geo: &KvGeometry) -> Result<u32, KernelError> {
    if q_len != out_len {
        return Err(shape(format!("attention: q has {q_len} floats, out {out_len}")));
    }
    let row = rows.checked_mul(geo.head_dim).filter(|&r| r > 0).ok_or_else(|| shape("attention: no rows"))?;
    if !q_len.is_multiple_of(row) {
        return Err(shape(format!("attention: q of {q_len} floats is not {rows} rows of whole heads")));
    }
    let heads = q_len / row;
    if heads == 0 || !heads.is_multiple_of(geo.num_kv_heads) {
        return Err(shape(format!("attention: {heads} query heads do not group over {} KV heads", geo.num_kv_heads)));
    }
    to_u32(heads, "query heads")
}

/// Block tables of a batch, back to back, as the kernels read them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlatTables {
    pub tables: Vec<u32>,
    /// Where each sequence's table starts in `tables`.
    pub starts: Vec<u32>,
}

impl FlatTables {
    /// Appends the part of `table` that covers `tokens` tokens, after
    /// checking that it is long enough and that each of its pages lies in
    /// the pool.
    pub fn push(&mut self, table: &[u32], tokens: usize, page_tokens: usize, pages: usize) -> Result<(), KernelError> {
        let need = tokens.div_ceil(page_tokens);
        let Some(used) = table.get(..need) else {
            return Err(shape(format!("attention: block table of {} pages for {tokens} tokens", table.len())));
        };
        if let Some(&bad) = used.iter().find(|&&p| p as usize >= pages) {
            return Err(shape(format!("attention: page {bad} outside the pool of {pages} pages")));
        }
        self.starts.push(to_u32(self.tables.len(), "block tables' total length")?);
        self.tables.extend_from_slice(used);
        Ok(())
    }
}

/// Everything a decode-attention launch needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodePlan {
    pub launch: Launch,
    pub heads: u32,
    pub pool: PoolArgs,
    pub tables: FlatTables,
    pub context_lens: Vec<u32>,
}

/// Checks a decode batch (`q` and `out` of `rows × heads × head_dim`, one
/// [`BatchRow`] per row) against a pool of `pool_len` elements.
pub fn plan_decode(
    q_len: usize,
    out_len: usize,
    pool_len: usize,
    geo: &KvGeometry,
    layer: usize,
    rows: &[BatchRow<'_>],
) -> Result<DecodePlan, KernelError> {
    let pool = pool_args(geo, pool_len, layer)?;
    let heads = query_heads(q_len, out_len, rows.len(), geo)?;
    let mut tables = FlatTables::default();
    let mut context_lens = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        if row.context_len == 0 {
            return Err(shape(format!("paged_decode: row {i} has an empty context")));
        }
        tables.push(row.block_table, row.context_len, geo.page_tokens, pool.pages)?;
        context_lens.push(to_u32(row.context_len, "context_len")?);
    }
    Ok(DecodePlan {
        launch: paged_decode(rows.len(), heads as usize, geo.head_dim)?,
        heads,
        pool,
        tables,
        context_lens,
    })
}

/// One sequence of a prefill batch: `q_len` new tokens after `cached_len`
/// tokens already in its pages (the new tokens' K/V written too).
#[derive(Debug, Clone, Copy)]
pub struct PrefillSeq<'a> {
    /// The sequence's pages, in token order, covering `cached_len + q_len`.
    pub block_table: &'a [u32],
    pub cached_len: usize,
    pub q_len: usize,
}

/// Everything a prefill-attention launch needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillPlan {
    pub launch: Launch,
    pub heads: u32,
    pub pool: PoolArgs,
    pub tables: FlatTables,
    pub q_starts: Vec<u32>,
    pub q_lens: Vec<u32>,
    pub cached_lens: Vec<u32>,
}

/// Checks a prefill batch (`q` and `out` hold every sequence's new rows in
/// order, `rows × heads × head_dim`) against a pool of `pool_len` elements.
pub fn plan_prefill(
    q_len: usize,
    out_len: usize,
    pool_len: usize,
    geo: &KvGeometry,
    layer: usize,
    seqs: &[PrefillSeq<'_>],
) -> Result<PrefillPlan, KernelError> {
    let pool = pool_args(geo, pool_len, layer)?;
    let rows = seqs.iter().try_fold(0usize, |acc, s| acc.checked_add(s.q_len));
    let rows = rows.ok_or_else(|| shape("paged_prefill: row count overflows"))?;
    let heads = query_heads(q_len, out_len, rows, geo)?;
    let mut tables = FlatTables::default();
    let (mut q_starts, mut q_lens, mut cached_lens) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0usize;
    for (i, s) in seqs.iter().enumerate() {
        if s.q_len == 0 {
            return Err(shape(format!("paged_prefill: sequence {i} has no new tokens")));
        }
        let total = s.cached_len.checked_add(s.q_len).ok_or_else(|| shape("paged_prefill: length overflows"))?;
        to_u32(total, "cached_len + q_len")?;
        tables.push(s.block_table, total, geo.page_tokens, pool.pages)?;
        q_starts.push(to_u32(start, "prefill row")?);
        q_lens.push(to_u32(s.q_len, "q_len")?);
        cached_lens.push(to_u32(s.cached_len, "cached_len")?);
        start += s.q_len;
    }
    let max_q = seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
    Ok(PrefillPlan {
        launch: paged_prefill(seqs.len(), max_q, heads as usize, geo.head_dim)?,
        heads,
        pool,
        tables,
        q_starts,
        q_lens,
        cached_lens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: KvGeometry = KvGeometry { page_tokens: 4, num_layers: 2, num_kv_heads: 2, head_dim: 64 };

    fn page_elems() -> usize {
        GEO.page_elems()
    }

    #[test]
    fn defines_name_every_size_the_sources_need() {
        let d = defines();
        for src in
            [include_str!("cu/common.cuh"), include_str!("cu/paged_decode.cu"), include_str!("cu/paged_prefill.cu")]
        {
            for name in src.split("defined(").skip(1).filter_map(|rest| rest.split(')').next()) {
                assert!(d.iter().any(|o| o.starts_with(&format!("-D{name}="))), "{name} not passed");
            }
        }
        assert!(d.contains(&"-DTANDEM_MAX_HEAD_DIM=256".to_string()));
    }

    #[test]
    fn rms_norm_uses_whole_warps_up_to_the_block_limit() {
        let l = rms_norm(3, 576).unwrap();
        assert_eq!(l.grid, (3, 1, 1));
        assert_eq!(l.block, (576, 1, 1));
        assert_eq!(l.shared_bytes, 18 * 4);
        assert_eq!(rms_norm(1, 5).unwrap().block.0, 32);
        let big = rms_norm(1, 8192).unwrap();
        assert_eq!((big.block.0, big.shared_bytes), (1024, 32 * 4));
        assert!(rms_norm(0, 8).is_err());
        assert!(rms_norm(2, 0).is_err());
    }

    #[test]
    fn elementwise_grids_cover_small_inputs_and_cap_large_ones() {
        assert_eq!(elementwise(1).unwrap().grid.0, 1);
        assert_eq!(elementwise(257).unwrap().grid.0, 2);
        let l = elementwise(1 << 40).unwrap();
        assert_eq!(l.grid.0, ELEMENTWISE_MAX_BLOCKS);
        assert!(elementwise(0).is_err());
    }

    #[test]
    fn rope_wants_even_heads_and_counts_pairs() {
        // 2 rows × 3 heads × 32 pairs = 192 threads: one block.
        assert_eq!(rope(2, 3, 64).unwrap().grid.0, 1);
        assert_eq!(rope(10, 9, 64).unwrap().grid.0, (10 * 9 * 32usize).div_ceil(256) as u32);
        assert!(rope(2, 3, 63).is_err());
        assert!(rope(2, 3, 0).is_err());
        assert!(rope(usize::MAX, 2, 64).is_err());
    }

    #[test]
    fn decode_launch_is_a_block_per_head_and_row() {
        let l = paged_decode(5, 12, 128).unwrap();
        assert_eq!(l.grid, (12, 5, 1));
        assert_eq!(l.block, (DECODE_WARPS * WARP, 1, 1));
        assert_eq!(l.shared_bytes, DECODE_WARPS * 130 * 4);
        assert!(paged_decode(5, 12, MAX_HEAD_DIM + 1).is_err());
        assert!(paged_decode(MAX_GRID_YZ as usize + 1, 12, 64).is_err());
        assert!(paged_decode(0, 12, 64).is_err());
    }

    #[test]
    fn prefill_launch_tiles_queries_and_fits_shared_memory() {
        let l = paged_prefill(3, 33, 8, 128).unwrap();
        assert_eq!(l.grid, (3, 8, 3));
        assert_eq!(l.shared_bytes, 2 * PREFILL_KV_TILE * 128 * 4);
        // The largest head still fits the default shared memory.
        assert!(paged_prefill(1, 1, 1, MAX_HEAD_DIM).unwrap().shared_bytes <= MAX_SHARED_BYTES);
        assert!(paged_prefill(0, 1, 1, 64).is_err());
        assert!(paged_prefill(1, 1, 1, 0).is_err());
    }

    #[test]
    fn pool_args_check_the_geometry() {
        let p = pool_args(&GEO, 3 * page_elems(), 1).unwrap();
        assert_eq!((p.pages, p.layer, p.head_dim, p.page_tokens), (3, 1, 64, 4));
        assert!(pool_args(&GEO, 3 * page_elems() + 1, 1).is_err(), "partial page");
        assert!(pool_args(&GEO, 3 * page_elems(), 2).is_err(), "layer out of range");
        assert!(pool_args(&KvGeometry { page_tokens: 0, ..GEO }, 0, 0).is_err());
        assert!(pool_args(&KvGeometry { head_dim: 512, ..GEO }, 0, 0).is_err());
    }

    #[test]
    fn query_heads_must_group_over_kv_heads() {
        assert_eq!(query_heads(2 * 6 * 64, 2 * 6 * 64, 2, &GEO).unwrap(), 6);
        assert!(query_heads(2 * 3 * 64, 2 * 3 * 64, 2, &GEO).is_err(), "3 heads over 2 KV heads");
        assert!(query_heads(2 * 6 * 64, 6 * 64, 2, &GEO).is_err(), "out length");
        assert!(query_heads(100, 100, 2, &GEO).is_err(), "not whole heads");
        assert!(query_heads(0, 0, 0, &GEO).is_err());
    }

    #[test]
    fn tables_are_cut_to_the_context_and_checked_against_the_pool() {
        let mut t = FlatTables::default();
        t.push(&[2, 0, 1], 5, 4, 3).unwrap(); // 2 pages used
        t.push(&[1], 4, 4, 3).unwrap();
        assert_eq!(t.tables, vec![2, 0, 1]);
        assert_eq!(t.starts, vec![0, 2]);
        assert!(t.push(&[0], 5, 4, 3).is_err(), "table too short");
        assert!(t.push(&[0, 3], 5, 4, 3).is_err(), "page outside the pool");
        // A page past the context is not read, so it is not checked.
        assert!(t.push(&[0, 7], 4, 4, 3).is_ok());
    }

    #[test]
    fn decode_plan_collects_rows() {
        let pool_len = 4 * page_elems();
        let (t0, t1) = ([3u32, 1], [0u32, 2, 1]);
        let rows = [BatchRow { block_table: &t0, context_len: 6 }, BatchRow { block_table: &t1, context_len: 9 }];
        let q = 2 * 4 * 64;
        let p = plan_decode(q, q, pool_len, &GEO, 0, &rows).unwrap();
        assert_eq!(p.heads, 4);
        assert_eq!(p.context_lens, vec![6, 9]);
        assert_eq!(p.tables.tables, vec![3, 1, 0, 2, 1]);
        assert_eq!(p.tables.starts, vec![0, 2]);
        assert_eq!(p.launch.grid, (4, 2, 1));
        let empty = [BatchRow { block_table: &t0, context_len: 0 }];
        assert!(plan_decode(4 * 64, 4 * 64, pool_len, &GEO, 0, &empty).is_err());
        let long = [BatchRow { block_table: &t0, context_len: 9 }];
        assert!(plan_decode(4 * 64, 4 * 64, pool_len, &GEO, 0, &long).is_err());
    }

    #[test]
    fn prefill_plan_places_each_sequence_rows() {
        let pool_len = 4 * page_elems();
        let (t0, t1) = ([3u32, 1], [0u32, 2, 1]);
        let seqs = [
            PrefillSeq { block_table: &t0, cached_len: 0, q_len: 7 },
            PrefillSeq { block_table: &t1, cached_len: 6, q_len: 3 },
        ];
        let q = 10 * 2 * 64;
        let p = plan_prefill(q, q, pool_len, &GEO, 1, &seqs).unwrap();
        assert_eq!(p.heads, 2);
        assert_eq!(p.q_starts, vec![0, 7]);
        assert_eq!(p.q_lens, vec![7, 3]);
        assert_eq!(p.cached_lens, vec![0, 6]);
        assert_eq!(p.tables.tables, vec![3, 1, 0, 2, 1]);
        assert_eq!(p.launch.grid, (1, 2, 2));
        let short = [PrefillSeq { block_table: &t0, cached_len: 6, q_len: 3 }];
        assert!(plan_prefill(3 * 128, 3 * 128, pool_len, &GEO, 1, &short).is_err(), "9 tokens need 3 pages");
        let none = [PrefillSeq { block_table: &t0, cached_len: 1, q_len: 0 }];
        assert!(plan_prefill(0, 0, pool_len, &GEO, 1, &none).is_err());
    }
}
