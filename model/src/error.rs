//! The model crate's error type: what went wrong and whether retrying helps.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read (missing, permissions…).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file (config, safetensors, GGUF, tokenizer) is malformed.
    #[error("invalid model file {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// A configuration value is missing or out of range.
    #[error("invalid model config: {0}")]
    Config(String),
    /// The model uses something this engine does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Bad input from the caller (token ids out of range, prompt too long…).
    #[error("invalid request: {0}")]
    Request(String),
    /// Out of KV cache pages.
    #[error("KV cache is full: need {needed} pages, {free} free")]
    CacheFull { needed: usize, free: usize },
    /// Fetching a model failed.
    #[error("fetch failed: {0}")]
    Fetch(String),
    #[error(transparent)]
    Kernel(#[from] tandem_kernels::KernelError),
}

impl ModelError {
    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ModelError::Format { path: path.into(), reason: reason.into() }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
