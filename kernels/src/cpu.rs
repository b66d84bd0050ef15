//! Runtime CPU feature detection, done once.

use std::sync::OnceLock;

/// The SIMD level the kernels dispatch on. Levels are ordered: a CPU with
/// one level runs every kernel of the levels below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable code; also the oracle the SIMD kernels are tested against.
    Scalar,
    /// AVX2 + FMA (+ F16C), x86-64-v3.
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL and VNNI (x86-64-v4 + VNNI: Ice Lake,
    /// Zen 4 and later). Kernels without an AVX-512 version run their AVX2
    /// code at this level.
    Avx512,
}

/// The best level this CPU supports, unless `TANDEM_SIMD=scalar` or
/// `TANDEM_SIMD=avx2` caps it (useful to compare, or to rule the SIMD code
/// out).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("TANDEM_SIMD") {
            Ok(v) if v.eq_ignore_ascii_case("scalar") => SimdLevel::Scalar,
            Ok(v) if v.eq_ignore_ascii_case("avx2") => SimdLevel::Avx2,
            _ => SimdLevel::Avx512,
        };
        detect().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> SimdLevel {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    match (avx2, avx512) {
        (true, true) => SimdLevel::Avx512,
        (true, false) => SimdLevel::Avx2,
        _ => SimdLevel::Scalar,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> SimdLevel {
    SimdLevel::Scalar
}
