//! Attention over a paged KV cache.
//!
//! The pool is an array of pages; a page holds `page_tokens` tokens for all
//! layers, laid out `[layer][k|v][token][kv_head][head_dim]` (DESIGN.md §3),
//! so one layer of one page is one contiguous range. A sequence's block
//! table lists its pages in order; token `t` lives in page
//! `table[t / page_tokens]`, slot `t % page_tokens`.
//!
//! [`attend`] computes all query heads of one token. It streams the
//! sequence's K rows (every KV head of a token is one contiguous row) and
//! then its V rows, each read once for all the query heads that share a KV
//! head (GQA). Prefill calls it once per new token with the causal context
//! length, decode once per sequence, so a token's result never depends on
//! how requests were batched or chunked.

use crate::cpu::{simd_level, SimdLevel};
use half::bf16;

/// A KV cache element type.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    const NAME: &'static str;
    fn from_f32(v: f32) -> Self;
    /// Gives `f` the row as f32: `src` itself for f32, else converted into `buf`.
    fn with_f32<R>(src: &[Self], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R;
}

impl KvElem for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn with_f32<R>(src: &[Self], _buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        f(src)
    }
}

impl KvElem for bf16 {
    const NAME: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn with_f32<R>(src: &[Self], buf: &mut [f32], f: impl FnOnce(&[f32]) -> R) -> R {
        let buf = &mut buf[..src.len()];
        for (o, &v) in buf.iter_mut().zip(src) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
        f(buf)
    }
}

/// The shape of the paged pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub page_tokens: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    /// Elements of one token's K (or V) for one layer, all heads.
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Elements of one layer of one page (K then V).
    pub fn layer_elems(&self) -> usize {
        2 * self.page_tokens * self.row_elems()
    }
    /// Elements of one page.
    pub fn page_elems(&self) -> usize {
        self.num_layers * self.layer_elems()
    }
    /// Offset of the K row of `slot` in `page` at `layer`.
    pub fn k_offset(&self, page: usize, layer: usize, slot: usize) -> usize {
        page * self.page_elems() + layer * self.layer_elems() + slot * self.row_elems()
    }
    /// Offset of the V row of `slot` in `page` at `layer`.
    pub fn v_offset(&self, page: usize, layer: usize, slot: usize) -> usize {
        self.k_offset(page, layer, slot) + self.page_tokens * self.row_elems()
    }
}

/// One attention problem: every query head of one token.
#[derive(Debug, Clone, Copy)]
pub struct AttendArgs<'a> {
    pub geometry: KvGeometry,
    pub layer: usize,
    /// The sequence's pages, in token order.
    pub block_table: &'a [u32],
    /// Attend to tokens `0..context_len` (causal: the query's position + 1).
    pub context_len: usize,
    /// Usually `1/sqrt(head_dim)`.
    pub scale: f32,
}

/// `out[h] = softmax(q[h] · K[kv(h)]ᵀ · scale) · V[kv(h)]` for every query
/// head `h` of `q` (`num_heads × head_dim`, heads grouped by KV head as in
/// Llama: query head `h` uses KV head `h / group`). `scratch` is reused
/// between calls.
pub fn attend<T: KvElem>(q: &[f32], pool: &[T], args: &AttendArgs<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    let row = args.geometry.row_elems();
    assert!(row > 0 && q.len().is_multiple_of(row), "attend: q is not a whole number of head groups");
    assert_eq!(q.len(), out.len(), "attend: out length");
    assert!(args.context_len > 0, "attend: empty context");
    let pages_needed = args.context_len.div_ceil(args.geometry.page_tokens);
    assert!(args.block_table.len() >= pages_needed, "attend: block table too short");
    match simd_level() {
        // SAFETY: simd_level() reported AVX2 and FMA on this CPU.
        SimdLevel::Avx2 => unsafe { attend_avx2(q, pool, args, out, scratch) },
        SimdLevel::Scalar => attend_impl::<T, Scalar>(q, pool, args, out, scratch),
    }
}

/// The same computation on the portable path, for tests.
pub fn attend_scalar<T: KvElem>(q: &[f32], pool: &[T], args: &AttendArgs<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    attend_impl::<T, Scalar>(q, pool, args, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2<T: KvElem>(
    q: &[f32],
    pool: &[T],
    args: &AttendArgs<'_>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    attend_impl::<T, Avx2>(q, pool, args, out, scratch)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn attend_avx2<T: KvElem>(
    q: &[f32],
    pool: &[T],
    args: &AttendArgs<'_>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    attend_impl::<T, Scalar>(q, pool, args, out, scratch)
}

/// Vector primitives the attention body is generic over.
trait VecMath {
    fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `y += a * x`
    fn axpy(y: &mut [f32], a: f32, x: &[f32]);
}

struct Scalar;

impl VecMath for Scalar {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // Eight partial sums, like the SIMD path, so both round alike.
        let mut acc = [0f32; 8];
        let chunks = a.len() / 8;
        for c in 0..chunks {
            for l in 0..8 {
                acc[l] = a[c * 8 + l].mul_add(b[c * 8 + l], acc[l]);
            }
        }
        let mut s = acc.iter().sum::<f32>();
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
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl VecMath for Avx2 {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only instantiated from `attend_avx2`, which runs after
        // AVX2/FMA were detected.
        unsafe { avx2::dot(a, b) }
    }
    #[inline(always)]
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        // SAFETY: as above.
        unsafe { avx2::axpy(y, a, x) }
    }
}

#[cfg(not(target_arch = "x86_64"))]
type Avx2 = Scalar;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let chunks = n / 8;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = _mm256_setzero_ps();
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= n, within both slices.
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(c * 8)), _mm256_loadu_ps(pb.add(c * 8))) };
            acc = _mm256_fmadd_ps(x, y, acc);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` has room for eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        let mut s = lanes.iter().sum::<f32>();
        for i in chunks * 8..n {
            s += a[i] * b[i];
        }
        s
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
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

#[inline(always)]
fn attend_impl<T: KvElem, M: VecMath>(
    q: &[f32],
    pool: &[T],
    args: &AttendArgs<'_>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let geo = &args.geometry;
    let (d, row) = (geo.head_dim, geo.row_elems());
    let heads = q.len() / d;
    let group = heads / geo.num_kv_heads;
    let ctx = args.context_len;
    let pages = ctx.div_ceil(geo.page_tokens);
    scratch.clear();
    scratch.resize(heads * ctx + row, 0.0);
    let (scores, row_buf) = scratch.split_at_mut(heads * ctx);

    // Scores: the K rows of a page are contiguous; each is read once for
    // all query heads.
    let mut t = 0;
    for &page in &args.block_table[..pages] {
        let slots = geo.page_tokens.min(ctx - t);
        let base = geo.k_offset(page as usize, args.layer, 0);
        for slot in 0..slots {
            let k = base + slot * row;
            T::with_f32(&pool[k..k + row], row_buf, |k| {
                for h in 0..heads {
                    let kv = h / group;
                    scores[h * ctx + t] = M::dot(&q[h * d..(h + 1) * d], &k[kv * d..(kv + 1) * d]) * args.scale;
                }
            });
            t += 1;
        }
    }
    for h in 0..heads {
        crate::ops::softmax(&mut scores[h * ctx..(h + 1) * ctx]);
    }

    // Weighted sum of the V rows, again one read per row.
    out.fill(0.0);
    let mut t = 0;
    for &page in &args.block_table[..pages] {
        let slots = geo.page_tokens.min(ctx - t);
        let base = geo.v_offset(page as usize, args.layer, 0);
        for slot in 0..slots {
            let v = base + slot * row;
            T::with_f32(&pool[v..v + row], row_buf, |v| {
                for h in 0..heads {
                    let kv = h / group;
                    M::axpy(&mut out[h * d..(h + 1) * d], scores[h * ctx + t], &v[kv * d..(kv + 1) * d]);
                }
            });
            t += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Dense reference: softmax(q·kᵀ·scale)·v in f64 over contiguous K, V.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], d: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        for (g, qh) in q.chunks(d).enumerate() {
            let s: Vec<f64> = k
                .iter()
                .map(|kr| qh.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for i in 0..d {
                out[g * d + i] = (e.iter().zip(v).map(|(p, vr)| p * vr[i] as f64).sum::<f64>() / z) as f32;
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_dense_reference_on_both_paths() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (kv_heads, d, group) = (2, 16, 3);
        let geo = KvGeometry { page_tokens: 4, num_layers: 2, num_kv_heads: kv_heads, head_dim: d };
        let mut pool = vec![0f32; 6 * geo.page_elems()];
        // A scattered block table: the sequence owns pages 5, 1, 3.
        let table = [5u32, 1, 3];
        let (ctx, layer) = (10, 1);
        // ks[h][t], vs[h][t]: KV head h's rows.
        let mut ks = vec![vec![]; kv_heads];
        let mut vs = vec![vec![]; kv_heads];
        for t in 0..ctx {
            let (page, slot) = (table[t / 4] as usize, t % 4);
            for h in 0..kv_heads {
                let k: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let ko = geo.k_offset(page, layer, slot) + h * d;
                let vo = geo.v_offset(page, layer, slot) + h * d;
                pool[ko..ko + d].copy_from_slice(&k);
                pool[vo..vo + d].copy_from_slice(&v);
                ks[h].push(k);
                vs[h].push(v);
            }
        }
        let heads = kv_heads * group;
        let q: Vec<f32> = (0..heads * d).map(|_| rng.random_range(-2.0..2.0)).collect();
        let want = |ctx: usize, ks: &[Vec<Vec<f32>>], vs: &[Vec<Vec<f32>>]| -> Vec<f32> {
            (0..heads)
                .flat_map(|h| reference(&q[h * d..(h + 1) * d], &ks[h / group][..ctx], &vs[h / group][..ctx], d, 0.25))
                .collect()
        };
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        let args = AttendArgs { geometry: geo, layer, block_table: &table, context_len: ctx, scale: 0.25 };
        let (mut fast, mut slow, mut scratch) = (vec![0f32; q.len()], vec![0f32; q.len()], vec![]);
        attend(&q, &pool, &args, &mut fast, &mut scratch);
        attend_scalar(&q, &pool, &args, &mut slow, &mut scratch);
        let full = want(ctx, &ks, &vs);
        assert!(close(&fast, &full), "simd: {fast:?} vs {full:?}");
        assert!(close(&slow, &full), "scalar: {slow:?} vs {full:?}");

        // Causal prefix: attending to the first 3 tokens only.
        attend(&q, &pool, &AttendArgs { context_len: 3, ..args }, &mut fast, &mut scratch);
        assert!(close(&fast, &want(3, &ks, &vs)));

        // bf16 KV: the same values rounded to bf16.
        let pool16: Vec<bf16> = pool.iter().map(|&v| bf16::from_f32(v)).collect();
        let round = |rows: &[Vec<Vec<f32>>]| -> Vec<Vec<Vec<f32>>> {
            rows.iter()
                .map(|h| h.iter().map(|r| r.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()).collect())
                .collect()
        };
        attend(&q, &pool16, &args, &mut fast, &mut scratch);
        assert!(close(&fast, &want(ctx, &round(&ks), &round(&vs))));
    }
}
