//! Accuracy of every dtype × precision × level against an f64 oracle, and
//! batch invariance (bits independent of `m`, neighbours and threads).

use super::*;
use crate::quant::quantize_row;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ALL: [DType; 8] =
    [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4_K, DType::Q6_K];

/// Every level this CPU runs (the ones above it would silently run lower).
fn levels() -> Vec<SimdLevel> {
    let top = crate::cpu::simd_level();
    if top < SimdLevel::Avx512 {
        println!("no AVX-512 (VNNI) on this CPU: its kernels are not compared here");
    }
    [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512].into_iter().filter(|&l| l <= top).collect()
}

/// `n × k` random weights of `dtype`: quantized normal-ish values, or for
/// K-quants random blocks with sane f16 scales.
fn random_matrix(rng: &mut StdRng, dtype: DType, n: usize, k: usize) -> WeightMatrix {
    let mut bytes = Vec::new();
    for _ in 0..n {
        match dtype {
            DType::Q4_K | DType::Q6_K => {
                let mut row: Vec<u8> = (0..dtype.row_bytes(k).unwrap()).map(|_| rng.random()).collect();
                for blk in row.chunks_exact_mut(dtype.block_bytes()) {
                    let d = f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes();
                    if dtype == DType::Q4_K {
                        let dmin = f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes();
                        blk[..4].copy_from_slice(&[d[0], d[1], dmin[0], dmin[1]]);
                    } else {
                        blk[208..210].copy_from_slice(&d);
                    }
                }
                bytes.extend(row);
            }
            _ => {
                let row: Vec<f32> =
                    (0..k).map(|_| rng.random_range(-1.0f32..1.0) + rng.random_range(-0.3..0.5)).collect();
                bytes.extend(quantize_row(dtype, &row).unwrap());
            }
        }
    }
    WeightMatrix::new(dtype, n, k, SharedBytes::from_vec(bytes)).unwrap()
}

fn random_x(rng: &mut StdRng, m: usize, k: usize) -> Vec<f32> {
    (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn every_dtype_precision_and_level_matches_the_f64_oracle() {
    let seed = 0x7a2d;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 13;
    for dtype in ALL {
        // K-quants need multiples of 256; float types also get a ragged k.
        let ks: &[usize] = match dtype {
            DType::Q4_K | DType::Q6_K => &[256, 512],
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => &[32, 96, 576],
            _ => &[1, 20, 96, 257],
        };
        for &k in ks {
            let w = random_matrix(&mut rng, dtype, n, k);
            let wf: Vec<Vec<f32>> = (0..n)
                .map(|j| {
                    let mut r = vec![0f32; k];
                    w.dequantize_row(j, &mut r);
                    r
                })
                .collect();
            for m in [1, 3, 16, 40] {
                let x = random_x(&mut rng, m, k);
                for level in levels() {
                    for precision in [Precision::Exact, Precision::Fast] {
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(level, &w, &x, m, &mut out, precision);
                        let lossy = precision == Precision::Fast && fast::supports(dtype);
                        for i in 0..m {
                            let xi = &x[i * k..(i + 1) * k];
                            for (j, wj) in wf.iter().enumerate() {
                                let want: f64 = xi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64).sum();
                                let l1: f64 = xi.iter().zip(wj).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                                // Activation quantization moves each x by at
                                // most half a step, amax(block) / 65534.
                                let q16: f64 = if lossy {
                                    xi.chunks(32)
                                        .zip(wj.chunks(32))
                                        .map(|(xb, wb)| {
                                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                                            amax / 65534.0 * wb.iter().map(|v| v.abs() as f64).sum::<f64>()
                                        })
                                        .sum()
                                } else {
                                    0.0
                                };
                                let tol = 1e-5 * l1 + 1.02 * q16 + 1e-30;
                                let got = out[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "seed {seed:#x} {dtype} k={k} m={m} {level:?} {precision:?} ({i},{j}): got {got}, want {want}, tol {tol}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn rows_are_bit_identical_whatever_the_batch_and_the_threads() {
    let seed = 0xba7c;
    let mut rng = StdRng::seed_from_u64(seed);
    let (n, k) = (203, 512);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for dtype in ALL {
        let w = random_matrix(&mut rng, dtype, n, k);
        let x = random_x(&mut rng, 33, k);
        for level in levels() {
            for precision in [Precision::Exact, Precision::Fast] {
                let ctx = format!("seed {seed:#x} {dtype} {level:?} {precision:?}");
                // Each row alone, single-threaded: the reference.
                let alone: Vec<f32> = one.install(|| {
                    (0..33)
                        .flat_map(|i| {
                            let mut o = vec![0f32; n];
                            matmul_with(level, &w, &x[i * k..(i + 1) * k], 1, &mut o, precision);
                            o
                        })
                        .collect()
                });
                // All 33 rows on the global pool, and on three threads.
                let mut all = vec![0f32; 33 * n];
                matmul_with(level, &w, &x, 33, &mut all, precision);
                assert_eq!(bits(&all), bits(&alone), "{ctx}: m=33 vs m=1");
                let mut all3 = vec![0f32; 33 * n];
                three.install(|| matmul_with(level, &w, &x, 33, &mut all3, precision));
                assert_eq!(bits(&all3), bits(&alone), "{ctx}: m=33 on 3 threads");
                // Rows 5..12 as a batch of 7 between different neighbours.
                let mut x7 = x[5 * k..12 * k].to_vec();
                let mut o7 = vec![0f32; 7 * n];
                matmul_with(level, &w, &x7, 7, &mut o7, precision);
                assert_eq!(bits(&o7), bits(&alone[5 * n..12 * n]), "{ctx}: m=7");
                x7[..k].iter_mut().for_each(|v| *v = -*v * 3.0);
                matmul_with(level, &w, &x7, 7, &mut o7, precision);
                assert_eq!(bits(&o7[n..]), bits(&alone[6 * n..12 * n]), "{ctx}: m=7, first row changed");
            }
        }
    }
}

#[test]
fn avx512_fast_path_is_bit_identical_to_avx2_and_close_to_the_scalar_oracle() {
    if crate::cpu::simd_level() < SimdLevel::Avx512 {
        println!("skipped: this CPU has no AVX-512 (VNNI)");
        return;
    }
    let seed = 0x512;
    let mut rng = StdRng::seed_from_u64(seed);
    // Every tile height (4, 2, 1 rows) and ragged panels (n = 37).
    let n = 37;
    for (dtype, k) in
        [(DType::Q8_0, 576), (DType::Q4_0, 96), (DType::Q4_1, 576), (DType::Q4_1, 1536), (DType::Q4_K, 512)]
    {
        let w = random_matrix(&mut rng, dtype, n, k);
        let wf: Vec<Vec<f32>> = (0..n)
            .map(|j| {
                let mut r = vec![0f32; k];
                w.dequantize_row(j, &mut r);
                r
            })
            .collect();
        for m in [1, 3, 7, 16] {
            let x = random_x(&mut rng, m, k);
            let ctx = format!("seed {seed:#x} {dtype} k={k} m={m}");
            let (mut fast, mut avx2, mut oracle) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
            matmul_with(SimdLevel::Avx512, &w, &x, m, &mut fast, Precision::Fast);
            matmul_with(SimdLevel::Avx2, &w, &x, m, &mut avx2, Precision::Fast);
            matmul_with(SimdLevel::Scalar, &w, &x, m, &mut oracle, Precision::Fast);
            assert_eq!(bits(&fast), bits(&avx2), "{ctx}: AVX-512 vs AVX2");
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                for (j, wj) in wf.iter().enumerate() {
                    // The same integer block products; only the float
                    // rounding of scaling and summing differs.
                    let l1: f32 = xi.iter().zip(wj).map(|(a, b)| (a * b).abs()).sum();
                    let (got, want) = (fast[i * n + j], oracle[i * n + j]);
                    assert!((got - want).abs() <= 1e-5 * l1 + 1e-30, "{ctx} ({i},{j}): {got} vs scalar {want}");
                }
            }
        }
    }
}

#[test]
fn single_rows_split_over_threads_match_one_thread() {
    // Big enough that m = 1 runs in parallel.
    let seed = 0x51;
    let mut rng = StdRng::seed_from_u64(seed);
    let (n, k) = (2050, 576);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for dtype in [DType::Q8_0, DType::Q4_1, DType::BF16] {
        let w = random_matrix(&mut rng, dtype, n, k);
        let x = random_x(&mut rng, 1, k);
        for precision in [Precision::Exact, Precision::Fast] {
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            one.install(|| matmul(&w, &x, 1, &mut a, precision));
            three.install(|| matmul(&w, &x, 1, &mut b, precision));
            assert_eq!(bits(&a), bits(&b), "seed {seed:#x} {dtype} {precision:?}");
        }
    }
}

#[test]
fn empty_products_are_fine() {
    let w = WeightMatrix::from_f32(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    matmul(&w, &[], 0, &mut [], Precision::Exact);
    let mut out = [0f32; 2];
    matmul(&w, &[1.0, 0.0, -1.0], 1, &mut out, Precision::Fast);
    assert_eq!(out, [-2.0, -2.0]);
    let none = WeightMatrix::new(DType::Q8_0, 2, 0, SharedBytes::from_vec(Vec::new())).unwrap();
    let mut out = [f32::NAN; 6];
    for precision in [Precision::Exact, Precision::Fast] {
        matmul(&none, &[], 3, &mut out, precision);
        assert_eq!(out, [0.0; 6]);
    }
}

#[test]
#[should_panic(expected = "x is not m×cols")]
fn mismatched_lengths_panic() {
    let w = WeightMatrix::from_f32(2, 3, &[0.0; 6]).unwrap();
    matmul(&w, &[0.0; 4], 1, &mut [0.0; 2], Precision::Exact);
}

/// Ad-hoc timing (min over repetitions, robust to a busy machine):
/// `cargo test -p tandem-kernels --release timing -- --ignored --nocapture`
/// (environment: `TIMING_THREADS`, `TIMING_M=1,16`, `TIMING_REPS_SCALE`).
#[test]
#[ignore = "timing, not a test"]
fn timing() {
    let mut rng = StdRng::seed_from_u64(1);
    let shapes = [
        (DType::Q4_1, 1536, 576),
        (DType::Q4_1, 576, 1536),
        (DType::Q8_0, 49152, 576),
        (DType::Q4_1, 576, 576),
        (DType::Q4_1, 192, 576),
    ];
    let threads: usize = std::env::var("TIMING_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let ms: Vec<usize> = std::env::var("TIMING_M")
        .ok()
        .map(|v| v.split(',').map(|s| s.parse().unwrap()).collect())
        .unwrap_or(vec![1, 16, 128]);
    // More repetitions give steadier minima on a loaded machine.
    let reps_scale: f64 = std::env::var("TIMING_REPS_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    for (dtype, n, k) in shapes {
        let w = random_matrix(&mut rng, dtype, n, k);
        let bytes = (n * dtype.row_bytes(k).unwrap()) as f64;
        for &m in &ms {
            let x = random_x(&mut rng, m, k);
            let mut out = vec![0f32; m * n];
            for precision in [Precision::Fast, Precision::Exact] {
                let reps = (2e8 * reps_scale / (m * n * k) as f64).clamp(3.0, 2000.0) as usize;
                let mut best = f64::MAX;
                pool.install(|| {
                    for _ in 0..reps {
                        let t = std::time::Instant::now();
                        matmul(&w, &x, m, &mut out, precision);
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                });
                println!(
                    "{dtype} {n}x{k} m={m:<4} {precision:?}\t{:8.1} us\t{:6.2} GB/s\t{:6.1} GFLOP/s",
                    best * 1e6,
                    bytes / best / 1e9,
                    2.0 * (m * n * k) as f64 / best / 1e9
                );
            }
        }
    }
}
