//! Errors of the store's client and node runtime, classified so callers know
//! what to do: retry later (the master or a node is unreachable), fix the
//! request (invalid), or give up on that block (treat it as a miss).

use crate::transport::TransferError;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The master could not be reached or failed; retryable.
    #[error("kvstore master unavailable: {0}")]
    MasterUnavailable(String),
    /// The master refused the request as malformed; not retryable.
    #[error("kvstore request rejected: {0}")]
    Invalid(String),
    /// A data-plane transfer failed for the whole batch.
    #[error("kvstore transfer failed: {0}")]
    Transfer(#[from] TransferError),
    /// Bad configuration.
    #[error("kvstore config: {0}")]
    Config(String),
    /// Local I/O (segments, SSD tier) failed.
    #[error("kvstore io: {0}")]
    Io(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::MasterUnavailable(_) | StoreError::Transfer(_))
    }
}

impl From<tonic::Status> for StoreError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
                StoreError::Invalid(s.message().to_owned())
            }
            _ => StoreError::MasterUnavailable(format!("{}: {}", s.code(), s.message())),
        }
    }
}
