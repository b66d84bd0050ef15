//! Element types of weight matrices and their block layouts.
//!
//! Quantized types follow the GGUF/ggml on-disk layout exactly, so a GGUF
//! tensor is used in place (memory-mapped) without conversion.

use crate::KernelError;

/// The storage type of a weight matrix. Rows are stored contiguously, each
/// row a whole number of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 weights: f16 scale `d`, 32 × i8. `w = d * q`.
    Q8_0,
    /// 32 weights: f16 scale `d`, 16 bytes of nibbles. `w = d * (q - 8)`.
    Q4_0,
    /// 32 weights: f16 `d`, f16 `m`, 16 bytes of nibbles. `w = d * q + m`.
    Q4_1,
    /// 256-weight super-blocks with 6-bit sub-block scales and mins.
    Q4_K,
    /// 256-weight super-blocks, 6-bit quants, 8-bit sub-block scales.
    Q6_K,
}

impl DType {
    /// Number of weights in one block.
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
            DType::Q4_K | DType::Q6_K => 256,
        }
    }

    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q4_K => 144,
            DType::Q6_K => 210,
        }
    }

    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes of a row of `cols` weights; an error when `cols` is not a whole
    /// number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize, KernelError> {
        if !cols.is_multiple_of(self.block_elems()) {
            return Err(KernelError::Shape(format!(
                "{self:?} rows must be a multiple of {} weights, got {cols}",
                self.block_elems()
            )));
        }
        (cols / self.block_elems())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| KernelError::Shape(format!("row of {cols} {self:?} weights overflows")))
    }

    /// The ggml type id used in GGUF files, and back.
    pub const fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4_K => 12,
            DType::Q6_K => 14,
            DType::BF16 => 30,
        }
    }

    pub fn from_ggml_type(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            12 => DType::Q4_K,
            14 => DType::Q6_K,
            30 => DType::BF16,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}
