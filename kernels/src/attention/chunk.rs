//! The portable chunk kernel (the oracle of the SIMD one, and the AVX2
//! level's kernel for head sizes that are not a multiple of 8) and the fold
//! of chunk partials.
//!
//! A partial holds, per query head, `[max, sum, o_0 … o_{d-1}]`: the largest
//! score of the chunk, `Σ exp(s − max)` and `Σ exp(s − max) · v`.

use super::{KvElem, CHUNK_TOKENS};

/// The head layout of one problem.
pub(super) struct Shape {
    pub heads: usize,
    pub head_dim: usize,
    pub kv_heads: usize,
    /// Elements from a token's K row to its V row (same page).
    pub v_off: usize,
}

/// Vector primitives the portable kernel is generic over.
pub(super) trait VecMath {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `y += a * x`
    fn axpy(y: &mut [f32], a: f32, x: &[f32]);
}

pub(super) struct ScalarMath;

impl VecMath for ScalarMath {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // Eight partial sums, like the SIMD path.
        let mut acc = [0f32; 8];
        let chunks = a.len() / 8;
        for c in 0..chunks {
            for l in 0..8 {
                acc[l] = a[c * 8 + l].mul_add(b[c * 8 + l], acc[l]);
            }
        }
        let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for i in chunks * 8..a.len() {
            s += a[i] * b[i];
        }
        s
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = a.mul_add(x, *y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) struct Avx2Math;

#[cfg(target_arch = "x86_64")]
impl VecMath for Avx2Math {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only instantiated for `SimdLevel::Avx2`, which is reported
        // after AVX2/FMA were detected.
        unsafe { super::avx2::dot(a, b) }
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { super::avx2::axpy(y, a, x) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) type Avx2Math = ScalarMath;

/// The partial of the chunk whose tokens' K rows start at `rows` (at most
/// [`CHUNK_TOKENS`]) into `part`; `scores` holds `heads × CHUNK_TOKENS`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn portable<T: KvElem, M: VecMath>(
    q: &[f32],
    pool: &[T],
    rows: &[usize],
    shape: &Shape,
    scale: f32,
    part: &mut [f32],
    scores: &mut [f32],
    row_buf: &mut Vec<f32>,
) {
    let (heads, d) = (shape.heads, shape.head_dim);
    let (group, row) = (heads / shape.kv_heads, shape.kv_heads * d);
    assert!(rows.len() <= CHUNK_TOKENS && scores.len() >= heads * CHUNK_TOKENS && part.len() == heads * (d + 2));
    row_buf.resize(row, 0.0);
    for (t, &k) in rows.iter().enumerate() {
        T::with_f32(&pool[k..k + row], row_buf, |k| {
            for h in 0..heads {
                let kv = h / group;
                scores[h * CHUNK_TOKENS + t] = M::dot(&q[h * d..(h + 1) * d], &k[kv * d..(kv + 1) * d]) * scale;
            }
        });
    }
    for h in 0..heads {
        let s = &mut scores[h * CHUNK_TOKENS..h * CHUNK_TOKENS + rows.len()];
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let p = &mut part[h * (d + 2)..(h + 1) * (d + 2)];
        p[0] = max;
        p[1] = sum;
        p[2..].fill(0.0);
    }
    for (t, &k) in rows.iter().enumerate() {
        let v = k + shape.v_off;
        T::with_f32(&pool[v..v + row], row_buf, |v| {
            for h in 0..heads {
                let kv = h / group;
                let o = &mut part[h * (d + 2) + 2..(h + 1) * (d + 2)];
                M::axpy(o, scores[h * CHUNK_TOKENS + t], &v[kv * d..(kv + 1) * d]);
            }
        });
    }
}

/// Folds the next chunk's partial into `state` (the fold of the chunks
/// before it): both rescaled to the larger max, sums and vectors added.
pub(super) fn fold(state: &mut [f32], part: &[f32], head_dim: usize) {
    assert_eq!(state.len(), part.len(), "fold: partial sizes");
    for (s, p) in state.chunks_exact_mut(head_dim + 2).zip(part.chunks_exact(head_dim + 2)) {
        let max = s[0].max(p[0]);
        let (a, b) = ((s[0] - max).exp(), (p[0] - max).exp());
        s[0] = max;
        s[1] = s[1] * a + p[1] * b;
        for (o, &x) in s[2..].iter_mut().zip(&p[2..]) {
            *o = *o * a + x * b;
        }
    }
}

/// The attention output of a folded state: every head's vector over its sum.
pub(super) fn finish(state: &[f32], out: &mut [f32], head_dim: usize) {
    assert_eq!(state.len() / (head_dim + 2) * head_dim, out.len(), "finish: output length");
    for (s, o) in state.chunks_exact(head_dim + 2).zip(out.chunks_exact_mut(head_dim)) {
        let inv = 1.0 / s[1];
        for (o, &x) in o.iter_mut().zip(&s[2..]) {
            *o = x * inv;
        }
    }
}
