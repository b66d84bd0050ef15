//! Kernel micro-benchmarks.
//!
//! `matmul`: SmolLM2-135M projection shapes (576→1536 and 1536→576 Q4_1,
//! the 576→49152 Q8_0 lm_head) at m = 1 (decode GEMV; throughput in bytes
//! of weights per second, with the scalar level as the in-run baseline) and
//! m = 16, 128 (batched decode / prefill GEMM; throughput in elements =
//! FLOPs, 2·m·n·k, per second), both precisions. Thread count follows
//! `RAYON_NUM_THREADS`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use tandem_kernels::cpu::SimdLevel;
use tandem_kernels::linear::matmul_with;
use tandem_kernels::quant::quantize_row;
use tandem_kernels::{DType, Precision, SharedBytes, WeightMatrix};

/// `(name, dtype, rows n, cols k)` of `out = x · Wᵀ` with W `n × k`.
const SHAPES: [(&str, DType, usize, usize); 3] = [
    ("up_576x1536_q4_1", DType::Q4_1, 1536, 576),
    ("down_1536x576_q4_1", DType::Q4_1, 576, 1536),
    ("lm_head_576x49152_q8_0", DType::Q8_0, 49152, 576),
];

fn weights(rng: &mut StdRng, dtype: DType, n: usize, k: usize) -> WeightMatrix {
    let mut bytes = Vec::with_capacity(n * dtype.row_bytes(k).unwrap());
    let mut row = vec![0f32; k];
    for _ in 0..n {
        row.iter_mut().for_each(|v| *v = rng.random_range(-0.1..0.1));
        bytes.extend(quantize_row(dtype, &row).unwrap());
    }
    WeightMatrix::new(dtype, n, k, SharedBytes::from_vec(bytes)).unwrap()
}

fn bench_matmul(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let level = tandem_kernels::cpu::simd_level();
    for (name, dtype, n, k) in SHAPES {
        let w = weights(&mut rng, dtype, n, k);
        let weight_bytes = (n * dtype.row_bytes(k).unwrap()) as u64;
        let x: Vec<f32> = (0..128 * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut out = vec![0f32; 128 * n];

        let mut g = c.benchmark_group(format!("gemv/{name}"));
        g.throughput(Throughput::BytesDecimal(weight_bytes));
        for precision in [Precision::Fast, Precision::Exact] {
            for (lvl, tag) in [(level, "simd"), (SimdLevel::Scalar, "scalar")] {
                let id = BenchmarkId::new(format!("{precision:?}"), tag);
                g.bench_function(id, |b| {
                    b.iter(|| matmul_with(lvl, &w, black_box(&x[..k]), 1, &mut out[..n], precision));
                });
            }
        }
        g.finish();

        let mut g = c.benchmark_group(format!("gemm/{name}"));
        for m in [16, 128] {
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            for precision in [Precision::Fast, Precision::Exact] {
                g.bench_function(BenchmarkId::new(format!("{precision:?}"), format!("m{m}")), |b| {
                    b.iter(|| matmul_with(level, &w, black_box(&x[..m * k]), m, &mut out[..m * n], precision));
                });
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_matmul
}
criterion_main!(benches);
