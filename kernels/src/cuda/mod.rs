//! The CUDA backend (feature `cuda`): kernels written in CUDA C, compiled
//! at run time by NVRTC for the device at hand, launched through cudarc,
//! and cuBLAS for the matrix products. Every CUDA library is loaded at run
//! time, so building needs no CUDA toolkit, and a machine without one gets
//! a clear [`KernelError::Unavailable`], never a panic.
//!
//! - [`sources`] — the CUDA C sources (`cu/*.cu`, `cu/common.cuh`) and
//!   their entry points: RMSNorm, RoPE, SwiGLU, paged decode attention,
//!   chunked causal prefill attention over paged KV (f32 and bf16 KV).
//! - [`launch`] — grid/block/shared-memory sizes and the host-side checks of
//!   every input, as plain functions tested on the CPU.
//! - [`nvrtc`] — loading NVRTC and compiling the sources to PTX.
//! - [`kernels`] — [`CudaKernels`]: the compiled modules of one device and
//!   a launch method per kernel.
//! - [`gemm`] — [`CudaGemm`]: `x · Wᵀ` through cuBLAS (f32, and bf16/f16
//!   inputs with f32 accumulation and output).
//!
//! Device discovery (driver present, ordinal in range, context) lives in
//! [`crate::device`].

pub mod gemm;
pub mod kernels;
pub mod launch;
pub mod nvrtc;
pub mod sources;

pub use cudarc;
pub use gemm::CudaGemm;
pub use kernels::CudaKernels;
pub use launch::PrefillSeq;

use crate::KernelError;

/// Runs `f`, turning a panic inside it (cudarc panics when a library or a
/// symbol is missing) into [`KernelError::Unavailable`].
pub(crate) fn no_panic<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, KernelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        KernelError::Unavailable(format!("{what} failed: {msg}"))
    })
}

/// The loader's whole reason for refusing a library (libloading's own
/// message is only "dlopen failed"; the dlerror text is its source).
pub(crate) fn loader_error(e: &libloading::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

/// Maps a driver error of `what` to [`KernelError::Unavailable`].
pub(crate) fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Unavailable(format!("CUDA {what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_errors() {
        let e = no_panic("probe", || -> u32 { panic!("Unable to dynamically load") }).unwrap_err();
        assert!(e.to_string().contains("probe failed: Unable to dynamically load"), "{e}");
        assert_eq!(no_panic("probe", || 7).unwrap(), 7);
    }
}
