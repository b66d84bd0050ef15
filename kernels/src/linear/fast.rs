//! The fast path for quantized weights: activations quantized per 32 to i16
//! ([`Q16Rows`]), weight rows unpacked into a small panel of i16 quants with
//! an f32 scale (and min) per 32 weights, then integer dot products per
//! block (`madd` i16 × i16 → i32 on AVX2).
//!
//! Sixteen-bit activations rather than llama.cpp's eight: the 8-bit
//! rounding moves SmolLM2's logits by ~1, enough to change greedy answers;
//! i16 brings that below 0.01 for the same number of integer instructions
//! per block (two `madd`s instead of `maddubs` + `madd`).
//!
//! Weight formats fall into two kinds:
//! - signed (`Q8_0`, `Q4_0`): `w = d·q`, `q` in −128..127;
//! - unsigned with a min (`Q4_1`, `Q4_K` per 32-weight sub-block):
//!   `w = d·q + m`, `q` in 0..15, so `Σ w·x = d·dx·Σ q·qx + m·Σx`, the last
//!   factor being the exact f32 activation block sum.
//!
//! Every output element is computed as: per block `b` in order,
//! `acc = fma((f32(isum_lanes_b) * dw_b), dx_b, acc)` on 8 lanes, then
//! `hsum(acc)`, then (unsigned kind) `+ dot(m, s)` by the exact path's
//! 1 × 1 dot. The lanes of `isum` hold fixed pairs of elements (the
//! [`element_at`] order of the activations, which the weight unpacking
//! matches). The scalar level uses its own fixed order. Tile shape never
//! changes either.

use super::{for_each_column_chunk, with_scratch, OutPtr, WeightMatrix};
use crate::cpu::SimdLevel;
use crate::quant::q16::{element_at, Q16Rows, QK};
use crate::quant::{f16_at, scale_min_k4};
use crate::DType;
use std::cell::Cell;

/// Weight rows per microkernel panel.
const PANEL: usize = 4;
/// Bytes of unpacked weights a column block aims at (L2-resident; the
/// activation tile in L1 sweeps over it).
const BLOCK_BYTES: usize = 96 << 10;

/// Whether `dtype` has an integer-dot fast path.
pub(super) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4_K)
}

/// Quants of unsigned-kind formats are 0..15 and come with a min per block.
fn has_min(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_1 | DType::Q4_K)
}

/// Weight rows unpacked together: `k` quants (each block in [`element_at`]
/// order), `k / 32` scales and mins each.
#[derive(Debug, Default)]
struct Unpacked {
    qs: Vec<i16>,
    d: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static ACTS: Cell<Q16Rows> = Cell::new(Q16Rows::default());
    static UNPACKED: Cell<Unpacked> = Cell::new(Unpacked::default());
}

pub(super) fn matmul(level: SimdLevel, w: &WeightMatrix, x: &[f32], m: usize, out: OutPtr<'_>) {
    let (n, k, dtype) = (w.rows(), w.cols(), w.dtype());
    let nb = k / QK;
    let block = (BLOCK_BYTES / (2 * k + 8 * nb)).clamp(PANEL, 128) / PANEL * PANEL;
    with_scratch(&ACTS, |acts| {
        acts.quantize(level, x, m, k);
        let acts = &*acts;
        for_each_column_chunk(n, m, k, PANEL, |cols| {
            with_scratch(&UNPACKED, |u| {
                u.qs.resize(block * k, 0);
                u.d.resize(block * nb, 0.0);
                u.m.resize(block * nb, 0.0);
                #[cfg(target_arch = "x86_64")]
                if m == 1 && level == SimdLevel::Avx2 && dtype != DType::Q4_K {
                    let (data, stride) = (w.data(), w.row_stride());
                    for j0 in cols.clone().step_by(PANEL) {
                        let nr = PANEL.min(cols.end - j0);
                        let rows: [&[u8]; PANEL] = std::array::from_fn(|c| {
                            let r = j0 + c.min(nr - 1);
                            &data[r * stride..(r + 1) * stride]
                        });
                        // SAFETY: `SimdLevel::Avx2` is only reported when
                        // the CPU has AVX2, FMA and F16C; the rows are whole
                        // rows of `w` (`k` weights) and this thread owns
                        // columns `j0..j0 + nr`.
                        unsafe { avx2::gemv(dtype, acts, rows, &mut u.m, nr, j0, out) };
                    }
                    return;
                }
                for j0 in cols.clone().step_by(block) {
                    let nc = block.min(cols.end - j0);
                    for c in 0..nc {
                        let (qs, d, mn) = (
                            &mut u.qs[c * k..(c + 1) * k],
                            &mut u.d[c * nb..(c + 1) * nb],
                            &mut u.m[c * nb..(c + 1) * nb],
                        );
                        unpack_row(level, dtype, w.row_bytes(j0 + c), qs, d, mn);
                    }
                    block_product(level, has_min(dtype), acts, u, nc, j0, out);
                }
            });
        });
    });
}

/// Unpacks one weight row: quants to `qs` (each block in [`element_at`]
/// order), per-32 scales to `d` and (unsigned kind) mins to `mn`.
fn unpack_row(level: SimdLevel, dtype: DType, src: &[u8], qs: &mut [i16], d: &mut [f32], mn: &mut [f32]) {
    match (level, dtype) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` is only reported when the CPU has AVX2,
        // FMA and F16C.
        (SimdLevel::Avx2, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) => unsafe {
            avx2::unpack_row(dtype, src, qs, d, mn)
        },
        _ => unpack_row_scalar(dtype, src, qs, d, mn),
    }
}

/// Stores one block of quants given in element order (`q(e)` for element
/// `e`) in the [`element_at`] order.
fn store_block(out: &mut [i16], q: impl Fn(usize) -> i16) {
    for (p, o) in out[..QK].iter_mut().enumerate() {
        *o = q(element_at(p));
    }
}

fn unpack_row_scalar(dtype: DType, src: &[u8], qs: &mut [i16], d: &mut [f32], mn: &mut [f32]) {
    match dtype {
        DType::Q8_0 => {
            for (b, (blk, q)) in src.chunks_exact(34).zip(qs.chunks_exact_mut(QK)).enumerate() {
                d[b] = f16_at(blk, 0);
                store_block(q, |e| blk[2 + e] as i8 as i16);
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let (bytes, off, bias) = if dtype == DType::Q4_0 { (18, 2, 8) } else { (20, 4, 0) };
            for (b, (blk, q)) in src.chunks_exact(bytes).zip(qs.chunks_exact_mut(QK)).enumerate() {
                d[b] = f16_at(blk, 0);
                if dtype == DType::Q4_1 {
                    mn[b] = f16_at(blk, 2);
                }
                let nib = &blk[off..off + 16];
                store_block(q, |e| {
                    let v = if e < 16 { nib[e] & 0x0f } else { nib[e - 16] >> 4 };
                    v as i16 - bias
                });
            }
        }
        DType::Q4_K => {
            // Per 32-weight sub-block: w = (d·sc)·q − dmin·m.
            for (sb, (blk, q)) in src.chunks_exact(144).zip(qs.chunks_exact_mut(256)).enumerate() {
                let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let scales = &blk[4..16];
                for (c, (nib, q)) in blk[16..144].chunks_exact(32).zip(q.chunks_exact_mut(64)).enumerate() {
                    for h in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + h, scales);
                        let b = sb * 8 + 2 * c + h;
                        d[b] = dd * sc as f32;
                        mn[b] = -(dmin * m as f32);
                        store_block(&mut q[32 * h..], |e| (nib[e] >> (4 * h)) as i16 & 0x0f);
                    }
                }
            }
        }
        _ => unreachable!("no fast path for {dtype}"),
    }
}

/// `out[i][j0 + c]` for all activation rows and the `nc` unpacked rows.
fn block_product(level: SimdLevel, min: bool, acts: &Q16Rows, u: &Unpacked, nc: usize, j0: usize, out: OutPtr<'_>) {
    let (k, nb) = (acts.cols(), acts.cols() / QK);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` is only reported when the CPU has AVX2,
        // FMA and F16C. `u` holds `nc ≥ 1` unpacked rows of `k`, and this
        // thread owns output columns `j0..j0 + nc`.
        SimdLevel::Avx2 => unsafe {
            match min {
                true => avx2::block_product::<true>(acts, u, nc, j0, out),
                false => avx2::block_product::<false>(acts, u, nc, j0, out),
            }
        },
        _ => {
            for i in 0..acts.rows() {
                let (xq, xd, xs) = (acts.qs(i), acts.d(i), acts.s(i));
                for c in 0..nc {
                    let (wq, wd) = (&u.qs[c * k..(c + 1) * k], &u.d[c * nb..(c + 1) * nb]);
                    let mut sum = 0f32;
                    for (b, (qw, qx)) in wq.chunks_exact(QK).zip(xq.chunks_exact(QK)).enumerate() {
                        let isum: i32 = qw.iter().zip(qx).map(|(&a, &b)| a as i32 * b as i32).sum();
                        sum += (isum as f32 * wd[b]) * xd[b];
                    }
                    if min {
                        sum += super::exact::dot_scalar(&u.m[c * nb..(c + 1) * nb], xs);
                    }
                    // SAFETY: `i < m`, `j0 + c` is one of this thread's columns.
                    unsafe { out.write(i, j0 + c, sum) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Unpacked, PANEL, QK};
    use crate::linear::exact::avx2::{hsum, tile as f32_tile};
    use crate::linear::OutPtr;
    use crate::quant::q16::Q16Rows;
    use crate::DType;
    use std::arch::x86_64::*;

    /// How many rows ahead the decode kernel prefetches (into L2).
    const PREFETCH_ROWS: usize = 4 * PANEL;

    /// The 32 quants of one Q8_0/Q4_0/Q4_1 block at `blk` as i16, in the
    /// [`super::element_at`] order: `[even elements, odd elements]`, lane
    /// `l` of each holding elements `16l..16l + 16`. No cross-lane
    /// shuffles: a 16-bit lane holds elements `2i` and `2i + 1` as its low
    /// and high byte (or nibble pair), so shifts and masks split them.
    ///
    /// # Safety
    /// AVX2 CPU; `blk` addresses one whole block of `dtype`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn words(dtype: DType, blk: *const u8) -> [__m256i; 2] {
        // SAFETY: the quants lie inside the block, per the caller.
        unsafe {
            match dtype {
                DType::Q8_0 => {
                    let w = _mm256_loadu_si256(blk.add(2).cast());
                    [_mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(w)), _mm256_srai_epi16::<8>(w)]
                }
                DType::Q4_0 => {
                    let [e, o] = nibble_words(blk.add(2));
                    let eight = _mm256_set1_epi16(8);
                    [_mm256_sub_epi16(e, eight), _mm256_sub_epi16(o, eight)]
                }
                _ => nibble_words(blk.add(4)),
            }
        }
    }

    /// 16 bytes of nibbles (element `j` the low nibble of byte `j`, element
    /// `j + 16` its high nibble) as `[even, odd]` i16 words.
    ///
    /// # Safety
    /// AVX2 CPU; `q` addresses 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_words(q: *const u8) -> [__m256i; 2] {
        // SAFETY: 16 bytes, unaligned load.
        let v = unsafe { _mm_loadu_si128(q.cast()) };
        // Lane 1 shifted by 4 bits so that its low nibbles are the high
        // nibbles of the bytes (bits carried in from the next word land
        // above bit 11, where no mask below looks).
        let both = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(v), _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
        let mask = _mm256_set1_epi16(0x0f);
        [_mm256_and_si256(both, mask), _mm256_and_si256(_mm256_srli_epi16::<8>(both), mask)]
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_to_f32(b: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// As `unpack_row_scalar`, for Q8_0, Q4_0 and Q4_1.
    ///
    /// # Safety
    /// AVX2/FMA/F16C CPU.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unpack_row(dtype: DType, src: &[u8], qs: &mut [i16], d: &mut [f32], mn: &mut [f32]) {
        let bytes = dtype.block_bytes();
        for (b, (blk, q)) in src.chunks_exact(bytes).zip(qs.chunks_exact_mut(QK)).enumerate() {
            if dtype == DType::Q4_1 {
                mn[b] = f16_to_f32(&blk[2..4]);
            }
            d[b] = f16_to_f32(blk);
            assert!(q.len() == QK && blk.len() == bytes);
            // SAFETY: `blk` is one whole block; `q` holds 32 i16, unaligned
            // stores.
            unsafe {
                let [e, o] = words(dtype, blk.as_ptr());
                _mm256_storeu_si256(q.as_mut_ptr().cast(), e);
                _mm256_storeu_si256(q.as_mut_ptr().add(16).cast(), o);
            }
        }
    }

    /// # Safety
    /// AVX2/FMA CPU; `u` holds `nc ≥ 1` unpacked rows of `acts.cols()`
    /// weights; the calling thread owns columns `j0..j0 + nc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_product<const MIN: bool>(
        acts: &Q16Rows,
        u: &Unpacked,
        nc: usize,
        j0: usize,
        out: OutPtr<'_>,
    ) {
        let (m, k, nb) = (acts.rows(), acts.cols(), acts.cols() / QK);
        assert!(nc >= 1 && u.qs.len() >= nc * k && u.d.len() >= nc * nb && u.m.len() >= nc * nb);
        let a = |i: usize| Acts { q: acts.qs(i).as_ptr(), d: acts.d(i).as_ptr(), s: acts.s(i).as_ptr() };
        let mut i = 0;
        while i < m {
            let mr = if m - i >= 4 {
                4
            } else if m - i >= 2 {
                2
            } else {
                1
            };
            for p0 in (0..nc).step_by(PANEL) {
                let nr = PANEL.min(nc - p0);
                // Rows past `nr` repeat the last one; their results are
                // dropped.
                let w: [Weights; PANEL] = std::array::from_fn(|c| {
                    let r = p0 + c.min(nr - 1);
                    Weights { q: u.qs[r * k..].as_ptr(), d: u.d[r * nb..].as_ptr(), m: u.m[r * nb..].as_ptr() }
                });
                let j = j0 + p0;
                // SAFETY: activation rows `i..i + mr ≤ m` and
                // the unpacked rows address `k` quants and `nb`
                // scales/sums/mins each; writes go to rows `i..i + mr` and
                // this thread's columns `j..j + nr`.
                unsafe {
                    match mr {
                        4 => {
                            for half in 0..nr.div_ceil(2) {
                                let ws = [w[2 * half], w[2 * half + 1]];
                                let res = tile::<4, 2, MIN>([a(i), a(i + 1), a(i + 2), a(i + 3)], ws, nb);
                                store(out, &res, i, j + 2 * half, nr - 2 * half);
                            }
                        }
                        2 => {
                            let res = tile::<2, 4, MIN>([a(i), a(i + 1)], w, nb);
                            store(out, &res, i, j, nr);
                        }
                        _ => {
                            let res = tile::<1, 4, MIN>([a(i)], w, nb);
                            store(out, &res, i, j, nr);
                        }
                    }
                }
            }
            i += mr;
        }
    }

    /// One activation row times `PANEL` weight rows read straight from
    /// their blocks: the same operations per element as [`tile`] on an
    /// unpacked panel, without the unpacking (decode, m = 1).
    ///
    /// # Safety
    /// AVX2/FMA/F16C CPU; `acts` has one row of `k` and every entry of
    /// `rows` is a whole row of `k` weights of `dtype` (Q8_0, Q4_0, Q4_1);
    /// the calling thread owns columns `j0..j0 + nr`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn gemv(
        dtype: DType,
        acts: &Q16Rows,
        rows: [&[u8]; PANEL],
        mins: &mut [f32],
        nr: usize,
        j0: usize,
        out: OutPtr<'_>,
    ) {
        let nb = acts.cols() / QK;
        let bytes = dtype.block_bytes();
        assert!(acts.rows() == 1 && rows.iter().all(|r| r.len() == nb * bytes) && mins.len() >= PANEL * nb);
        let (xq, xd, xs) = (acts.qs(0).as_ptr(), acts.d(0).as_ptr(), acts.s(0).as_ptr());
        let wp = rows.map(|r| r.as_ptr());
        let mp = mins.as_mut_ptr();
        let mut acc = [_mm256_setzero_ps(); PANEL];
        // SAFETY: block `b < nb` of each row spans `bytes` bytes inside it;
        // activations hold `k = 32·nb` quants and `nb` scales; `mins` holds
        // `PANEL · nb` floats.
        unsafe {
            for b in 0..nb {
                let ye = _mm256_loadu_si256(xq.add(QK * b).cast());
                let yo = _mm256_loadu_si256(xq.add(QK * b + 16).cast());
                let dx = _mm256_broadcast_ss(&*xd.add(b));
                for c in 0..PANEL {
                    let blk = wp[c].add(bytes * b);
                    // The same block a few panels on (rows are contiguous):
                    // streams from DRAM for big matrices. To L2, not L1: an
                    // L1 prefetch holds one of the few L1 miss buffers for
                    // the whole DRAM latency, which capped the LM head
                    // (Q8_0, 30 MB) at 8 GB/s; via L2 it streams at 20.
                    // Prefetches never fault, so running past the end is fine.
                    _mm_prefetch::<_MM_HINT_T2>(blk.wrapping_add(PREFETCH_ROWS * nb * bytes).cast());
                    let dw = if dtype == DType::Q4_1 {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<i32>().read_unaligned()));
                        *mp.add(c * nb + b) = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                        _mm256_broadcastss_ps(dm)
                    } else {
                        _mm256_cvtph_ps(_mm_set1_epi16(blk.cast::<i16>().read_unaligned()))
                    };
                    let [we, wo] = words(dtype, blk);
                    let isum = _mm256_add_epi32(_mm256_madd_epi16(we, ye), _mm256_madd_epi16(wo, yo));
                    let f = _mm256_cvtepi32_ps(isum);
                    acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(f, dw), dx, acc[c]);
                }
            }
            for (c, &a) in acc.iter().enumerate().take(nr) {
                let mut s = hsum(a);
                if dtype == DType::Q4_1 {
                    s += f32_tile::<1, 1>([mp.add(c * nb)], [xs], nb)[0][0];
                }
                // SAFETY: row 0, one of this thread's columns.
                out.write(0, j0 + c, s);
            }
        }
    }

    #[derive(Clone, Copy)]
    struct Weights {
        q: *const i16,
        d: *const f32,
        m: *const f32,
    }

    #[derive(Clone, Copy)]
    struct Acts {
        q: *const i16,
        d: *const f32,
        s: *const f32,
    }

    /// # Safety
    /// As [`OutPtr::write`] for the first `valid` columns of each row.
    #[inline]
    unsafe fn store<const MR: usize, const NR: usize>(
        out: OutPtr<'_>,
        res: &[[f32; NR]; MR],
        i0: usize,
        j0: usize,
        valid: usize,
    ) {
        for (r, row) in res.iter().enumerate() {
            for (c, &v) in row.iter().enumerate().take(valid) {
                // SAFETY: per the caller.
                unsafe { out.write(i0 + r, j0 + c, v) };
            }
        }
    }

    /// `MR × NR` block-quantized dot products over `nb` blocks.
    ///
    /// # Safety
    /// AVX2/FMA CPU; every pointer addresses `32·nb` quants or `nb` floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const MR: usize, const NR: usize, const MIN: bool>(
        xs: [Acts; MR],
        ws: [Weights; NR],
        nb: usize,
    ) -> [[f32; NR]; MR] {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut res = [[0f32; NR]; MR];
        // SAFETY: all loads lie within the extents the caller guarantees.
        unsafe {
            // Weight block outer, activation rows inner, activations read
            // as memory operands: 8 accumulators plus one weight block stay
            // in registers.
            for b in 0..nb {
                for c in 0..NR {
                    let we = _mm256_loadu_si256(ws[c].q.add(QK * b).cast());
                    let wo = _mm256_loadu_si256(ws[c].q.add(QK * b + 16).cast());
                    let dw = _mm256_broadcast_ss(&*ws[c].d.add(b));
                    for r in 0..MR {
                        let ye = _mm256_loadu_si256(xs[r].q.add(QK * b).cast());
                        let yo = _mm256_loadu_si256(xs[r].q.add(QK * b + 16).cast());
                        let dx = _mm256_broadcast_ss(&*xs[r].d.add(b));
                        let isum = _mm256_add_epi32(_mm256_madd_epi16(we, ye), _mm256_madd_epi16(wo, yo));
                        let f = _mm256_cvtepi32_ps(isum);
                        acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(f, dw), dx, acc[r][c]);
                    }
                }
            }
            for r in 0..MR {
                for c in 0..NR {
                    let mut s = hsum(acc[r][c]);
                    if MIN {
                        s += f32_tile::<1, 1>([ws[c].m], [xs[r].s], nb)[0][0];
                    }
                    res[r][c] = s;
                }
            }
        }
        res
    }
}
