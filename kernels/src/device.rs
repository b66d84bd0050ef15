//! Compute device selection. The CPU is always there; CUDA exists only in
//! builds with feature `cuda`, and asking for it otherwise is a clear error.
//!
//! With `cuda`, probing never panics (cudarc panics when a CUDA library is
//! missing at its first use, so every library is looked for first): no
//! driver, an ordinal past the device count, a context that cannot be made,
//! or no NVRTC or cuBLAS each give [`KernelError::Unavailable`] saying which.
//! [`resolve`] lets a caller fall back to the CPU and say why.

use crate::KernelError;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(KernelError::Unavailable(format!("unknown device '{s}' (use cpu, cuda or cuda:N)"))),
            },
        }
    }
}

/// Checks that `device` can be used by this build on this machine.
pub fn ensure_available(device: Device) -> Result<(), KernelError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(i) => cuda_available(i),
    }
}

/// The device to run on: `requested` when it is available; otherwise the
/// CPU with the reason when `fallback_to_cpu`, else the error.
pub fn resolve(requested: Device, fallback_to_cpu: bool) -> Result<(Device, Option<String>), KernelError> {
    match ensure_available(requested) {
        Ok(()) => Ok((requested, None)),
        Err(e) if fallback_to_cpu && requested != Device::Cpu => Ok((Device::Cpu, Some(e.to_string()))),
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_available(_ordinal: usize) -> Result<(), KernelError> {
    Err(KernelError::Unavailable(
        "this build of tandem was not compiled with CUDA (rebuild with `--features cuda`)".into(),
    ))
}

/// Everything the CUDA backend needs: the driver, the device, a context on
/// it, NVRTC (the kernels are compiled at run time) and cuBLAS.
#[cfg(feature = "cuda")]
fn cuda_available(ordinal: usize) -> Result<(), KernelError> {
    cuda_context(ordinal)?;
    crate::cuda::nvrtc::ensure_nvrtc()?;
    crate::cuda::gemm::ensure_cublas()
}

#[cfg(feature = "cuda")]
pub use cuda_probe::{cuda_context, cuda_device_count, ensure_driver};

#[cfg(feature = "cuda")]
mod cuda_probe {
    use crate::cuda::{driver_err, loader_error, no_panic};
    use crate::KernelError;
    use cudarc::driver::CudaContext;
    use std::sync::Arc;

    /// The names the driver library goes by (cudarc tries these among others).
    const DRIVER_NAMES: [&str; 2] = ["libcuda.so", "libcuda.so.1"];

    /// Checks that the CUDA driver library can be loaded, so that driver
    /// calls do not panic.
    pub fn ensure_driver() -> Result<(), KernelError> {
        // SAFETY: only tries to dlopen cudarc's candidate names; no driver
        // function is called.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return Ok(());
        }
        // cudarc says only yes or no; the loader says why.
        let mut why = String::new();
        for name in DRIVER_NAMES {
            // SAFETY: loading libcuda runs its ELF initialisers only; the
            // handle is dropped at once (only the loader's error is kept).
            match unsafe { libloading::Library::new(name) } {
                Ok(_) => why = format!("{name} loads but not under any name cudarc tries"),
                Err(e) => why = loader_error(&e),
            }
        }
        Err(KernelError::Unavailable(format!("no CUDA driver found (libcuda.so): {why}")))
    }

    /// The number of CUDA devices the driver sees.
    pub fn cuda_device_count() -> Result<usize, KernelError> {
        ensure_driver()?;
        let count = no_panic("CUDA device count", CudaContext::device_count)?
            .map_err(|e| KernelError::Unavailable(format!("CUDA driver found but unusable: {e:?}")))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    pub(crate) fn missing_device(ordinal: usize, count: usize) -> KernelError {
        KernelError::Unavailable(format!("CUDA device {ordinal} not present ({count} devices)"))
    }

    /// A context on CUDA device `ordinal` (its primary context, bound to
    /// the calling thread).
    pub fn cuda_context(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
        let count = cuda_device_count()?;
        if ordinal >= count {
            return Err(missing_device(ordinal, count));
        }
        no_panic("CUDA context creation", || CudaContext::new(ordinal))?.map_err(driver_err("context creation"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_rejects_garbage() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("tpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
        assert!(ensure_available(Device::Cpu).is_ok());
    }

    #[test]
    fn the_cpu_resolves_to_itself() {
        assert_eq!(resolve(Device::Cpu, false).unwrap(), (Device::Cpu, None));
        assert_eq!(resolve(Device::Cpu, true).unwrap(), (Device::Cpu, None));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = ensure_available(Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("not compiled with CUDA"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_falls_back_to_the_cpu_when_asked() {
        let (device, why) = resolve(Device::Cuda(0), true).unwrap();
        assert_eq!(device, Device::Cpu);
        assert!(why.is_some_and(|w| w.contains("not compiled with CUDA")));
        assert!(resolve(Device::Cuda(0), false).unwrap_err().to_string().contains("not compiled with CUDA"));
    }

    /// Runs here (no driver) and on GPU machines alike: whatever the
    /// machine has, probing answers without panicking, and the answer
    /// agrees with what the driver probe found.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_probing_is_clear_and_never_panics() {
        match ensure_driver() {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("no CUDA driver found (libcuda.so): "), "{msg}");
                assert!(msg.len() > "no CUDA driver found (libcuda.so): ".len(), "the loader's reason is kept");
                for device in [Device::Cuda(0), Device::Cuda(3)] {
                    let e = ensure_available(device).unwrap_err().to_string();
                    assert_eq!(e, msg);
                    let (fell_back, why) = resolve(device, true).unwrap();
                    assert_eq!((fell_back, why.as_deref()), (Device::Cpu, Some(msg.as_str())));
                    assert_eq!(resolve(device, false).unwrap_err().to_string(), msg);
                }
                println!("no CUDA driver here (as expected without a GPU): {msg}");
            }
            Ok(()) => match cuda_device_count() {
                Ok(n) => {
                    let e = ensure_available(Device::Cuda(n + 2)).unwrap_err().to_string();
                    assert_eq!(e, format!("CUDA device {} not present ({n} devices)", n + 2));
                    let (d, why) = resolve(Device::Cuda(n + 2), true).unwrap();
                    assert_eq!((d, why), (Device::Cpu, Some(e)));
                }
                Err(e) => assert!(e.to_string().contains("CUDA driver found but unusable"), "{e}"),
            },
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn a_missing_device_names_the_ordinal_and_the_count() {
        let e = cuda_probe::missing_device(3, 2).to_string();
        assert_eq!(e, "CUDA device 3 not present (2 devices)");
    }
}
