//! Errors of the SSD tier.

use std::io;
use std::path::PathBuf;

use tandem_proto::BlockKey;

/// Why an SSD tier operation failed.
///
/// What the caller should do: [`SsdError::NotFound`] and [`SsdError::Corrupt`]
/// are misses (fetch the block elsewhere); [`SsdError::Full`] asks the caller
/// to evict and retry; [`SsdError::DiskFull`] and [`SsdError::Io`] are disk
/// faults (the tier is left consistent, the write did not happen); the rest
/// are caller bugs or configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    /// The tier holds no block under this key.
    #[error("ssd block {:016x} not found ({})", .key.0, .path.display())]
    NotFound { key: BlockKey, path: PathBuf },

    /// The block file no longer matches its checksum. The entry has been
    /// dropped, so later reads return [`SsdError::NotFound`].
    #[error("ssd block {:016x} is corrupt: checksum mismatch in {}; entry dropped", .key.0, .path.display())]
    Corrupt { key: BlockKey, path: PathBuf },

    /// Writing the block would exceed the tier's capacity. `needed` is the
    /// on-disk bytes the write adds (beyond what an existing copy of the key
    /// already holds); `free` is what is unreserved now. Evict and retry.
    #[error("ssd tier full: block {:016x} needs {needed} more bytes on disk, {free} free", .key.0)]
    Full { key: BlockKey, needed: u64, free: u64 },

    /// The block is larger than the tier's configured maximum block size.
    #[error("ssd block {:016x} is {len} bytes, over the {max} byte maximum", .key.0)]
    TooLarge { key: BlockKey, len: u64, max: u64 },

    /// The destination buffer's length differs from the stored block's.
    #[error("ssd block {:016x} is {stored} bytes but the destination buffer is {requested}", .key.0)]
    LenMismatch { key: BlockKey, stored: u64, requested: u64 },

    /// The filesystem ran out of space (ENOSPC) while writing the block. No
    /// entry or partial file was left behind.
    #[error("disk full writing ssd block {:016x} to {}", .key.0, .path.display())]
    DiskFull { key: BlockKey, path: PathBuf },

    /// A disk I/O error on one block's file.
    #[error("ssd block {:016x}: {op} {} failed: {source}", .key.0, .path.display())]
    Io {
        key: BlockKey,
        /// What was being done (`"write"`, `"read"`, `"rename"`, ...).
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A disk I/O error on the tier's directories (opening, reconciling).
    #[error("ssd tier: {op} {} failed: {source}", .path.display())]
    Dir {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The rocksdb index failed. `key` is set when one block was concerned.
    #[error("ssd index {}: {op}{} failed: {message}", .path.display(), key_suffix(.key))]
    Index { op: &'static str, key: Option<BlockKey>, path: PathBuf, message: String },

    /// The tier's options are unusable.
    #[error("invalid ssd tier options: {0}")]
    InvalidOptions(String),
}

impl SsdError {
    /// Whether the error is a miss: the block is not (or no longer) on this
    /// tier and should be fetched from another copy.
    pub fn is_miss(&self) -> bool {
        matches!(self, SsdError::NotFound { .. } | SsdError::Corrupt { .. })
    }

    /// Whether the error is a disk fault (out of space or an I/O error), as
    /// opposed to a miss, a full tier or a caller error.
    pub fn is_disk_fault(&self) -> bool {
        matches!(self, SsdError::DiskFull { .. } | SsdError::Io { .. } | SsdError::Dir { .. } | SsdError::Index { .. })
    }

    /// The error for an I/O failure on `key`'s file, mapping ENOSPC to
    /// [`SsdError::DiskFull`].
    pub(crate) fn block_io(key: BlockKey, op: &'static str, path: PathBuf, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            SsdError::DiskFull { key, path }
        } else {
            SsdError::Io { key, op, path, source }
        }
    }
}

fn key_suffix(key: &Option<BlockKey>) -> String {
    key.map(|key| format!(" of block {:016x}", key.0)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_key_in_hex_and_the_path() {
        let err = SsdError::Corrupt { key: BlockKey(0xabc), path: PathBuf::from("/ssd/blocks/x.blk") };
        let msg = err.to_string();
        assert!(msg.contains("0000000000000abc"), "{msg}");
        assert!(msg.contains("/ssd/blocks/x.blk"), "{msg}");
        assert!(err.is_miss());

        let err = SsdError::Index {
            op: "put",
            key: Some(BlockKey(0xff)),
            path: PathBuf::from("/ssd/index"),
            message: "boom".into(),
        };
        let msg = err.to_string();
        assert!(msg.contains("put of block 00000000000000ff"), "{msg}");
        assert!(err.is_disk_fault());
    }

    #[test]
    fn enospc_maps_to_disk_full() {
        let err =
            SsdError::block_io(BlockKey(1), "write", PathBuf::from("p"), io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(err, SsdError::DiskFull { .. }));
        let err = SsdError::block_io(BlockKey(1), "write", PathBuf::from("p"), io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(err, SsdError::Io { op: "write", .. }));
    }
}
