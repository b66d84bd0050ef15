//! Activation quantization for the integer dot products of the fast path.
//!
//! Each 32-element block of an activation row becomes 32 × i16 with an f32
//! scale `d = amax / 32767` and the exact f32 block sum `s = Σx`, which
//! carries the min term of `w = d·q + m` formats. Sixteen bits, not ggml's
//! eight: an 8-bit `q8_0` activation moves each element by up to
//! `amax / 254`, which on SmolLM2 shifts logits by ~1 and flips greedy
//! choices; at 16 bits the error is `amax / 65534` (258× smaller) and the
//! products still run as integer `madd`s (i16 × i16 → i32 pairs).
//!
//! Quants of a block are stored in the order the weight kernels produce
//! 16-bit weights without cross-lane shuffles ([`element_at`]): the even
//! elements first, then the odd ones, each as two 128-bit lanes of eight.
//! Layout is struct-of-arrays per row.
//!
//! The scalar and AVX2 quantizers give bit-identical output (max, one
//! division, one multiply and round-half-even per element, the block sum in
//! one fixed tree order), so either is the oracle of the other.

use crate::cpu::SimdLevel;

/// Elements per activation block.
pub const QK: usize = 32;

/// The largest quant magnitude.
const QMAX: f32 = 32767.0;

/// The block element stored at position `p` (`0..32`) of a block: position
/// `16h + 8l + i` holds element `16l + 2i + h`.
pub const fn element_at(p: usize) -> usize {
    let (h, l, i) = (p / 16, (p / 8) % 2, p % 8);
    16 * l + 2 * i + h
}

/// `m` activation rows of `k` elements quantized per block of 32.
#[derive(Debug, Default, Clone)]
pub struct Q16Rows {
    m: usize,
    k: usize,
    qs: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q16Rows {
    /// Quantizes `x` (`m × k`, row-major; `k` a multiple of 32) into `self`,
    /// reusing its buffers.
    pub fn quantize(&mut self, level: SimdLevel, x: &[f32], m: usize, k: usize) {
        assert_eq!(k % QK, 0, "q16: row length {k} is not a multiple of {QK}");
        assert_eq!(x.len(), m * k, "q16: x is not m×k");
        let nb = k / QK;
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
    /// The quants of row `i`, each block in [`element_at`] order.
    pub fn qs(&self, i: usize) -> &[i16] {
        &self.qs[i * self.k..(i + 1) * self.k]
    }
    /// The block scales of row `i`.
    pub fn d(&self, i: usize) -> &[f32] {
        let nb = self.k / QK;
        &self.d[i * nb..(i + 1) * nb]
    }
    /// The exact block sums `Σx` of row `i`.
    pub fn s(&self, i: usize) -> &[f32] {
        let nb = self.k / QK;
        &self.s[i * nb..(i + 1) * nb]
    }
}

/// Quantizes one row: `qs.len() == x.len()`, `d` and `s` one entry per block.
pub fn quantize_row(level: SimdLevel, x: &[f32], qs: &mut [i16], d: &mut [f32], s: &mut [f32]) {
    let nb = x.len() / QK;
    assert!(x.len() == nb * QK && qs.len() == x.len() && d.len() == nb && s.len() == nb);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `SimdLevel::Avx2` and above are only reported when the
        // CPU has AVX2, FMA and F16C.
        SimdLevel::Avx2 | SimdLevel::Avx512 => unsafe { avx2::quantize_row(x, qs, d, s) },
        _ => quantize_row_scalar(x, qs, d, s),
    }
}

fn quantize_row_scalar(x: &[f32], qs: &mut [i16], d: &mut [f32], s: &mut [f32]) {
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax != 0.0 { QMAX / amax } else { 0.0 };
        for (p, q) in qb.iter_mut().enumerate() {
            let r = (xb[element_at(p)] * id).round_ties_even();
            *q = r.clamp(-QMAX, QMAX) as i16;
        }
        d[b] = amax / QMAX;
        // The AVX2 order: four 8-lane vectors summed as (v0+v1)+(v2+v3),
        // then the lanes folded 8 → 4 → 2 → 1.
        let t: [f32; 8] = std::array::from_fn(|l| (xb[l] + xb[8 + l]) + (xb[16 + l] + xb[24 + l]));
        let u: [f32; 4] = std::array::from_fn(|l| t[l] + t[l + 4]);
        s[b] = (u[0] + u[2]) + (u[1] + u[3]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QK, QMAX};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2; slice lengths as checked by the caller.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_row(x: &[f32], qs: &mut [i16], d: &mut [f32], s: &mut [f32]) {
        let sign = _mm256_set1_ps(-0.0);
        // Within each 128-bit lane: the four even words, then the odd ones.
        let evens_odds = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, //
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
        );
        for (b, (xb, qb)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            // SAFETY: `xb` holds 32 f32 and `qb` 32 i16; unaligned loads
            // and stores.
            let (v, out) = unsafe {
                let p = xb.as_ptr();
                (
                    [
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(p.add(16)),
                        _mm256_loadu_ps(p.add(24)),
                    ],
                    qb.as_mut_ptr().cast::<__m256i>(),
                )
            };
            let a01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
            let a23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
            let amax = hmax(_mm256_max_ps(a01, a23));
            let id = if amax != 0.0 { QMAX / amax } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = v.map(|vi| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(vi, idv));
                _mm256_cvtps_epi32(r)
            });
            // Elements 0..16 and 16..32 as words in order (`packs` works
            // per lane, the 64-bit permute restores the order), then each
            // lane's evens before its odds, then the even halves of both
            // vectors together and the odd halves together.
            let n0 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
            let n1 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
            let e0 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(n0, evens_odds));
            let e1 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(n1, evens_odds));
            let even = _mm256_permute2x128_si256::<0x20>(e0, e1);
            let odd = _mm256_permute2x128_si256::<0x31>(e0, e1);
            // SAFETY: `out` points at the 32 i16 of `qb`.
            unsafe {
                _mm256_storeu_si256(out, even);
                _mm256_storeu_si256(out.add(1), odd);
            }
            d[b] = amax / QMAX;
            let sum = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
            s[b] = hsum(sum);
        }
    }

    /// The largest of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hmax(v: __m256) -> f32 {
        let v4 = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v2 = _mm_max_ps(v4, _mm_movehl_ps(v4, v4));
        _mm_cvtss_f32(_mm_max_ss(v2, _mm_movehdup_ps(v2)))
    }

    /// The sum of the 8 lanes, folded 8 → 4 → 2 → 1 (the scalar order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let v4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
        _mm_cvtss_f32(_mm_add_ss(v2, _mm_movehdup_ps(v2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn element_order_is_a_permutation() {
        let mut seen = [false; QK];
        for p in 0..QK {
            seen[element_at(p)] = true;
        }
        assert!(seen.iter().all(|&v| v));
        assert_eq!(element_at(0), 0);
        assert_eq!(element_at(8), 16);
        assert_eq!(element_at(16), 1);
        assert_eq!(element_at(31), 31);
    }

    #[test]
    fn avx2_quantizer_matches_scalar_bit_for_bit() {
        if crate::cpu::simd_level() < SimdLevel::Avx2 {
            return;
        }
        let seed = 7;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let k = 256;
        let mut x: Vec<f32> = (0..3 * k).map(|_| rng.random_range(-4.0..4.0)).collect();
        x[40..72].fill(0.0); // an all-zero block
        x[100] = 1e-30;
        x[130] = -1e6;
        let mut a = Q16Rows::default();
        let mut b = Q16Rows::default();
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
        for level in [SimdLevel::Scalar, crate::cpu::simd_level()] {
            let mut q = Q16Rows::default();
            q.quantize(level, &x, 1, 64);
            for (j, &v) in q.qs(0).iter().enumerate() {
                let (b, e) = (j / QK, element_at(j % QK));
                let want = x[b * QK + e];
                let d = q.d(0)[b];
                let back = d * v as f32;
                assert!((back - want).abs() <= 0.5 * d * 1.0001, "{level:?} elem {b}/{e}: {want} vs {back}");
            }
            for (b, xb) in x.chunks_exact(QK).enumerate() {
                let sum: f64 = xb.iter().map(|&v| v as f64).sum();
                assert!((q.s(0)[b] as f64 - sum).abs() <= 1e-5, "{level:?} block {b}");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }
}
