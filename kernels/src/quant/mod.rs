//! Scalar reference (de)quantization of ggml block formats.
//!
//! These are the test oracle for the SIMD kernels and the exact f32 path:
//! `dequantize_row` reproduces the float weights bit for bit as ggml defines
//! them (`w = d * q`, `w = d * q + m`, …).
//!
//! - `avx2` — SIMD dequantization, bit-identical to the scalar code
//!   (reached through [`dequantize_row_with`]).
//! - [`q16`] — activation quantization (per 32, i16 + scale + exact block
//!   sum) for the fast integer matmul path.
//! - `encode` — scalar quantizers ([`quantize_row`]) for tests and tools.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
mod encode;
pub mod q16;

pub use encode::quantize_row;

use crate::cpu::SimdLevel;
use crate::DType;
use half::{bf16, f16};

/// [`dequantize_row`] at a given SIMD level; bit-identical results at every
/// level (the SIMD code performs the same rounded operations).
pub fn dequantize_row_with(level: SimdLevel, dtype: DType, src: &[u8], out: &mut [f32]) {
    assert_eq!(Some(src.len()), dtype.row_bytes(out.len()).ok(), "dequantize_row: row length");
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` and above are only reported when the CPU has AVX2,
        // FMA and F16C; the row length was checked above.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { avx2::dequantize_row(dtype, src, out) },
        _ => dequantize_row(dtype, src, out),
    }
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes one row (`out.len()` weights) stored as `dtype` in `src`.
/// `src` must hold exactly `dtype.row_bytes(out.len())` bytes.
pub fn dequantize_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    debug_assert_eq!(Some(src.len()), dtype.row_bytes(out.len()).ok());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (j, w) in o.iter_mut().enumerate() {
                    *w = d * (b[2 + j] as i8) as f32;
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    o[j] = d * ((q & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    o[j] = d * (q & 0x0f) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        DType::Q4_K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(144)) {
                dequantize_q4_k_block(b, o);
            }
        }
        DType::Q6_K => {
            for (o, b) in out.chunks_exact_mut(256).zip(src.chunks_exact(210)) {
                dequantize_q6_k_block(b, o);
            }
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j`.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let d = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (d, m)
    }
}

/// block_q4_K: f16 d, f16 dmin, 12 bytes of packed scales, 128 bytes of quants.
fn dequantize_q4_k_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    let mut is = 0;
    for (chunk, q) in out.chunks_exact_mut(64).zip(qs.chunks_exact(32)) {
        let (sc1, m1) = scale_min_k4(is, scales);
        let (sc2, m2) = scale_min_k4(is + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            chunk[l] = d1 * (q[l] & 0x0f) as f32 - min1;
            chunk[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
        is += 2;
    }
}

/// block_q6_K: 128 bytes low nibbles, 64 bytes high 2 bits, 16 × i8 scales, f16 d.
fn dequantize_q6_k_block(b: &[u8], out: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
        let y = &mut out[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
