//! The chunked kernels against a dense f64 reference, the AVX2 kernel
//! against the portable one (odd head sizes, chunk and page tails, bf16),
//! and `attend_batch` bit for bit against `attend` whatever the batch and
//! the thread count.

use super::*;
use rand::rngs::StdRng;
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

fn levels() -> Vec<SimdLevel> {
    let mut v = vec![SimdLevel::Scalar];
    if simd_level() >= SimdLevel::Avx2 {
        v.push(SimdLevel::Avx2);
    }
    v
}

/// A pool with `seqs` sequences of `ctx` tokens (pages shuffled), random
/// K and V, and per sequence its block table and its rows `[kv_head][t]`.
struct Fixture {
    layer: usize,
    pool: Vec<f32>,
    tables: Vec<Vec<u32>>,
    ks: Vec<Vec<Vec<Vec<f32>>>>,
    vs: Vec<Vec<Vec<Vec<f32>>>>,
}

fn fixture(rng: &mut StdRng, geo: KvGeometry, layer: usize, seqs: usize, ctx: usize) -> Fixture {
    let per_seq = ctx.div_ceil(geo.page_tokens);
    let mut pages: Vec<u32> = (0..(seqs * per_seq + 1) as u32).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.random_range(0..=i));
    }
    let mut pool = vec![0f32; pages.len() * geo.page_elems()];
    let (d, kvh) = (geo.head_dim, geo.num_kv_heads);
    let tables: Vec<Vec<u32>> = pages.chunks(per_seq).take(seqs).map(|c| c.to_vec()).collect();
    let (mut ks, mut vs) = (vec![vec![vec![]; kvh]; seqs], vec![vec![vec![]; kvh]; seqs]);
    for (s, table) in tables.iter().enumerate() {
        for t in 0..ctx {
            let (page, slot) = (table[t / geo.page_tokens] as usize, t % geo.page_tokens);
            for h in 0..kvh {
                // Scores spread over a few units, as in real models.
                let k: Vec<f32> = (0..d).map(|_| rng.random_range(-1.5..1.5)).collect();
                let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let ko = geo.k_offset(page, layer, slot) + h * d;
                let vo = geo.v_offset(page, layer, slot) + h * d;
                pool[ko..ko + d].copy_from_slice(&k);
                pool[vo..vo + d].copy_from_slice(&v);
                ks[s][h].push(k);
                vs[s][h].push(v);
            }
        }
    }
    Fixture { layer, pool, tables, ks, vs }
}

fn random_q(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

#[test]
fn paged_attention_matches_dense_reference_on_both_paths() {
    let mut rng = StdRng::seed_from_u64(7);
    let (kv_heads, d, group) = (2, 16, 3);
    let geo = KvGeometry { page_tokens: 4, num_layers: 2, num_kv_heads: kv_heads, head_dim: d };
    // Long enough for three chunks, the last one partial.
    let ctx = 2 * CHUNK_TOKENS + 10;
    let f = fixture(&mut rng, geo, 1, 1, ctx);
    let heads = kv_heads * group;
    let q = random_q(&mut rng, heads * d);
    let want = |ctx: usize, round: bool| -> Vec<f32> {
        let r = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
            rows[..ctx]
                .iter()
                .map(|r| r.iter().map(|&v| if round { bf16::from_f32(v).to_f32() } else { v }).collect())
                .collect()
        };
        (0..heads)
            .flat_map(|h| reference(&q[h * d..(h + 1) * d], &r(&f.ks[0][h / group]), &r(&f.vs[0][h / group]), d, 0.25))
            .collect()
    };
    let pool16: Vec<bf16> = f.pool.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut scratch = AttendScratch::default();
    for level in levels() {
        for ctx in [1, 3, CHUNK_TOKENS, CHUNK_TOKENS + 1, ctx] {
            let args = AttendArgs { geometry: geo, layer: 1, block_table: &f.tables[0], context_len: ctx, scale: 0.25 };
            let mut out = vec![0f32; q.len()];
            attend_with(level, &q, &f.pool, &args, &mut out, &mut scratch);
            assert!(close(&out, &want(ctx, false), 1e-5), "{level:?} ctx {ctx}: {out:?}");
            attend_with(level, &q, &pool16, &args, &mut out, &mut scratch);
            assert!(close(&out, &want(ctx, true), 1e-5), "{level:?} bf16 ctx {ctx}");
        }
    }
}

#[test]
fn simd_kernel_matches_the_portable_oracle_on_odd_shapes() {
    if simd_level() < SimdLevel::Avx2 {
        return;
    }
    let seed = 0x5eed_a77e;
    println!("seed {seed:#x}");
    let mut rng = StdRng::seed_from_u64(seed);
    // Head sizes: multiples of 8 (the AVX2 kernel, with 1, 2, 4 and 8
    // vectors per V pass) and not (the portable kernel on AVX2 math).
    for (d, kv_heads, group, page_tokens) in
        [(64, 3, 3, 16), (8, 1, 1, 1), (24, 2, 2, 3), (72, 1, 4, 100), (128, 2, 1, 64), (12, 2, 3, 5), (40, 1, 2, 7)]
    {
        let geo = KvGeometry { page_tokens, num_layers: 2, num_kv_heads: kv_heads, head_dim: d };
        let ctx = 3 * CHUNK_TOKENS + 13;
        let f = fixture(&mut rng, geo, 0, 1, ctx);
        let q = random_q(&mut rng, kv_heads * group * d);
        let pool16: Vec<bf16> = f.pool.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut scratch = AttendScratch::default();
        for ctx in [1, 5, 8, 9, CHUNK_TOKENS - 1, CHUNK_TOKENS, 2 * CHUNK_TOKENS + 7, ctx] {
            let args = AttendArgs { geometry: geo, layer: 0, block_table: &f.tables[0], context_len: ctx, scale: 0.3 };
            let (mut fast, mut slow) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            attend_with(SimdLevel::Avx2, &q, &f.pool, &args, &mut fast, &mut scratch);
            attend_with(SimdLevel::Scalar, &q, &f.pool, &args, &mut slow, &mut scratch);
            assert!(close(&fast, &slow, 2e-6), "d {d} pages {page_tokens} ctx {ctx}: {fast:?} vs {slow:?}");
            attend_with(SimdLevel::Avx2, &q, &pool16, &args, &mut fast, &mut scratch);
            attend_with(SimdLevel::Scalar, &q, &pool16, &args, &mut slow, &mut scratch);
            assert!(close(&fast, &slow, 2e-6), "bf16 d {d} pages {page_tokens} ctx {ctx}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_is_within_two_ulp_of_std() {
    if simd_level() < SimdLevel::Avx2 {
        return;
    }
    use std::arch::x86_64::*;
    let mut x = -87.0f32;
    while x < 88.0 {
        let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.0013);
        let mut got = [0f32; 8];
        // SAFETY: AVX2 was detected; `xs` and `got` hold eight floats.
        unsafe { _mm256_storeu_ps(got.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(xs.as_ptr()))) };
        for (g, &x) in got.iter().zip(&xs) {
            let want = (x as f64).exp();
            let ulp = (want as f32).to_bits().abs_diff(g.to_bits());
            assert!(ulp <= 2, "exp({x}) = {g}, want {want} ({ulp} ulp)");
        }
        x += 0.37;
    }
}

#[test]
fn batch_is_bit_identical_to_one_row_at_a_time_for_any_threads() {
    let mut rng = StdRng::seed_from_u64(11);
    let geo = KvGeometry { page_tokens: 16, num_layers: 2, num_kv_heads: 3, head_dim: 64 };
    let ctx = 40 * CHUNK_TOKENS + 5;
    let f = fixture(&mut rng, geo, 1, 3, ctx);
    let q_dim = 9 * 64;
    // Rows of different lengths over three sequences, one of them long
    // enough to be split into runs of chunks.
    let shape = [(0, ctx), (1, 70), (2, 1), (0, 3 * CHUNK_TOKENS), (1, 64), (2, 30 * CHUNK_TOKENS + 1)];
    let rows: Vec<BatchRow<'_>> =
        shape.iter().map(|&(s, c)| BatchRow { block_table: &f.tables[s], context_len: c }).collect();
    let q = random_q(&mut rng, rows.len() * q_dim);
    for level in levels() {
        let mut want = vec![0f32; q.len()];
        let mut scratch = AttendScratch::default();
        for (r, row) in rows.iter().enumerate() {
            let args = AttendArgs {
                geometry: geo,
                layer: f.layer,
                block_table: row.block_table,
                context_len: row.context_len,
                scale: 0.125,
            };
            let o = r * q_dim..(r + 1) * q_dim;
            attend_with(level, &q[o.clone()], &f.pool, &args, &mut want[o], &mut scratch);
        }
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            // The whole batch, and each row alone (a single row is split
            // the most).
            let mut got = vec![0f32; q.len()];
            let args = BatchArgs { geometry: geo, layer: f.layer, scale: 0.125, rows: &rows };
            pool.install(|| attend_batch_with(level, &q, &f.pool, &args, &mut got));
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?} {threads} threads");
            for r in 0..rows.len() {
                let o = r * q_dim..(r + 1) * q_dim;
                let args = BatchArgs { rows: &rows[r..r + 1], ..args };
                let mut one = vec![0f32; q_dim];
                pool.install(|| attend_batch_with(level, &q[o.clone()], &f.pool, &args, &mut one));
                assert!(one.iter().zip(&want[o]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {r} alone");
            }
        }
    }
}
