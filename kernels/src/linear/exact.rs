//! The exact path: weight rows dequantized (bit for bit as
//! [`crate::quant::dequantize_row`]) into a small f32 panel, then f32
//! multiply-adds against unquantized activations.
//!
//! Every output element is `hsum(Σ_t x[8t..8t+8] * w[8t..8t+8])` over
//! 8-lane FMA accumulators, then the `k % 8` tail added in order; the scalar
//! level does the same with eight plain accumulators. Tile shape never
//! changes that sequence.

use super::{for_each_column_chunk, with_scratch, OutPtr, WeightMatrix};
use crate::cpu::SimdLevel;
use crate::quant::dequantize_row_with;
use std::cell::Cell;

/// Weight rows per microkernel panel.
const PANEL: usize = 6;
/// Bytes of dequantized weights a column block aims at (L2-resident; the
/// activation tile in L1 sweeps over it).
const BLOCK_BYTES: usize = 96 << 10;

thread_local! {
    static BLOCK_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

pub(super) fn matmul(level: SimdLevel, w: &WeightMatrix, x: &[f32], m: usize, out: OutPtr<'_>) {
    let (n, k) = (w.rows(), w.cols());
    let block = (BLOCK_BYTES / (4 * k)).clamp(PANEL, 96) / PANEL * PANEL;
    for_each_column_chunk(n, m, k, PANEL, |cols| {
        with_scratch(&BLOCK_SCRATCH, |buf| {
            buf.resize(block * k, 0.0);
            for j0 in cols.clone().step_by(block) {
                let nc = block.min(cols.end - j0);
                for (c, row) in buf.chunks_exact_mut(k).take(nc).enumerate() {
                    dequantize_row_with(level, w.dtype(), w.row_bytes(j0 + c), row);
                }
                block_product(level, x, m, k, &buf[..nc * k], j0, out);
            }
        });
    });
}

/// `out[i][j0 + c] = x[i] · rows[c]` for all `m` rows and the block's rows.
fn block_product(level: SimdLevel, x: &[f32], m: usize, k: usize, rows: &[f32], j0: usize, out: OutPtr<'_>) {
    let nc = rows.len() / k;
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` and above are only reported when the CPU has AVX2,
        // FMA and F16C. `x` is `m × k`, `rows` is `nc × k`, and this thread
        // owns output columns `j0..j0 + nc`.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { avx2::block_product(x, m, k, rows, nc, j0, out) },
        _ => {
            for i in 0..m {
                for (c, wr) in rows.chunks_exact(k).enumerate() {
                    let v = dot_scalar(&x[i * k..(i + 1) * k], wr);
                    // SAFETY: `i < m`, `j0 + c` is one of this thread's columns.
                    unsafe { out.write(i, j0 + c, v) };
                }
            }
        }
    }
}

/// The scalar level's dot product: eight lane accumulators, summed pairwise,
/// then the tail in order.
pub(super) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = a.len() / 8 * 8;
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in a[full..].iter().zip(&b[full..]) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{OutPtr, PANEL};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2/FMA CPU; `x` is `m × k`, `rows` is `nc × k` with `nc ≥ 1`; the
    /// calling thread owns output columns `j0..j0 + nc`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_product(
        x: &[f32],
        m: usize,
        k: usize,
        rows: &[f32],
        nc: usize,
        j0: usize,
        out: OutPtr<'_>,
    ) {
        assert!(x.len() == m * k && rows.len() == nc * k && nc >= 1);
        let xp = x.as_ptr();
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
                let wp: [*const f32; PANEL] = std::array::from_fn(|c| rows[(p0 + c.min(nr - 1)) * k..].as_ptr());
                let j = j0 + p0;
                // SAFETY: the row pointers address `k` floats
                // each (rows `i..i + mr ≤ m` of `x`, rows of `rows`); the
                // writes go to rows `i..i + mr` and this thread's columns
                // `j..j + nr`.
                unsafe {
                    let xs = |r: usize| xp.add((i + r) * k);
                    match mr {
                        4 => {
                            for half in 0..nr.div_ceil(3) {
                                let ws = [wp[3 * half], wp[3 * half + 1], wp[3 * half + 2]];
                                let res = tile::<4, 3>([xs(0), xs(1), xs(2), xs(3)], ws, k);
                                store(out, &res, i, j + 3 * half, nr - 3 * half);
                            }
                        }
                        2 => {
                            for half in 0..nr.div_ceil(3) {
                                let ws = [wp[3 * half], wp[3 * half + 1], wp[3 * half + 2]];
                                let res = tile::<2, 3>([xs(0), xs(1)], ws, k);
                                store(out, &res, i, j + 3 * half, nr - 3 * half);
                            }
                        }
                        _ => {
                            let res = tile::<1, 6>([xs(0)], wp, k);
                            store(out, &res, i, j, nr);
                        }
                    }
                }
            }
            i += mr;
        }
    }

    /// Writes the first `valid` columns of a tile at `(i0, j0)`.
    ///
    /// # Safety
    /// As [`OutPtr::write`] for every element written.
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

    /// `MR × NR` dot products of length `k`: `res[r][c] = x_r · w_c`.
    ///
    /// # Safety
    /// AVX2/FMA CPU; every pointer addresses `k` readable floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::linear) unsafe fn tile<const MR: usize, const NR: usize>(
        xs: [*const f32; MR],
        ws: [*const f32; NR],
        k: usize,
    ) -> [[f32; NR]; MR] {
        let kv = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut res = [[0f32; NR]; MR];
        // SAFETY: all loads lie within the first `k` floats of each pointer.
        unsafe {
            let mut t = 0;
            while t < kv {
                let mut wv = [_mm256_setzero_ps(); NR];
                for c in 0..NR {
                    wv[c] = _mm256_loadu_ps(ws[c].add(t));
                }
                for r in 0..MR {
                    let xv = _mm256_loadu_ps(xs[r].add(t));
                    for c in 0..NR {
                        acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
                    }
                }
                t += 8;
            }
            for r in 0..MR {
                for c in 0..NR {
                    let mut s = hsum(acc[r][c]);
                    for kk in kv..k {
                        s += *xs[r].add(kk) * *ws[c].add(kk);
                    }
                    res[r][c] = s;
                }
            }
        }
        res
    }

    /// The sum of the 8 lanes, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::linear) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}
