//! Parity of the CUDA kernels with the CPU scalar oracle. Each kernel has one
//! test body, generic over a [`Backend`], instantiated twice: for the CPU
//! oracle itself (which runs everywhere and checks the harness: inputs,
//! paging, the dense f64 references, tolerances) and for CUDA device 0,
//! which skips, printing why, when this machine has no usable GPU.
//!
//! Inputs are seeded random (the seed is printed); attention pools have
//! shuffled pages, several sequences, GQA, chunk and page tails, and f32
//! and bf16 KV. Everything on the device accumulates in f32; tolerances are
//! relative to `1 + |expected|`.
#![cfg(feature = "cuda")]

mod common;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::sync::OnceLock;
use tandem_kernels::attention::{attend_batch_with, BatchArgs, BatchRow, KvGeometry};
use tandem_kernels::cpu::SimdLevel;
use tandem_kernels::cuda::cudarc;
use tandem_kernels::cuda::gemm::GemmInput;
use tandem_kernels::cuda::kernels::{CudaKvElem, PagedArgs};
use tandem_kernels::cuda::nvrtc::{self, NVRTC_LIB_ENV};
use tandem_kernels::cuda::{CudaGemm, CudaKernels, PrefillSeq};
use tandem_kernels::ops::{apply_rope, rms_norm_rows, silu_mul};
use tandem_kernels::{matmul, DType, Precision, SharedBytes, WeightMatrix};

const SEED: u64 = 0x7a4d_3e11;

/// A GEMM input type with its CPU weight dtype and conversions.
trait Elem: GemmInput + Copy {
    const DTYPE: DType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    fn le_bytes(self) -> Vec<u8>;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl Elem for bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl Elem for f16 {
    const DTYPE: DType = DType::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

/// A KV element with its conversions (f32, bf16).
trait Kv: CudaKvElem {
    fn to_f32(self) -> f32;
}
impl Kv for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}
impl Kv for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// What a test body needs from a device; inputs and outputs are host data.
trait Backend {
    fn name(&self) -> &'static str;
    /// Each row of `x` (rows of `weight.len()`).
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Vec<f32>;
    /// `x` is `rows × heads × head_dim`; tables are `rows × head_dim/2`.
    fn rope(&self, x: &[f32], rows: usize, head_dim: usize, cos: &[f32], sin: &[f32]) -> Vec<f32>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &[f32], up: &[f32]) -> Vec<f32>;
    fn decode<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, rows: &[BatchRow<'_>]) -> Vec<f32>;
    fn prefill<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, seqs: &[PrefillSeq<'_>]) -> Vec<f32>;
    /// `x · Wᵀ`, `x` of `rows × k`, `w` of `n × k`.
    fn linear<T: Elem>(&self, x: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32>;
}

/// The CPU scalar oracle.
struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        rms_norm_rows(x, weight, eps, &mut out);
        out
    }
    fn rope(&self, x: &[f32], rows: usize, head_dim: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let (mut out, half, per_row) = (x.to_vec(), head_dim / 2, x.len() / rows);
        for r in 0..rows {
            let t = r * half..(r + 1) * half;
            apply_rope(&mut out[r * per_row..(r + 1) * per_row], head_dim, &cos[t.clone()], &sin[t]);
        }
        out
    }
    fn silu_mul(&self, gate: &[f32], up: &[f32]) -> Vec<f32> {
        let mut out = gate.to_vec();
        silu_mul(&mut out, up);
        out
    }
    fn decode<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, rows: &[BatchRow<'_>]) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        let batch = BatchArgs { geometry: args.geometry, layer: args.layer, scale: args.scale, rows };
        attend_batch_with(SimdLevel::Scalar, q, pool, &batch, &mut out);
        out
    }
    fn prefill<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, seqs: &[PrefillSeq<'_>]) -> Vec<f32> {
        // On the CPU a prefill chunk is rows whose contexts end at themselves.
        let rows: Vec<BatchRow<'_>> = seqs
            .iter()
            .flat_map(|s| {
                (0..s.q_len).map(|i| BatchRow { block_table: s.block_table, context_len: s.cached_len + i + 1 })
            })
            .collect();
        self.decode(q, pool, args, &rows)
    }
    fn linear<T: Elem>(&self, x: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.le_bytes()).collect();
        let w = WeightMatrix::new(T::DTYPE, n, k, SharedBytes::from_vec(bytes)).expect("weights");
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let mut out = vec![0f32; rows * n];
        matmul(&w, &x, rows, &mut out, Precision::Exact);
        out
    }
}

/// CUDA device 0, or why there is none.
struct Cuda {
    kernels: CudaKernels,
    gemm: CudaGemm,
}

impl Cuda {
    fn get() -> Option<&'static Cuda> {
        static CUDA: OnceLock<Result<Cuda, String>> = OnceLock::new();
        let cuda = CUDA.get_or_init(|| {
            if let Some(path) = std::env::var_os(NVRTC_LIB_ENV).map(PathBuf::from).or_else(common::setup_sh_nvrtc) {
                // NVRTC from scripts/setup.sh when the system has none.
                nvrtc::load_nvrtc_from(&path).map_err(|e| e.to_string())?;
            }
            let kernels = CudaKernels::new(0).map_err(|e| e.to_string())?;
            let gemm = CudaGemm::new(kernels.stream().clone()).map_err(|e| e.to_string())?;
            Ok(Cuda { kernels, gemm })
        });
        match cuda {
            Ok(c) => Some(c),
            Err(why) => {
                println!("skipped on cuda: {why}");
                None
            }
        }
    }

    fn up<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> cudarc::driver::CudaSlice<T> {
        self.kernels.stream().clone_htod(v).expect("host to device")
    }

    fn down(&self, v: &cudarc::driver::CudaSlice<f32>) -> Vec<f32> {
        let host = self.kernels.stream().clone_dtoh(v).expect("device to host");
        self.kernels.stream().synchronize().expect("stream");
        host
    }
}

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
        let (x, w, mut out) = (self.up(x), self.up(weight), self.up(&vec![0f32; x.len()]));
        self.kernels.rms_norm(&x.as_view(), &w.as_view(), eps, &mut out.as_view_mut()).expect("rms_norm");
        self.down(&out)
    }
    fn rope(&self, x: &[f32], rows: usize, head_dim: usize, cos: &[f32], sin: &[f32]) -> Vec<f32> {
        let (mut x, cos, sin) = (self.up(x), self.up(cos), self.up(sin));
        self.kernels.rope(&mut x.as_view_mut(), &cos.as_view(), &sin.as_view(), rows, head_dim).expect("rope");
        self.down(&x)
    }
    fn silu_mul(&self, gate: &[f32], up: &[f32]) -> Vec<f32> {
        let (mut gate, up) = (self.up(gate), self.up(up));
        self.kernels.silu_mul(&mut gate.as_view_mut(), &up.as_view()).expect("silu_mul");
        self.down(&gate)
    }
    fn decode<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, rows: &[BatchRow<'_>]) -> Vec<f32> {
        let (q, pool, mut out) = (self.up(q), self.up(pool), self.up(&vec![0f32; q.len()]));
        self.kernels.paged_decode(&q.as_view(), &pool.as_view(), args, rows, &mut out.as_view_mut()).expect("decode");
        self.down(&out)
    }
    fn prefill<T: Kv>(&self, q: &[f32], pool: &[T], args: &PagedArgs, seqs: &[PrefillSeq<'_>]) -> Vec<f32> {
        let (q, pool, mut out) = (self.up(q), self.up(pool), self.up(&vec![0f32; q.len()]));
        self.kernels.paged_prefill(&q.as_view(), &pool.as_view(), args, seqs, &mut out.as_view_mut()).expect("prefill");
        self.down(&out)
    }
    fn linear<T: Elem>(&self, x: &[T], w: &[T], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let (x, w, mut out) = (self.up(x), self.up(w), self.up(&vec![0f32; rows * n]));
        self.gemm.linear(&x.as_view(), &w.as_view(), (rows, k, n), &mut out.as_view_mut()).expect("gemm");
        self.down(&out)
    }
}

fn rng(test: &str) -> StdRng {
    println!("{test}: seed {SEED:#x}");
    StdRng::seed_from_u64(SEED)
}

fn random(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

#[track_caller]
fn assert_close(who: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{who}: lengths");
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| (i, (g - w).abs() / (1.0 + w.abs())))
        .fold((0, 0f32), |a, b| if b.1 > a.1 || b.1.is_nan() { b } else { a });
    assert!(
        worst.1 <= tol,
        "{who}: element {} is {} where {} was expected (relative error {:.2e} > {tol:.0e})",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1
    );
}

// --- test bodies ------------------------------------------------------------

fn rms_norm_parity(b: &impl Backend) {
    let mut rng = rng("rms_norm");
    // A SmolLM2-sized row, a ragged one and one wider than a block.
    for dim in [576, 37, 2500] {
        let rows = 5;
        let x = random(&mut rng, rows * dim, 3.0);
        let w = random(&mut rng, dim, 1.5);
        let got = b.rms_norm(&x, &w, 1e-5);
        assert_close(&format!("{} rms_norm dim {dim}", b.name()), &got, &Cpu.rms_norm(&x, &w, 1e-5), 1e-5);
    }
}

fn rope_parity(b: &impl Backend) {
    let mut rng = rng("rope");
    let (rows, heads, head_dim) = (7, 9, 64);
    let half = head_dim / 2;
    let x = random(&mut rng, rows * heads * head_dim, 2.0);
    // Real angles: position × inverse frequency, as the forward pass.
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..rows {
        for i in 0..half {
            let angle = (pos * 31) as f32 * 10_000f32.powf(-((2 * i) as f32) / head_dim as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let got = b.rope(&x, rows, head_dim, &cos, &sin);
    assert_close(&format!("{} rope", b.name()), &got, &Cpu.rope(&x, rows, head_dim, &cos, &sin), 1e-6);
}

fn silu_mul_parity(b: &impl Backend) {
    let mut rng = rng("silu_mul");
    let n = 3 * 1536 + 17;
    let (gate, up) = (random(&mut rng, n, 8.0), random(&mut rng, n, 2.0));
    let got = b.silu_mul(&gate, &up);
    assert_close(&format!("{} silu_mul", b.name()), &got, &Cpu.silu_mul(&gate, &up), 2e-6);
}

/// A paged pool with `seqs` sequences of `ctx` tokens each, on shuffled
/// pages (one spare page), random K and V in every layer.
struct Pool {
    geo: KvGeometry,
    data: Vec<f32>,
    tables: Vec<Vec<u32>>,
}

fn pool(rng: &mut StdRng, geo: KvGeometry, seqs: usize, ctx: usize) -> Pool {
    let per_seq = ctx.div_ceil(geo.page_tokens);
    let mut pages: Vec<u32> = (0..(seqs * per_seq + 1) as u32).collect();
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.random_range(0..=i));
    }
    let data = random(rng, pages.len() * geo.page_elems(), 1.5);
    let tables = pages.chunks(per_seq).take(seqs).map(<[u32]>::to_vec).collect();
    Pool { geo, data, tables }
}

/// Dense f64 attention of one query row over tokens `0..ctx` of a sequence.
fn dense<T: Kv>(p: &Pool, pool: &[T], layer: usize, table: &[u32], ctx: usize, q: &[f32], scale: f32) -> Vec<f32> {
    let (d, g) = (p.geo.head_dim, q.len() / p.geo.head_dim / p.geo.num_kv_heads);
    let mut out = vec![0f32; q.len()];
    for (h, qh) in q.chunks(d).enumerate() {
        let kvh = h / g;
        let offs: Vec<usize> = (0..ctx)
            .map(|t| p.geo.k_offset(table[t / p.geo.page_tokens] as usize, layer, t % p.geo.page_tokens) + kvh * d)
            .collect();
        let s: Vec<f64> = offs
            .iter()
            .map(|&o| qh.iter().zip(&pool[o..o + d]).map(|(a, k)| *a as f64 * k.to_f32() as f64).sum::<f64>())
            .map(|s| s * scale as f64)
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        let v_off = p.geo.page_tokens * p.geo.row_elems();
        for i in 0..d {
            let acc: f64 = e.iter().zip(&offs).map(|(w, &o)| w * pool[o + v_off + i].to_f32() as f64).sum();
            out[h * d + i] = (acc / z) as f32;
        }
    }
    out
}

fn decode_parity_with<T: Kv>(b: &impl Backend, to_kv: fn(f32) -> T) {
    let mut rng = rng("paged_decode");
    // GQA (12 query heads over 4 KV heads), head_dim 64, 16-token pages.
    let geo = KvGeometry { page_tokens: 16, num_layers: 3, num_kv_heads: 4, head_dim: 64 };
    let (heads, ctx_max) = (12, 200);
    let p = pool(&mut rng, geo, 4, ctx_max);
    let kv: Vec<T> = p.data.iter().map(|&v| to_kv(v)).collect();
    // Contexts: one token, a page and a tail, a split-K chunk and a tail, the lot.
    let ctxs = [1, 17, 65, 200];
    let rows: Vec<BatchRow<'_>> =
        ctxs.iter().zip(&p.tables).map(|(&c, t)| BatchRow { block_table: t, context_len: c }).collect();
    let q = random(&mut rng, rows.len() * heads * geo.head_dim, 2.0);
    let args = PagedArgs { geometry: geo, layer: 2, scale: 1.0 / (geo.head_dim as f32).sqrt() };
    let got = b.decode(&q, &kv, &args, &rows);
    let who = format!("{} paged_decode {}", b.name(), T::NAME);
    assert_close(&who, &got, &Cpu.decode(&q, &kv, &args, &rows), 2e-5);
    let qd = heads * geo.head_dim;
    for (r, row) in rows.iter().enumerate() {
        let want = dense(&p, &kv, args.layer, row.block_table, row.context_len, &q[r * qd..(r + 1) * qd], args.scale);
        assert_close(&format!("{who} row {r} vs dense"), &got[r * qd..(r + 1) * qd], &want, 2e-5);
    }
}

fn decode_parity(b: &impl Backend) {
    decode_parity_with::<f32>(b, |v| v);
    decode_parity_with::<bf16>(b, bf16::from_f32);
}

fn prefill_parity_with<T: Kv>(b: &impl Backend, to_kv: fn(f32) -> T) {
    let mut rng = rng("paged_prefill");
    let geo = KvGeometry { page_tokens: 16, num_layers: 2, num_kv_heads: 2, head_dim: 128 };
    let heads = 8;
    let p = pool(&mut rng, geo, 3, 150);
    let kv: Vec<T> = p.data.iter().map(|&v| to_kv(v)).collect();
    // A fresh prompt across query tiles, a chunk after a cached prefix that
    // ends mid-page, and a single new token (decode through prefill).
    let seqs = [
        PrefillSeq { block_table: &p.tables[0], cached_len: 0, q_len: 37 },
        PrefillSeq { block_table: &p.tables[1], cached_len: 83, q_len: 67 },
        PrefillSeq { block_table: &p.tables[2], cached_len: 120, q_len: 1 },
    ];
    let rows: usize = seqs.iter().map(|s| s.q_len).sum();
    let q = random(&mut rng, rows * heads * geo.head_dim, 2.0);
    let args = PagedArgs { geometry: geo, layer: 1, scale: 1.0 / (geo.head_dim as f32).sqrt() };
    let got = b.prefill(&q, &kv, &args, &seqs);
    let who = format!("{} paged_prefill {}", b.name(), T::NAME);
    assert_close(&who, &got, &Cpu.prefill(&q, &kv, &args, &seqs), 2e-5);
    let qd = heads * geo.head_dim;
    let mut r = 0;
    for s in &seqs {
        for i in [0, s.q_len / 2, s.q_len - 1] {
            let row = r + i;
            let ctx = s.cached_len + i + 1;
            let want = dense(&p, &kv, args.layer, s.block_table, ctx, &q[row * qd..(row + 1) * qd], args.scale);
            assert_close(&format!("{who} row {row} vs dense"), &got[row * qd..(row + 1) * qd], &want, 2e-5);
        }
        r += s.q_len;
    }
}

fn prefill_parity(b: &impl Backend) {
    prefill_parity_with::<f32>(b, |v| v);
    prefill_parity_with::<bf16>(b, bf16::from_f32);
}

fn linear_parity_with<T: Elem>(b: &impl Backend, tol: f32) {
    let mut rng = rng("linear");
    // Rows like a decode batch and a prefill chunk; a ragged inner size.
    for (rows, k, n) in [(3, 576, 1536), (67, 200, 96)] {
        let x: Vec<T> = random(&mut rng, rows * k, 1.0).into_iter().map(T::from_f32).collect();
        let w: Vec<T> = random(&mut rng, n * k, 0.1).into_iter().map(T::from_f32).collect();
        let got = b.linear(&x, &w, rows, k, n);
        let who = format!("{} linear {:?} {rows}×{k}·({n}×{k})ᵀ", b.name(), T::DTYPE);
        assert_close(&who, &got, &Cpu.linear(&x, &w, rows, k, n), tol);
    }
}

fn linear_parity(b: &impl Backend) {
    // f32 inputs may run as TF32 on tensor cores only if asked; they are
    // not, so f32 is tight. Half inputs are exact in f32, sums in f32.
    linear_parity_with::<f32>(b, 1e-4);
    linear_parity_with::<bf16>(b, 1e-4);
    linear_parity_with::<f16>(b, 1e-4);
}

// --- instantiations ---------------------------------------------------------

macro_rules! per_device {
    ($($body:ident),* $(,)?) => {
        mod cpu {
            $(#[test] fn $body() { super::$body(&super::Cpu); })*
        }
        mod cuda {
            $(#[test] fn $body() {
                if let Some(gpu) = super::Cuda::get() {
                    super::$body(gpu);
                }
            })*
        }
    };
}

per_device!(rms_norm_parity, rope_parity, silu_mul_parity, decode_parity, prefill_parity, linear_parity);
