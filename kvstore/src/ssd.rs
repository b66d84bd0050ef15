//! The SSD tier of a storage node.

use tandem_proto::BlockKey;

/// Path of `key`'s block file, relative to the SSD tier's directory. The
/// file's first `len` bytes are the block (it may be padded after them).
/// Same-host readers (the shm transport) open it directly.
pub fn block_file_name(key: BlockKey) -> String {
    format!("blocks/{:016x}.blk", key.0)
}
