//! Compute primitives for Tandem's model engine.
//!
//! - [`bytes`] — shared immutable byte ranges (weights stay memory-mapped).
//! - [`dtype`] — weight element types and ggml block layouts.
//! - [`quant`] — scalar (de)quantization, the oracle for the SIMD kernels.
//! - [`linear`] — weight matrices and `x · Wᵀ` products (exact f32 and fast
//!   quantized paths, multi-threaded, SIMD with runtime dispatch).
//! - [`ops`] — RMSNorm, RoPE, SwiGLU, softmax.
//! - [`attention`] — paged decode attention and chunked causal prefill
//!   attention over paged KV.
//! - [`cpu`] — runtime CPU feature detection.
//! - [`device`] — the compute device selection; CUDA behind feature `cuda`.
//! - `cuda` (feature `cuda`) — the CUDA backend: NVRTC-compiled kernels
//!   (RMSNorm, RoPE, SwiGLU, paged decode and prefill attention) and cuBLAS.

pub mod attention;
pub mod bytes;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod linear;
pub mod ops;
pub mod quant;

pub use bytes::SharedBytes;
pub use dtype::DType;
pub use linear::{matmul, Precision, WeightMatrix};

/// Errors of the kernel layer: shapes that do not fit, or a backend that is
/// not available.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("shape error: {0}")]
    Shape(String),
    #[error("{0}")]
    Unavailable(String),
}
