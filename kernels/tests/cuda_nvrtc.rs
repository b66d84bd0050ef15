//! The CUDA kernels compile: every source goes through NVRTC to PTX for
//! sm_80 (A100) and sm_90 (H100) and every entry point is in the PTX. NVRTC
//! needs no GPU and no driver, only libnvrtc: `scripts/setup.sh` installs
//! NVIDIA's wheel into `target/pyenv/nvrtc` (or set `TANDEM_NVRTC_LIB`, or
//! have a CUDA toolkit on the loader's path). Skips, saying why, only when
//! no libnvrtc can be found.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;
use tandem_kernels::cuda::nvrtc::{self, NVRTC_LIB_ENV};
use tandem_kernels::cuda::sources::{self, KernelSource};

/// Loads NVRTC, or says why the test cannot run.
fn nvrtc_or_skip() -> Option<String> {
    let explicit = std::env::var_os(NVRTC_LIB_ENV).map(PathBuf::from).or_else(common::setup_sh_nvrtc);
    let from = match explicit {
        Some(path) => match nvrtc::load_nvrtc_from(&path) {
            Ok(()) => path.display().to_string(),
            Err(e) => {
                println!("skipped: {e}");
                return None;
            }
        },
        None => "the loader's search path".to_string(),
    };
    match nvrtc::ensure_nvrtc() {
        Ok(()) => Some(from),
        Err(e) => {
            println!("skipped: {e} (run scripts/setup.sh to install it into target/pyenv/nvrtc)");
            None
        }
    }
}

/// ptxas turns a register spill into an error: the kernels keep their
/// per-lane accumulators in registers.
const NO_SPILLS: [&str; 4] = ["-Xptxas", "--warn-on-spills", "-Xptxas", "--warning-as-error"];

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let Some(from) = nvrtc_or_skip() else { return };
    let (major, minor) = nvrtc::nvrtc_version().expect("NVRTC loaded");
    let mut compiled = 0;
    // Real targets, so ptxas allocates registers and emits SASS as well.
    for (arch, target) in [("sm_80", ".target sm_80"), ("sm_90", ".target sm_90")] {
        for src in sources::ALL {
            let ptx =
                nvrtc::compile_with(&src, arch, &NO_SPILLS).unwrap_or_else(|e| panic!("{}: {e}", src.name)).to_src();
            assert!(ptx.contains(target), "{} for {arch}: no `{target}` in the PTX", src.name);
            for entry in src.entry_points {
                assert!(ptx.contains(&format!(".entry {entry}(")), "{} for {arch}: no entry {entry}", src.name);
            }
            compiled += 1;
        }
    }
    let entries: usize = sources::ALL.iter().map(|s| s.entry_points.len()).sum();
    println!(
        "NVRTC {major}.{minor} ({from}) compiled {compiled} programs ({} sources × sm_80, sm_90), \
         {entries} entry points per target, no register spills",
        sources::ALL.len()
    );
}

#[test]
fn the_virtual_target_the_backend_uses_compiles_too() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    for src in sources::ALL {
        let ptx = nvrtc::compile(&src, "compute_90").unwrap_or_else(|e| panic!("{}: {e}", src.name)).to_src();
        assert!(ptx.contains(".target sm_90"), "{}", src.name);
    }
}

#[test]
fn the_spill_check_bites() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    // 32 registers are far too few for the prefill kernel's accumulators.
    let mut opts = NO_SPILLS.to_vec();
    opts.push("--maxrregcount=32");
    let e = nvrtc::compile_with(&sources::PAGED_PREFILL, "sm_90", &opts).unwrap_err().to_string();
    assert!(e.contains("spilled"), "{e}");
}

#[test]
fn a_source_that_does_not_compile_is_an_error_with_the_log() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    let broken = KernelSource {
        name: "broken.cu",
        body: "extern \"C\" __global__ void tandem_broken() { undeclared_thing = 1; }",
        entry_points: &["tandem_broken"],
    };
    let e = nvrtc::compile(&broken, "compute_90").unwrap_err().to_string();
    assert!(e.contains("NVRTC could not compile broken.cu for compute_90"), "{e}");
    assert!(e.contains("undeclared_thing"), "the compiler's log is kept: {e}");
}
