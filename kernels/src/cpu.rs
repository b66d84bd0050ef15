//! Runtime CPU feature detection, done once.

use std::sync::OnceLock;

/// The SIMD level the kernels dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable code; also the oracle the SIMD kernels are tested against.
    Scalar,
    /// AVX2 + FMA (+ F16C), x86-64-v3.
    Avx2,
}

/// The best level this CPU supports, unless `TANDEM_SIMD=scalar` forces the
/// portable path (useful to compare, or to rule the SIMD code out).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var("TANDEM_SIMD").is_ok_and(|v| v.eq_ignore_ascii_case("scalar")) {
            return SimdLevel::Scalar;
        }
        detect()
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        SimdLevel::Avx2
    } else {
        SimdLevel::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}
