//! What the CUDA tests share.

use std::path::{Path, PathBuf};

/// Where `scripts/setup.sh` puts the NVRTC wheel's library:
/// `target/pyenv/nvrtc/lib/python3.*/site-packages/nvidia/cuda_nvrtc/lib/`.
pub fn setup_sh_nvrtc() -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join("target/pyenv/nvrtc/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
        .find(|p| p.is_file())
}
