//! Weight matrices and matrix products `out = x · Wᵀ`.
//!
//! A [`WeightMatrix`] is `rows × cols` weights of one [`DType`], row-major,
//! borrowed from wherever the loader found them (usually a memory map).
//! [`matmul`] multiplies `m` activation rows by it without ever
//! dequantizing the whole matrix.

use crate::quant::dequantize_row;
use crate::{DType, KernelError, SharedBytes};
use rayon::prelude::*;

/// How a product may trade accuracy for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Weights dequantized exactly to f32, f32 products and sums. The path
    /// the reference tests use.
    Exact,
    /// Activations may be quantized (as llama.cpp does) for integer dot
    /// products on quantized weights.
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
            return Err(KernelError::Shape(format!(
                "{rows}×{cols} {dtype} needs {want} bytes, got {}",
                data.len()
            )));
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

    /// Row `r` as f32 (embedding lookups, tests).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        dequantize_row(self.dtype, self.row_bytes(r), out);
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
/// row-major); `out` is `m × rows`.
pub fn matmul(w: &WeightMatrix, x: &[f32], m: usize, out: &mut [f32], precision: Precision) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x is not m×cols");
    assert_eq!(out.len(), m * n, "matmul: out is not m×rows");
    let _ = precision;
    // Rows of W in parallel; each thread dequantizes one row at a time and
    // dots it with every activation row, so W is read once per call.
    let cols: Vec<(usize, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map_init(
            || vec![0f32; k],
            |row, j| {
                dequantize_row(w.dtype, w.row_bytes(j), row);
                (j, (0..m).map(|i| dot(&x[i * k..(i + 1) * k], row)).collect())
            },
        )
        .collect();
    for (j, vals) in cols {
        for (i, v) in vals.into_iter().enumerate() {
            out[i * n + j] = v;
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
