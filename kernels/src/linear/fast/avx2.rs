//! The AVX2 fast-path kernels: `madd` i16 × i16 → i32 per block, 8-lane
//! f32 accumulators (see the parent module for the operation order).

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
    let a = |i: usize| Acts::row(acts, i);
    let mut i = 0;
    while i < m {
        let mr = tile_rows(m - i);
        for p0 in (0..nc).step_by(PANEL) {
            let nr = PANEL.min(nc - p0);
            let w = panel(u, p0, nr, k, nb);
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

/// One unpacked weight row: quants, scales, mins.
#[derive(Clone, Copy)]
pub(super) struct Weights {
    pub(super) q: *const i16,
    pub(super) d: *const f32,
    pub(super) m: *const f32,
}

/// One quantized activation row: quants, scales, exact block sums.
#[derive(Clone, Copy)]
pub(super) struct Acts {
    pub(super) q: *const i16,
    pub(super) d: *const f32,
    pub(super) s: *const f32,
}

impl Acts {
    pub(super) fn row(acts: &Q16Rows, i: usize) -> Acts {
        Acts { q: acts.qs(i).as_ptr(), d: acts.d(i).as_ptr(), s: acts.s(i).as_ptr() }
    }
}

/// Activation rows the next tile of a `block_product` takes: 4, 2 or 1 of
/// the `left` still to do.
pub(super) fn tile_rows(left: usize) -> usize {
    match left {
        4.. => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// Unpacked weight rows `p0..p0 + nr` (`nr ≥ 1`) of `k` quants and `nb`
/// blocks as one panel; slots past `nr` repeat the last row (their results
/// are dropped).
pub(super) fn panel(u: &Unpacked, p0: usize, nr: usize, k: usize, nb: usize) -> [Weights; PANEL] {
    std::array::from_fn(|c| {
        let r = p0 + c.min(nr - 1);
        Weights { q: u.qs[r * k..].as_ptr(), d: u.d[r * nb..].as_ptr(), m: u.m[r * nb..].as_ptr() }
    })
}

/// # Safety
/// As [`OutPtr::write`] for the first `valid` columns of each row.
#[inline]
pub(super) unsafe fn store<const MR: usize, const NR: usize>(
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
