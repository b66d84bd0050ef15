//! Weight matrices and matrix products `out = x · Wᵀ`.
//!
//! A [`WeightMatrix`] is `rows × cols` weights of one [`DType`], row-major,
//! borrowed from wherever the loader found them (usually a memory map).
//! [`matmul`] multiplies `m` activation rows by it without ever
//! dequantizing the whole matrix.
//!
//! - `exact` — weights dequantized exactly to f32 panels, f32 FMA
//!   microkernels ([`Precision::Exact`], and every float dtype).
//! - `fast` — activations quantized per 32 to i16, integer dot products on
//!   unpacked weight panels ([`Precision::Fast`] on Q8_0/Q4_0/Q4_1/Q4_K).
//!
//! Both tile the product (several activation rows × several weight rows per
//! microkernel call, column chunks over the rayon pool) but give every output
//! element the same operation sequence, so results never depend on `m`, on
//! neighbouring rows or on the thread count.

mod exact;
mod fast;
#[cfg(test)]
mod tests;

use crate::cpu::SimdLevel;
use crate::quant::dequantize_row_with;
use crate::{DType, KernelError, SharedBytes};
use rayon::prelude::*;
use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::Range;
use std::thread::LocalKey;

/// How a product may trade accuracy for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Weights dequantized exactly to f32, f32 products and sums. The path
    /// the reference tests use.
    Exact,
    /// Activations quantized to 16 bits per 32-block (scale + exact block
    /// sum) for integer dot products on quantized weights: logits within
    /// ~0.02 of Exact, where llama.cpp's 8-bit activations drift by ~1.
    #[default]
    Fast,
}

/// `rows × cols` weights, row-major, rows a whole number of blocks.
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    dtype: DType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: SharedBytes,
}

impl WeightMatrix {
    /// Validates that `data` holds exactly `rows` rows of `cols` weights.
    pub fn new(dtype: DType, rows: usize, cols: usize, data: SharedBytes) -> Result<Self, KernelError> {
        let row_bytes = dtype.row_bytes(cols)?;
        let want = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| KernelError::Shape(format!("{rows}×{cols} {dtype} overflows")))?;
        if data.len() != want {
            return Err(KernelError::Shape(format!("{rows}×{cols} {dtype} needs {want} bytes, got {}", data.len())));
        }
        Ok(Self { dtype, rows, cols, row_bytes, data })
    }

    /// An owned f32 matrix (tests, small tensors).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<Self, KernelError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(DType::F32, rows, cols, SharedBytes::from_vec(bytes))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The raw bytes of row `r`.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let start = r * self.row_bytes;
        &self.data.as_slice()[start..start + self.row_bytes]
    }

    /// All rows' bytes, `rows × row_stride()`.
    fn data(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Bytes per row.
    fn row_stride(&self) -> usize {
        self.row_bytes
    }

    /// Row `r` as f32 (embedding lookups, tests).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        dequantize_row_with(crate::cpu::simd_level(), self.dtype, self.row_bytes(r), out);
    }

    /// A new owned matrix made of the given rows, in that order (used to undo
    /// GGUF's Q/K row permutation). Quantized rows move whole, so nothing is
    /// re-quantized.
    pub fn gather_rows(&self, order: &[usize]) -> Result<Self, KernelError> {
        let mut bytes = Vec::with_capacity(order.len() * self.row_bytes);
        for &r in order {
            if r >= self.rows {
                return Err(KernelError::Shape(format!("row {r} out of {}", self.rows)));
            }
            bytes.extend_from_slice(self.row_bytes(r));
        }
        Self::new(self.dtype, order.len(), self.cols, SharedBytes::from_vec(bytes))
    }
}

/// `out[i][j] = Σ_k x[i][k] · W[j][k]` for `m` rows of `x` (`m × cols`,
/// row-major); `out` is `m × rows`. Runs on the global rayon pool when the
/// product is big enough to pay for it.
///
/// Row `i` of `out` is bit-identical whatever `m`, the other rows of `x` and
/// the thread count are: every output element is computed by the same
/// sequence of floating-point operations however the work is tiled.
pub fn matmul(w: &WeightMatrix, x: &[f32], m: usize, out: &mut [f32], precision: Precision) {
    matmul_with(crate::cpu::simd_level(), w, x, m, out, precision);
}

/// [`matmul`] at a given SIMD level (tests compare the levels; a level above
/// what the CPU supports is lowered to the detected one).
pub fn matmul_with(level: SimdLevel, w: &WeightMatrix, x: &[f32], m: usize, out: &mut [f32], precision: Precision) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x is not m×cols");
    assert_eq!(out.len(), m * n, "matmul: out is not m×rows");
    let level = level.min(crate::cpu::simd_level());
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr { ptr: out.as_mut_ptr(), n, _out: PhantomData };
    if precision == Precision::Fast && fast::supports(w.dtype) {
        fast::matmul(level, w, x, m, out);
    } else {
        exact::matmul(level, w, x, m, out);
    }
}

/// The output matrix (`m × n`, row-major) shared by the workers of one
/// product, each of which writes only its own columns.
#[derive(Clone, Copy)]
struct OutPtr<'a> {
    ptr: *mut f32,
    n: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: workers write disjoint columns (see `write`), and the borrow of the
// output outlives the parallel section, so sharing the pointer is sound.
unsafe impl Send for OutPtr<'_> {}
// SAFETY: as above.
unsafe impl Sync for OutPtr<'_> {}

impl OutPtr<'_> {
    /// # Safety
    /// `(i, j)` lies inside the `m × n` output, and no other thread accesses
    /// column `j` during this product.
    #[inline]
    unsafe fn write(self, i: usize, j: usize, v: f32) {
        // SAFETY: in bounds and unshared, per the caller.
        unsafe { *self.ptr.add(i * self.n + j) = v }
    }
}

/// Products below this many multiply-adds run on the calling thread. A fork
/// from a pool thread costs about a microsecond (the model runs each layer
/// as a pool job), so a decode step's K and V projections (110 k
/// multiply-adds, ~6 µs) are worth splitting; from outside the pool a
/// product pays a hand-over and a wake-up, a few microseconds.
const PARALLEL_MIN_MACS: usize = 1 << 16;
/// Column chunks per thread, for load balance.
const CHUNKS_PER_THREAD: usize = 4;

/// Runs `f` over disjoint column ranges covering `0..n`, each a multiple of
/// `panel` wide except the last, in parallel when the product is large.
fn for_each_column_chunk(n: usize, m: usize, k: usize, panel: usize, f: impl Fn(Range<usize>) + Sync) {
    let threads = rayon::current_num_threads();
    let panels = n.div_ceil(panel);
    let macs = m.saturating_mul(n).saturating_mul(k);
    if threads <= 1 || panels <= 1 || macs < PARALLEL_MIN_MACS {
        return f(0..n);
    }
    let chunks = panels.min(threads * CHUNKS_PER_THREAD);
    let width = panels.div_ceil(chunks) * panel;
    (0..n.div_ceil(width)).into_par_iter().for_each(|c| f(c * width..((c + 1) * width).min(n)));
}

/// Takes a scratch value out of a thread-local slot and puts it back after
/// `f` (re-entrant, unlike a `RefCell` borrow: a nested call on the same
/// thread just starts from an empty value).
fn with_scratch<T: Default + 'static, R>(slot: &'static LocalKey<Cell<T>>, f: impl FnOnce(&mut T) -> R) -> R {
    let mut value = slot.take();
    let r = f(&mut value);
    slot.set(value);
    r
}
