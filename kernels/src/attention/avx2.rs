//! The AVX2/FMA chunk kernel, for head sizes that are a multiple of 8.
//!
//! Scores eight tokens at a time per query head (eight 8-lane accumulators,
//! reduced together by one transposing `hadd` tree), a vectorised `exp` for
//! the chunk's softmax numerators, then the weighted V sums, again eight
//! tokens at a time with up to 64 output dimensions in registers. Both
//! passes go token-major: a group of eight whole rows (contiguous within a
//! page) is read once from memory and then from L1 by every head. K and V
//! rows are read straight from the pool (bf16 widened in registers).
//!
//! The kernel is memory-bound at long contexts, and the hardware prefetcher
//! alone kept it at a quarter of the read bandwidth: while a chunk computes,
//! the next chunk's K and V rows are prefetched into L2 (T1; an L1 prefetch
//! holds one of the few L1 miss buffers for the whole DRAM latency, and a
//! whole chunk does not fit in L1).

#[cfg(all(test, target_arch = "x86_64"))]
pub(super) use imp::exp;
#[cfg(target_arch = "x86_64")]
pub(super) use imp::{axpy, chunk, dot};

#[cfg(not(target_arch = "x86_64"))]
pub(super) use portable::chunk;

#[cfg(not(target_arch = "x86_64"))]
mod portable {
    use super::super::chunk::{portable, ScalarMath, Shape};
    use super::super::KvElem;

    /// # Safety
    /// None beyond the portable kernel's; kept `unsafe` for the dispatch's
    /// shape.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::attention) unsafe fn chunk<T: KvElem>(
        q: &[f32],
        pool: &[T],
        rows: &[usize],
        _next: &[usize],
        shape: &Shape,
        scale: f32,
        part: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        portable::<T, ScalarMath>(q, pool, rows, shape, scale, part, scores, &mut Vec::new())
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::super::chunk::Shape;
    use super::super::{KvElem, CHUNK_TOKENS};
    use std::arch::x86_64::*;

    /// Eight elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// AVX2 CPU; `p` addresses eight readable elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
        // SAFETY: eight elements, unaligned loads.
        unsafe {
            if T::BF16 {
                let h = _mm_loadu_si128(p.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_loadu_ps(p.cast())
            }
        }
    }

    /// The lane sum `((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let h = _mm256_hadd_ps(v, v);
        let h = _mm256_hadd_ps(h, h);
        _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h)))
    }

    /// Lane `j` of the result is [`hsum`]`(a[j])`, in the same order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
    }

    /// `exp(x)` on eight lanes (Cephes: `2ⁿ · p(r)` with `r = x − n·ln 2` in
    /// two steps and a degree-5 polynomial; about 1 ulp). Inputs are clamped
    /// to ±88, so very negative ones give ~1e-38 rather than 0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::attention) fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_55)), _mm256_set1_ps(88.376_26));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }

    /// The chunk partial (see `chunk::portable`, same contract) with AVX2.
    /// `next` are the next chunk's K row offsets, prefetched.
    ///
    /// # Safety
    /// AVX2/FMA CPU; `shape.head_dim` is a multiple of 8; every offset in
    /// `rows` and `next` addresses a K row (`kv_heads × head_dim` elements)
    /// of `pool`, and `v_off` further its V row.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::attention) unsafe fn chunk<T: KvElem>(
        q: &[f32],
        pool: &[T],
        rows: &[usize],
        next: &[usize],
        shape: &Shape,
        scale: f32,
        part: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        let (heads, d) = (shape.heads, shape.head_dim);
        let group = heads / shape.kv_heads;
        let n = rows.len();
        assert!(d.is_multiple_of(8) && (1..=CHUNK_TOKENS).contains(&n));
        assert!(q.len() == heads * d && part.len() == heads * (d + 2) && scores.len() >= heads * CHUNK_TOKENS);
        let base = pool.as_ptr();
        let n8 = n / 8 * 8;
        let padded = n.div_ceil(8) * 8;
        let row_bytes = shape.kv_heads * d * std::mem::size_of::<T>();
        // SAFETY: row offsets and head offsets stay inside the pool (per the
        // caller); `q`, `part` and `scores` hold what the asserts say.
        unsafe {
            let sc = _mm256_set1_ps(scale);
            // The next chunk's rows go to L2 while this one computes, a
            // token's K and V lines after each head of a group of eight.
            let prefetch = |j: usize| {
                if let Some(&r) = next.get(j) {
                    let (k, v) = (base.add(r).cast::<i8>(), base.add(r + shape.v_off).cast::<i8>());
                    for b in (0..row_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T1>(k.add(b));
                        _mm_prefetch::<_MM_HINT_T1>(v.add(b));
                    }
                }
            };
            // Scores, token-major: each group of eight rows is read whole
            // (sequential within a page) for every head.
            let mut t = 0;
            while t < n8 {
                for h in 0..heads {
                    let koff = (h / group) * d;
                    let qh = q.as_ptr().add(h * d);
                    let k: [*const T; 8] = std::array::from_fn(|j| base.add(rows[t + j] + koff));
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for i in (0..d).step_by(8) {
                        let qv = _mm256_loadu_ps(qh.add(i));
                        for j in 0..8 {
                            acc[j] = _mm256_fmadd_ps(qv, load8(k[j].add(i)), acc[j]);
                        }
                    }
                    _mm256_storeu_ps(scores.as_mut_ptr().add(h * CHUNK_TOKENS + t), _mm256_mul_ps(hsum8(acc), sc));
                    if h < 8 {
                        prefetch(t + h);
                    }
                }
                for j in heads..8 {
                    prefetch(t + j);
                }
                t += 8;
            }
            while t < n {
                for h in 0..heads {
                    let koff = (h / group) * d;
                    let qh = q.as_ptr().add(h * d);
                    let k = base.add(rows[t] + koff);
                    let mut acc = _mm256_setzero_ps();
                    for i in (0..d).step_by(8) {
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(i)), load8(k.add(i)), acc);
                    }
                    *scores.as_mut_ptr().add(h * CHUNK_TOKENS + t) = hsum(acc) * scale;
                }
                prefetch(t);
                t += 1;
            }
            for h in 0..heads {
                let s = scores.as_mut_ptr().add(h * CHUNK_TOKENS);
                // Softmax numerators; the padding lanes end up 0.
                for t in n..padded {
                    *s.add(t) = f32::NEG_INFINITY;
                }
                let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
                for t in (0..padded).step_by(8) {
                    mx = _mm256_max_ps(mx, _mm256_loadu_ps(s.add(t)));
                }
                let mx = _mm256_max_ps(mx, _mm256_permute2f128_ps::<1>(mx, mx));
                let mx = _mm256_max_ps(mx, _mm256_shuffle_ps::<0b01_00_11_10>(mx, mx));
                let mx = _mm256_max_ps(mx, _mm256_shuffle_ps::<0b10_11_00_01>(mx, mx));
                let mut sum = _mm256_setzero_ps();
                for t in (0..padded).step_by(8) {
                    let p = exp(_mm256_sub_ps(_mm256_loadu_ps(s.add(t)), mx));
                    _mm256_storeu_ps(s.add(t), p);
                }
                for t in n..padded {
                    *s.add(t) = 0.0;
                }
                for t in (0..padded).step_by(8) {
                    sum = _mm256_add_ps(sum, _mm256_loadu_ps(s.add(t)));
                }
                let o = part.as_mut_ptr().add(h * (d + 2));
                *o = _mm_cvtss_f32(_mm256_castps256_ps128(mx));
                *o.add(1) = hsum(sum);
                for i in 0..d {
                    *o.add(2 + i) = 0.0;
                }
            }
            // Weighted V sums, token-major in groups of eight rows.
            let s = scores.as_ptr();
            let mut t = 0;
            while t < n {
                let te = (t + 8).min(n);
                for h in 0..heads {
                    let voff = shape.v_off + (h / group) * d;
                    let o = part.as_mut_ptr().add(h * (d + 2) + 2);
                    let p = s.add(h * CHUNK_TOKENS);
                    let mut i = 0;
                    while i < d {
                        let rest = (d - i) / 8;
                        i += 8 * match rest {
                            8.. => v_sum::<T, 8>(base, &rows[t..te], voff + i, p.add(t), o.add(i)),
                            4..=7 => v_sum::<T, 4>(base, &rows[t..te], voff + i, p.add(t), o.add(i)),
                            2..=3 => v_sum::<T, 2>(base, &rows[t..te], voff + i, p.add(t), o.add(i)),
                            _ => v_sum::<T, 1>(base, &rows[t..te], voff + i, p.add(t), o.add(i)),
                        };
                    }
                }
                t = te;
            }
        }
    }

    /// `dst[0..8·NV] += Σ_t p[t] · V_t[off..off + 8·NV]`; returns `NV`.
    ///
    /// # Safety
    /// AVX2/FMA CPU; `base + rows[t] + off` addresses `8·NV` elements for
    /// every `t`; `p` holds `rows.len()` floats, `dst` room for `8·NV`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn v_sum<T: KvElem, const NV: usize>(
        base: *const T,
        rows: &[usize],
        off: usize,
        p: *const f32,
        dst: *mut f32,
    ) -> usize {
        // SAFETY: per the caller.
        unsafe {
            let mut acc: [__m256; NV] = std::array::from_fn(|l| _mm256_loadu_ps(dst.add(8 * l)));
            for (t, &r) in rows.iter().enumerate() {
                let v = base.add(r + off);
                let w = _mm256_broadcast_ss(&*p.add(t));
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, load8(v.add(8 * l)), *a);
                }
            }
            for (l, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(dst.add(8 * l), *a);
            }
        }
        NV
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / 8;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm256_setzero_ps();
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= n, within both slices.
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(c * 8)), _mm256_loadu_ps(pb.add(c * 8))) };
            acc = _mm256_fmadd_ps(x, y, acc);
        }
        let mut s = hsum(acc);
        for i in chunks * 8..n {
            s += a[i] * b[i];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let chunks = n / 8;
        let va = _mm256_set1_ps(a);
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= n, within both slices.
            unsafe {
                let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(c * 8)), _mm256_loadu_ps(py.add(c * 8)));
                _mm256_storeu_ps(py.add(c * 8), v);
            }
        }
        for i in chunks * 8..n {
            y[i] = a.mul_add(x[i], y[i]);
        }
    }
}
