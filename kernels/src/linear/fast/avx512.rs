//! The AVX-512 batched fast-path kernel: exactly the AVX2 kernel's
//! operations per output element (so results are bit-identical to the AVX2
//! level, whatever the batch), run faster:
//!
//! - VNNI `vpdpwssd` on 256-bit vectors fuses the second `madd` of a block
//!   with the add of the two halves (the integer sum is exact either way);
//! - AVX-512's 32 vector registers hold a 4 × 4 tile (16 accumulators)
//!   where AVX2's 16 hold 4 × 2, so each weight block loaded serves four
//!   activation rows and each activation block four weight rows;
//! - the min terms (unsigned kind) are one f32 tile per tile instead of one
//!   1 × 1 dot per element (the same operations per element).
//!
//! Why not 512-bit vectors, or fewer float operations per block? Either
//! changes the rounding, and then the decode kernel (m = 1) must change
//! with it to keep rows independent of the batch: the ways tried cost
//! decode ~10% on Zen 4 (512-bit shuffles to interleave blocks), more than
//! batching gained. Decode and weight unpacking stay the AVX2 kernels.

use super::avx2::{panel, store, tile_rows, Acts, Weights};
use super::{Unpacked, PANEL, QK};
use crate::linear::exact::avx2::{hsum, tile as f32_tile};
use crate::linear::OutPtr;
use crate::quant::q16::Q16Rows;
use std::arch::x86_64::*;

/// As the AVX2 `block_product`, with 4 × 4 tiles.
///
/// # Safety
/// AVX2/FMA/F16C and AVX-512 F/BW/VL/VNNI CPU; `u` holds `nc ≥ 1` unpacked
/// rows of `acts.cols()` weights; the calling thread owns columns
/// `j0..j0 + nc`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
            // SAFETY: activation rows `i..i + mr ≤ m` and the unpacked rows
            // address `k` quants and `nb` scales/sums/mins each; writes go
            // to rows `i..i + mr` and this thread's columns `j..j + nr`.
            unsafe {
                match mr {
                    4 => store(out, &tile::<4, PANEL, MIN>([a(i), a(i + 1), a(i + 2), a(i + 3)], w, nb), i, j, nr),
                    2 => store(out, &tile::<2, PANEL, MIN>([a(i), a(i + 1)], w, nb), i, j, nr),
                    _ => store(out, &tile::<1, PANEL, MIN>([a(i)], w, nb), i, j, nr),
                }
            }
        }
        i += mr;
    }
}

/// `MR × NR` block-quantized dot products over `nb` blocks, per element the
/// AVX2 `tile`'s operations.
///
/// # Safety
/// AVX-512 CPU as [`block_product`]; every pointer addresses `32·nb` quants
/// or `nb` floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile<const MR: usize, const NR: usize, const MIN: bool>(
    xs: [Acts; MR],
    ws: [Weights; NR],
    nb: usize,
) -> [[f32; NR]; MR] {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut res = [[0f32; NR]; MR];
    // SAFETY: all loads lie within the extents the caller guarantees.
    unsafe {
        for b in 0..nb {
            let mut we = [_mm256_setzero_si256(); NR];
            let mut wo = [_mm256_setzero_si256(); NR];
            for c in 0..NR {
                we[c] = _mm256_loadu_si256(ws[c].q.add(QK * b).cast());
                wo[c] = _mm256_loadu_si256(ws[c].q.add(QK * b + 16).cast());
            }
            for r in 0..MR {
                let ye = _mm256_loadu_si256(xs[r].q.add(QK * b).cast());
                let yo = _mm256_loadu_si256(xs[r].q.add(QK * b + 16).cast());
                let dx = _mm256_broadcast_ss(&*xs[r].d.add(b));
                for c in 0..NR {
                    // = madd(we, ye) + madd(wo, yo), exactly.
                    let isum = _mm256_dpwssd_epi32(_mm256_madd_epi16(we[c], ye), wo[c], yo);
                    let dw = _mm256_broadcast_ss(&*ws[c].d.add(b));
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dw);
                    acc[r][c] = _mm256_fmadd_ps(f, dx, acc[r][c]);
                }
            }
        }
        // The min terms: per element the AVX2 kernels' 1 × 1 dot (the
        // factors of each product swapped, which does not change it).
        let mins = if MIN { f32_tile::<MR, NR>(xs.map(|x| x.s), ws.map(|w| w.m), nb) } else { res };
        for r in 0..MR {
            for c in 0..NR {
                res[r][c] = if MIN { hsum(acc[r][c]) + mins[r][c] } else { hsum(acc[r][c]) };
            }
        }
    }
    res
}
