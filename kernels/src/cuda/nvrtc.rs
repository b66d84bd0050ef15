//! NVRTC: finding the library without panicking, and compiling the kernel
//! sources to PTX for a device's architecture. NVRTC needs no GPU and no
//! driver, so the compile check runs on any machine that has the library
//! (kernels/tests/cuda_nvrtc.rs).
//!
//! cudarc looks libnvrtc up by name (`libnvrtc.so`, `libnvrtc.so.12`, …) and
//! panics when it finds none, so every entry point here checks first. A
//! library outside the loader's search path can be named with
//! [`NVRTC_LIB_ENV`] or loaded with [`load_nvrtc_from`]: once it is mapped,
//! the loader answers cudarc's by-name lookup with it (its soname matches).

use super::launch::defines;
use super::sources::KernelSource;
use super::{loader_error, no_panic};
use crate::KernelError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Names libnvrtc (a path) when it is not on the loader's search path.
pub const NVRTC_LIB_ENV: &str = "TANDEM_NVRTC_LIB";

/// The soname cudarc's CUDA 12 bindings look for.
const NVRTC_SONAME: &str = "libnvrtc.so.12";

/// PTX targets, newest first, by the compute capability they need. A newer
/// device takes the newest (PTX is JIT-compiled forward by the driver).
const ARCHES: [((i32, i32), &str); 6] = [
    ((9, 0), "compute_90"),
    ((8, 9), "compute_89"),
    ((8, 6), "compute_86"),
    ((8, 0), "compute_80"),
    ((7, 5), "compute_75"),
    ((7, 0), "compute_70"),
];

/// The PTX target for a device of compute capability `major.minor`.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str, KernelError> {
    ARCHES.iter().find(|(cc, _)| *cc <= (major, minor)).map(|(_, arch)| *arch).ok_or_else(|| {
        KernelError::Unavailable(format!("CUDA compute capability {major}.{minor} is older than 7.0 (Volta)"))
    })
}

/// Loads libnvrtc from `path` and keeps it loaded for the life of the
/// process, so that the CUDA calls find it.
pub fn load_nvrtc_from(path: &Path) -> Result<(), KernelError> {
    static LOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());
    // SAFETY: loading libnvrtc runs its ELF initialisers only, which have no
    // preconditions; the handle is kept until exit, so nothing it maps is
    // ever unmapped under cudarc.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        KernelError::Unavailable(format!("NVRTC not found at {}: {}", path.display(), loader_error(&e)))
    })?;
    LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(lib);
    Ok(())
}

/// Checks that libnvrtc can be loaded (from [`NVRTC_LIB_ENV`] if set, else
/// by name), so that the calls after this one do not panic.
pub fn ensure_nvrtc() -> Result<(), KernelError> {
    static FROM_ENV: OnceLock<Result<(), String>> = OnceLock::new();
    let from_env = FROM_ENV.get_or_init(|| match std::env::var_os(NVRTC_LIB_ENV) {
        Some(path) => load_nvrtc_from(Path::new(&path)).map_err(|e| format!("{e} (from {NVRTC_LIB_ENV})")),
        None => Ok(()),
    });
    if let Err(e) = from_env {
        return Err(KernelError::Unavailable(e.clone()));
    }
    // SAFETY: only tries to dlopen cudarc's candidate names (and drops what
    // it opened); no NVRTC function is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    // SAFETY: as `load_nvrtc_from`; the handle is dropped at once, only the
    // loader's reason is kept.
    let why = match unsafe { libloading::Library::new(NVRTC_SONAME) } {
        Ok(_) => "found by soname but not under any name cudarc tries".to_string(),
        Err(e) => loader_error(&e),
    };
    Err(KernelError::Unavailable(format!(
        "NVRTC not found ({NVRTC_SONAME}): {why}; install CUDA's NVRTC or set {NVRTC_LIB_ENV} to its path"
    )))
}

/// NVRTC's version, as `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked above) and both pointers are
    // valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| KernelError::Unavailable(format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// The NVRTC options of every kernel: the sizes from `launch`, C++17,
/// line info for profilers. Floating point stays IEEE (no fast math), so
/// the parity tests' tolerances hold.
pub fn options(arch: &'static str, name: &str) -> CompileOptions {
    let mut options = defines();
    options.push("--std=c++17".into());
    options.push("--generate-line-info".into());
    CompileOptions { arch: Some(arch), options, name: Some(name.into()), ..Default::default() }
}

/// Compiles `source` to PTX for `arch`: a virtual target (`compute_90`)
/// gives PTX only; a real one (`sm_90`) also runs ptxas, so register
/// allocation and SASS generation are checked too.
pub fn compile(source: &KernelSource, arch: &'static str) -> Result<Ptx, KernelError> {
    compile_with(source, arch, &[])
}

/// [`compile`] with extra NVRTC options (e.g. ptxas flags for checks).
pub fn compile_with(source: &KernelSource, arch: &'static str, extra: &[&str]) -> Result<Ptx, KernelError> {
    ensure_nvrtc()?;
    let text = source.full_source();
    let mut opts = options(arch, source.name);
    opts.options.extend(extra.iter().map(|o| o.to_string()));
    let compiled = no_panic("NVRTC", move || compile_ptx_with_opts(text, opts))?;
    compiled.map_err(|e| {
        let detail = match e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        KernelError::Unavailable(format!("NVRTC could not compile {} for {arch}: {detail}", source.name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_round_down_to_a_known_target() {
        assert_eq!(arch_for(9, 0).unwrap(), "compute_90");
        assert_eq!(arch_for(12, 0).unwrap(), "compute_90", "newer devices JIT the newest PTX");
        assert_eq!(arch_for(8, 7).unwrap(), "compute_86");
        assert_eq!(arch_for(8, 0).unwrap(), "compute_80");
        assert_eq!(arch_for(7, 2).unwrap(), "compute_70");
        let e = arch_for(6, 1).unwrap_err().to_string();
        assert!(e.contains("6.1"), "{e}");
    }

    #[test]
    fn options_carry_the_sizes_and_the_target() {
        let o = options("compute_80", "x.cu");
        assert_eq!(o.arch, Some("compute_80"));
        assert!(o.options.iter().any(|s| s.starts_with("-DTANDEM_MAX_HEAD_DIM=")));
        assert_eq!(o.use_fast_math, None);
    }

    #[test]
    fn nvrtc_is_found_or_the_error_says_what_is_missing() {
        // Unit tests never load NVRTC by path, so this is the machine's own.
        match ensure_nvrtc() {
            Ok(()) => assert!(nvrtc_version().is_ok()),
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("NVRTC not found (libnvrtc.so.12): "), "{e}");
                assert!(e.contains(NVRTC_LIB_ENV), "{e}");
            }
        }
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let e = load_nvrtc_from(Path::new("/nonexistent/libnvrtc.so.12")).unwrap_err().to_string();
        assert!(e.contains("NVRTC not found at /nonexistent"), "{e}");
    }
}
