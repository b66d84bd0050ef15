//! Activation quantization for the integer dot products of the fast path.
//!
//! Each 32-element block of an activation row becomes 32 × i8 with an f32
//! scale `d` (as ggml's `q8_0`, but the scale is kept in f32) and the block
//! sum `s = d · Σq` (as ggml's `q8_1`), which carries the min term of
//! `w = d·q + m` formats. Layout is struct-of-arrays per row so that the
//! kernels load 32 quants, one scale and one sum with plain aligned-free loads.
//!
//! The scalar and AVX2 quantizers give bit-identical output (max, one
//! division, one multiply and round-half-even per element), so either is the
//! oracle of the other.

use crate::cpu::SimdLevel;

/// Elements per activation block.
pub const QK8: usize = 32;

/// `m` activation rows of `k` elements quantized per block of 32.
#[derive(Debug, Default, Clone)]
pub struct Q8Rows {
    m: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `x` (`m × k`, row-major; `k` a multiple of 32) into `self`,
    /// reusing its buffers.
    pub fn quantize(&mut self, level: SimdLevel, x: &[f32], m: usize, k: usize) {
        assert_eq!(k % QK8, 0, "q8: row length {k} is not a multiple of {QK8}");
        assert_eq!(x.len(), m * k, "q8: x is not m×k");
        let nb = k / QK8;
        self.m = m;
        self.k = k;
        self.qs.clear();
        self.qs.resize(m * k, 0);
        self.d.clear();
        self.d.resize(m * nb, 0.0);
        self.s.clear();
        self.s.resize(m * nb, 0.0);
        for i in 0..m {
            let src = &x[i * k..(i + 1) * k];
            let qs = &mut self.qs[i * k..(i + 1) * k];
            let d = &mut self.d[i * nb..(i + 1) * nb];
            let s = &mut self.s[i * nb..(i + 1) * nb];
            quantize_row(level, src, qs, d, s);
        }
    }

    pub fn rows(&self) -> usize {
        self.m
    }
    pub fn cols(&self) -> usize {
        self.k
    }
    /// The quants of row `i`.
    pub fn qs(&self, i: usize) -> &[i8] {
        &self.qs[i * self.k..(i + 1) * self.k]
    }
    /// The block scales of row `i`.
    pub fn d(&self, i: usize) -> &[f32] {
        let nb = self.k / QK8;
        &self.d[i * nb..(i + 1) * nb]
    }
    /// The block sums `d · Σq` of row `i`.
    pub fn s(&self, i: usize) -> &[f32] {
        let nb = self.k / QK8;
        &self.s[i * nb..(i + 1) * nb]
    }
}

/// Quantizes one row: `qs.len() == x.len()`, `d` and `s` one entry per block.
pub fn quantize_row(level: SimdLevel, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / QK8;
    assert!(x.len() == nb * QK8 && qs.len() == x.len() && d.len() == nb && s.len() == nb);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` is only reported when the CPU has
        // AVX2, FMA and F16C.
        SimdLevel::Avx2 => unsafe { avx2::quantize_row(x, qs, d, s) },
        _ => quantize_row_scalar(x, qs, d, s),
    }
}

fn quantize_row_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK8).zip(qs.chunks_exact_mut(QK8)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        d[b] = amax / 127.0;
        s[b] = d[b] * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::QK8;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2; slice lengths as checked by the caller.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_row(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        let sign = _mm256_set1_ps(-0.0);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, (xb, qb)) in x.chunks_exact(QK8).zip(qs.chunks_exact_mut(QK8)).enumerate() {
            // SAFETY: `xb` holds 32 f32 and `qb` 32 bytes; unaligned loads
            // and stores.
            let (v, out) = unsafe {
                let p = xb.as_ptr();
                (
                    [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))],
                    qb.as_mut_ptr().cast::<__m256i>(),
                )
            };
            let a01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            let a23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
            let a = _mm256_max_ps(a01, a23);
            let a4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let a2 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            let a1 = _mm_max_ss(a2, _mm_movehdup_ps(a2));
            let amax = _mm_cvtss_f32(a1);
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let mut q = [_mm256_setzero_si256(); 4];
            for (qi, vi) in q.iter_mut().zip(v) {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(vi, idv));
                *qi = _mm256_cvtps_epi32(r);
            }
            let sum4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum4), _mm256_extracti128_si256::<1>(sum4));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
            let sum = _mm_cvtsi128_si32(s1);
            let p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let packed = _mm256_permutevar8x32_epi32(p16, perm);
            // SAFETY: `out` points at the 32 bytes of `qb`.
            unsafe { _mm256_storeu_si256(out, packed) };
            d[b] = amax / 127.0;
            s[b] = d[b] * sum as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn avx2_quantizer_matches_scalar_bit_for_bit() {
        if crate::cpu::simd_level() != SimdLevel::Avx2 {
            return;
        }
        let seed = 7;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let k = 256;
        let mut x: Vec<f32> = (0..3 * k).map(|_| rng.random_range(-4.0..4.0)).collect();
        x[40..72].fill(0.0); // an all-zero block
        x[100] = 1e-30;
        let mut a = Q8Rows::default();
        let mut b = Q8Rows::default();
        a.quantize(SimdLevel::Scalar, &x, 3, k);
        b.quantize(SimdLevel::Avx2, &x, 3, k);
        for i in 0..3 {
            assert_eq!(a.qs(i), b.qs(i), "seed {seed} row {i}");
            assert_eq!(bits(a.d(i)), bits(b.d(i)), "seed {seed} row {i}");
            assert_eq!(bits(a.s(i)), bits(b.s(i)), "seed {seed} row {i}");
        }
    }

    #[test]
    fn quantized_rows_reconstruct_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let x: Vec<f32> = (0..64).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut q = Q8Rows::default();
        q.quantize(SimdLevel::Scalar, &x, 1, 64);
        for (j, v) in x.iter().enumerate() {
            let d = q.d(0)[j / 32];
            let back = d * q.qs(0)[j] as f32;
            assert!((back - v).abs() <= 0.5 * d * 1.0001, "elem {j}: {v} vs {back}");
        }
        let sum: i32 = q.qs(0)[..32].iter().map(|&v| v as i32).sum();
        assert_eq!(q.s(0)[0], q.d(0)[0] * sum as f32);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }
}
