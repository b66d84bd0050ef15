//! Compute device selection. The CPU is always there; CUDA exists only in
//! builds with feature `cuda`, and asking for it otherwise is a clear error.

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

#[cfg(not(feature = "cuda"))]
fn cuda_available(_ordinal: usize) -> Result<(), KernelError> {
    Err(KernelError::Unavailable(
        "this build of tandem was not compiled with CUDA (rebuild with `--features cuda`)".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_available(ordinal: usize) -> Result<(), KernelError> {
    Err(KernelError::Unavailable(format!(
        "CUDA device {ordinal}: the CUDA kernels are not part of this build yet; use --device cpu"
    )))
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

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = ensure_available(Device::Cuda(0)).unwrap_err().to_string();
        assert!(e.contains("not compiled with CUDA"), "{e}");
    }
}
