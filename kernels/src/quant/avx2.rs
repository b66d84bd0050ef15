//! AVX2 dequantization, bit-identical to the scalar [`super::dequantize_row`]:
//! the same products and sums (`d * q`, then `+ m` — never fused) of the same
//! exactly converted values.

use crate::DType;
use std::arch::x86_64::*;

/// # Safety
/// The CPU must support AVX2, FMA and F16C. `src` holds exactly
/// `dtype.row_bytes(out.len())` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F16 => f16_row(src, out),
        DType::BF16 => bf16_row(src, out),
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = f16_splat(b);
                let q = &b[2..34];
                for g in 0..4 {
                    // SAFETY: `q` holds 32 bytes, group `g` reads 8 of them.
                    let v = unsafe { _mm_loadl_epi64(q.as_ptr().add(8 * g).cast()) };
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                    store8(&mut o[8 * g..8 * g + 8], _mm256_mul_ps(d, f));
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = f16_splat(b);
                let q = nibbles(&b[2..18]);
                let q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
                store_scaled(o, q, d, None);
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(20)) {
                let d = f16_splat(b);
                let m = f16_splat(&b[2..]);
                store_scaled(o, nibbles(&b[4..20]), d, Some(m));
            }
        }
        _ => super::dequantize_row(dtype, src, out),
    }
}

/// The f16 at the start of `b`, converted and broadcast.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16_splat(b: &[u8]) -> __m256 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm256_cvtph_ps(_mm_set1_epi16(bits as i16))
}

/// 16 bytes of nibbles as 32 bytes 0..15: low nibbles first, then high ones
/// (ggml's element order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn nibbles(q: &[u8]) -> __m256i {
    assert!(q.len() >= 16);
    // SAFETY: 16 bytes in bounds, unaligned load.
    let v = unsafe { _mm_loadu_si128(q.as_ptr().cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// `o[j] = d * q[j] (+ m)` for 32 signed bytes `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_scaled(o: &mut [f32], q: __m256i, d: __m256, m: Option<__m256>) {
    let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q)];
    for (h, v) in halves.into_iter().enumerate() {
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
        let (mut a, mut b) = (_mm256_mul_ps(d, lo), _mm256_mul_ps(d, hi));
        if let Some(m) = m {
            a = _mm256_add_ps(a, m);
            b = _mm256_add_ps(b, m);
        }
        store8(&mut o[16 * h..16 * h + 8], a);
        store8(&mut o[16 * h + 8..16 * h + 16], b);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store8(o: &mut [f32], v: __m256) {
    assert!(o.len() >= 8);
    // SAFETY: 8 floats in bounds, unaligned store.
    unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn f16_row(src: &[u8], out: &mut [f32]) {
    let full = out.len() / 8 * 8;
    for (o, c) in out[..full].chunks_exact_mut(8).zip(src.chunks_exact(16)) {
        // SAFETY: `c` holds 16 bytes = 8 f16.
        let h = unsafe { _mm_loadu_si128(c.as_ptr().cast()) };
        store8(o, _mm256_cvtph_ps(h));
    }
    super::dequantize_row(DType::F16, &src[2 * full..], &mut out[full..]);
}

#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_row(src: &[u8], out: &mut [f32]) {
    let full = out.len() / 8 * 8;
    for (o, c) in out[..full].chunks_exact_mut(8).zip(src.chunks_exact(16)) {
        // SAFETY: `c` holds 16 bytes = 8 bf16.
        let h = unsafe { _mm_loadu_si128(c.as_ptr().cast()) };
        let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        store8(o, _mm256_castsi256_ps(w));
    }
    super::dequantize_row(DType::BF16, &src[2 * full..], &mut out[full..]);
}

#[cfg(test)]
mod tests {
    use crate::cpu::{simd_level, SimdLevel};
    use crate::DType;
    use rand::{Rng, SeedableRng};

    #[test]
    fn simd_dequantization_is_bit_identical_to_scalar() {
        if simd_level() < SimdLevel::Avx2 {
            return;
        }
        let seed = 3;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dtypes =
            [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4_K, DType::Q6_K];
        for dtype in dtypes {
            for cols in [256usize, 512, 13, 7] {
                let Ok(len) = dtype.row_bytes(cols) else {
                    continue;
                };
                let mut src: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                // Keep f16 scales finite so NaN payloads do not get in the way.
                if dtype.is_quantized() && dtype != DType::Q6_K {
                    for b in src.chunks_exact_mut(dtype.block_bytes()) {
                        b[1] &= 0x3f;
                        b[3] &= 0x3f;
                    }
                }
                let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
                super::super::dequantize_row(dtype, &src, &mut a);
                super::super::dequantize_row_with(SimdLevel::Avx2, dtype, &src, &mut b);
                // NaN payloads may differ (the half crate quiets them).
                let key = |v: &f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
                let (a, b): (Vec<u32>, Vec<u32>) = (a.iter().map(key).collect(), b.iter().map(key).collect());
                assert_eq!(a, b, "seed {seed} {dtype} cols {cols}");
            }
        }
    }
}
