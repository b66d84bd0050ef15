//! Helpers for Tandem's end-to-end tests: locating the repository's
//! fixtures and the `tandem` binary, and running it as a real process.

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fixtures directory copied from Hugging Face references.
pub fn fixtures() -> PathBuf {
    repo_root().join("fixtures")
}
