//! [`CudaGemm`]: the linear layers' `out = x · Wᵀ` through cuBLAS, with the
//! same shapes as the CPU [`crate::matmul`]: `x` is `rows × in` row-major,
//! `W` is `out × in` row-major (as the weights are stored), `out` is
//! `rows × out` row-major, f32. Inputs are f32, or bf16/f16 with f32
//! accumulation (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`).
//!
//! cuBLAS is column-major. A row-major `rows × out` result is the
//! column-major `out × rows` matrix `W · xᵀ`, where `W` read column-major
//! with leading dimension `in` is `Wᵀ` (so it is transposed back) and `x`
//! read column-major is `xᵀ` already: `C = op(A) · B` with `A = W`
//! transposed, `B = x`, `m = out`, `n = rows`, `k = in`.

use crate::KernelError;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
use half::{bf16, f16};
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// An input element type of [`CudaGemm::linear`].
pub trait GemmInput: DeviceRepr {
    const DATA_TYPE: cudaDataType_t;
}

impl GemmInput for f32 {
    const DATA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}

impl GemmInput for bf16 {
    const DATA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}

impl GemmInput for f16 {
    const DATA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16F;
}

/// The column-major cuBLAS call of a row-major `x · Wᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmDims {
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub lda: c_int,
    pub ldb: c_int,
    pub ldc: c_int,
}

/// Checks the lengths of `x` (`rows × in`), `W` (`out × in`) and the
/// result (`rows × out`), and gives cuBLAS's dimensions.
pub fn linear_dims(
    rows: usize,
    in_features: usize,
    out_features: usize,
    x_len: usize,
    w_len: usize,
    out_len: usize,
) -> Result<GemmDims, KernelError> {
    let int = |v: usize, what: &str| {
        c_int::try_from(v).map_err(|_| KernelError::Shape(format!("gemm: {what} = {v} exceeds cuBLAS's int")))
    };
    let want = |a: usize, b: usize| a.checked_mul(b);
    if rows == 0 || in_features == 0 || out_features == 0 {
        return Err(KernelError::Shape(format!(
            "gemm: empty product {rows}×{in_features} · ({out_features}×{in_features})ᵀ"
        )));
    }
    for (what, have, need) in [
        ("x", x_len, want(rows, in_features)),
        ("W", w_len, want(out_features, in_features)),
        ("out", out_len, want(rows, out_features)),
    ] {
        if need != Some(have) {
            return Err(KernelError::Shape(format!(
                "gemm: {what} has {have} elements for {rows} rows × {in_features} in × {out_features} out"
            )));
        }
    }
    let (m, n, k) = (int(out_features, "out")?, int(rows, "rows")?, int(in_features, "in")?);
    Ok(GemmDims { m, n, k, lda: k, ldb: k, ldc: m })
}

/// cuBLAS on one stream.
#[derive(Debug)]
pub struct CudaGemm {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

impl CudaGemm {
    /// A cuBLAS handle on `stream`; an error (no panic) without libcublas.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        ensure_cublas()?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Unavailable(format!("cuBLAS handle creation failed: {e:?}")))?;
        Ok(Self { blas, stream })
    }

    /// `out = x · Wᵀ` for `x` of `rows × in_features` and `w` of
    /// `out_features × in_features`, f32 accumulation and output.
    pub fn linear<T: GemmInput>(
        &self,
        x: &CudaView<'_, T>,
        w: &CudaView<'_, T>,
        (rows, in_features, out_features): (usize, usize, usize),
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<(), KernelError> {
        let d = linear_dims(rows, in_features, out_features, x.len(), w.len(), out.len())?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _a_sync) = w.device_ptr(&self.stream);
        let (b, _b_sync) = x.device_ptr(&self.stream);
        let (c, _c_sync) = out.device_ptr_mut(&self.stream);
        // SAFETY: A (W) holds m × k, B (x) n × k and C (out) n × m elements
        // of the declared types (checked by `linear_dims`); the scalars are
        // host f32 as `CUBLAS_COMPUTE_32F` wants in the default pointer mode;
        // the device pointers stay valid while their sync guards live.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                d.m,
                d.n,
                d.k,
                (&alpha) as *const f32 as *const c_void,
                a as *const c_void,
                T::DATA_TYPE,
                d.lda,
                b as *const c_void,
                T::DATA_TYPE,
                d.ldb,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                d.ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Unavailable(format!("cublasGemmEx failed: {e:?}")))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// Checks that libcublas can be loaded, so that cuBLAS calls do not panic.
pub fn ensure_cublas() -> Result<(), KernelError> {
    // SAFETY: only tries to dlopen cudarc's candidate names; no cuBLAS
    // function is called.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Ok(());
    }
    Err(KernelError::Unavailable("cuBLAS not found (libcublas.so.12); install CUDA's cuBLAS".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_major_x_times_w_transposed_maps_to_column_major_cublas() {
        // 3 rows of 4 inputs, 5 outputs.
        let d = linear_dims(3, 4, 5, 12, 20, 15).unwrap();
        assert_eq!(d, GemmDims { m: 5, n: 3, k: 4, lda: 4, ldb: 4, ldc: 5 });
    }

    #[test]
    fn lengths_that_do_not_fit_are_shape_errors() {
        assert!(linear_dims(3, 4, 5, 11, 20, 15).is_err(), "x");
        assert!(linear_dims(3, 4, 5, 12, 21, 15).is_err(), "W");
        assert!(linear_dims(3, 4, 5, 12, 20, 16).is_err(), "out");
        assert!(linear_dims(0, 4, 5, 0, 20, 0).is_err(), "empty");
        let huge = 1usize << 31;
        assert!(linear_dims(1, huge, 1, huge, huge, 1).is_err(), "beyond int");
        assert!(linear_dims(usize::MAX, 2, 1, 0, 2, 0).is_err(), "overflow");
    }
}
