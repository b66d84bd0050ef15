//! The CUDA C sources of the kernels, each with the entry points it defines.
//! They are compiled at run time by NVRTC (see [`super::nvrtc`]), each
//! prefixed with `cu/common.cuh`, for the device's architecture.

/// One CUDA source file and its `extern "C"` kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// The file's name (also NVRTC's program name, so its log names it).
    pub name: &'static str,
    pub body: &'static str,
    pub entry_points: &'static [&'static str],
}

/// Included before every source: loads, warp sums, paged offsets.
pub const COMMON: &str = include_str!("cu/common.cuh");

pub const RMS_NORM: KernelSource =
    KernelSource { name: "rms_norm.cu", body: include_str!("cu/rms_norm.cu"), entry_points: &["tandem_rms_norm_f32"] };

pub const ROPE: KernelSource =
    KernelSource { name: "rope.cu", body: include_str!("cu/rope.cu"), entry_points: &["tandem_rope_f32"] };

pub const SWIGLU: KernelSource =
    KernelSource { name: "swiglu.cu", body: include_str!("cu/swiglu.cu"), entry_points: &["tandem_silu_mul_f32"] };

pub const PAGED_DECODE: KernelSource = KernelSource {
    name: "paged_decode.cu",
    body: include_str!("cu/paged_decode.cu"),
    entry_points: &["tandem_paged_decode_f32", "tandem_paged_decode_bf16"],
};

pub const PAGED_PREFILL: KernelSource = KernelSource {
    name: "paged_prefill.cu",
    body: include_str!("cu/paged_prefill.cu"),
    entry_points: &["tandem_paged_prefill_f32", "tandem_paged_prefill_bf16"],
};

/// Every kernel source.
pub const ALL: [KernelSource; 5] = [RMS_NORM, ROPE, SWIGLU, PAGED_DECODE, PAGED_PREFILL];

impl KernelSource {
    /// The text NVRTC compiles: the common prelude, then the body.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.name, self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_in_its_source() {
        for src in ALL {
            for entry in src.entry_points {
                // Either spelled out or instantiated through a macro.
                let direct = src.body.contains(&format!("void {entry}("));
                let via_macro = src.body.contains(&format!("({entry},"));
                assert!(direct || via_macro, "{} does not define {entry}", src.name);
            }
        }
    }

    #[test]
    fn entry_points_are_unique() {
        let mut all: Vec<&str> = ALL.iter().flat_map(|s| s.entry_points.iter().copied()).collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
