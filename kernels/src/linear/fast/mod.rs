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
//! matches). The AVX2 and AVX-512 levels give identical bits; the scalar
//! level uses its own fixed order. Tile shape never changes either.
//!
//! - `avx2` — unpacking, the decode kernel (m = 1) and the batched tiles.
//! - `avx512` — batched tiles with VNNI and 32 registers (AVX2's bits).

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
                if m == 1 && level >= SimdLevel::Avx2 && dtype != DType::Q4_K {
                    let (data, stride) = (w.data(), w.row_stride());
                    for j0 in cols.clone().step_by(PANEL) {
                        let nr = PANEL.min(cols.end - j0);
                        let rows: [&[u8]; PANEL] = std::array::from_fn(|c| {
                            let r = j0 + c.min(nr - 1);
                            &data[r * stride..(r + 1) * stride]
                        });
                        // SAFETY: `SimdLevel::Avx2` and above are only
                        // reported when the CPU has AVX2, FMA and F16C; the
                        // rows are whole rows of `w` (`k` weights) and this
                        // thread owns columns `j0..j0 + nr`.
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
        // SAFETY: `SimdLevel::Avx2` and above are only reported when the CPU
        // has AVX2, FMA and F16C.
        (SimdLevel::Avx2 | SimdLevel::Avx512, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) => unsafe {
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
        // SAFETY: `SimdLevel::Avx2` and above are only reported when the CPU
        // has AVX2, FMA and F16C. `u` holds `nc ≥ 1` unpacked rows of `k`, and this
        // thread owns output columns `j0..j0 + nc`.
        SimdLevel::Avx2 => unsafe {
            match min {
                true => avx2::block_product::<true>(acts, u, nc, j0, out),
                false => avx2::block_product::<false>(acts, u, nc, j0, out),
            }
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx512` is only reported when the CPU has
        // AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; as above otherwise.
        SimdLevel::Avx512 => unsafe {
            match min {
                true => avx512::block_product::<true>(acts, u, nc, j0, out),
                false => avx512::block_product::<false>(acts, u, nc, j0, out),
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
