//! The SSD tier's rocksdb index: block key → (length, checksum).
//!
//! Keys are the block key as 8 big-endian bytes (so iteration is in key
//! order). Values are `[version = 1][len: u64 LE][checksum: u64 LE]`.
//! The index entry is the commit point of a block: a block file without one
//! is an orphan and is deleted when the tier opens.

use std::path::{Path, PathBuf};

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};
use tandem_proto::BlockKey;

use super::error::SsdError;
use crate::checksum::BlockChecksum;

const VALUE_VERSION: u8 = 1;
const VALUE_LEN: usize = 17;

/// What the index records for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    pub len: u64,
    pub checksum: BlockChecksum,
}

impl IndexRecord {
    pub fn encode(self) -> [u8; VALUE_LEN] {
        let mut out = [0u8; VALUE_LEN];
        out[0] = VALUE_VERSION;
        out[1..9].copy_from_slice(&self.len.to_le_bytes());
        out[9..17].copy_from_slice(&self.checksum.0.to_le_bytes());
        out
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        let value: &[u8; VALUE_LEN] = value.try_into().ok()?;
        if value[0] != VALUE_VERSION {
            return None;
        }
        let len = u64::from_le_bytes(value[1..9].try_into().ok()?);
        let checksum = u64::from_le_bytes(value[9..17].try_into().ok()?);
        Some(IndexRecord { len, checksum: BlockChecksum(checksum) })
    }
}

fn encode_key(key: BlockKey) -> [u8; 8] {
    key.0.to_be_bytes()
}

fn decode_key(raw: &[u8]) -> Option<BlockKey> {
    Some(BlockKey(u64::from_be_bytes(raw.try_into().ok()?)))
}

/// Everything the index holds, split into decodable records and raw keys of
/// entries that do not decode (to be dropped).
#[derive(Debug, Default)]
pub(crate) struct IndexScan {
    pub records: Vec<(BlockKey, IndexRecord)>,
    pub undecodable: Vec<Box<[u8]>>,
}

/// Handle to the rocksdb index.
pub(crate) struct Index {
    db: DB,
    path: PathBuf,
    write_opts: WriteOptions,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Index {
    /// Opens (creating if missing) the index at `path`. With `sync`, every
    /// update is synced to the WAL before it returns.
    pub fn open(path: &Path, sync: bool) -> Result<Self, SsdError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Small values, one entry per block: keep rocksdb's footprint modest.
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(4);
        let db = DB::open(&opts, path).map_err(|e| index_error("open", None, path, e))?;
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(sync);
        Ok(Index { db, path: path.to_path_buf(), write_opts })
    }

    pub fn put(&self, key: BlockKey, record: IndexRecord) -> Result<(), SsdError> {
        self.db
            .put_opt(encode_key(key), record.encode(), &self.write_opts)
            .map_err(|e| index_error("put", Some(key), &self.path, e))
    }

    pub fn delete(&self, key: BlockKey) -> Result<(), SsdError> {
        self.db
            .delete_opt(encode_key(key), &self.write_opts)
            .map_err(|e| index_error("delete", Some(key), &self.path, e))
    }

    /// Deletes many raw keys in one (synced) batch.
    pub fn delete_raw(&self, raw_keys: &[Box<[u8]>]) -> Result<(), SsdError> {
        if raw_keys.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for raw in raw_keys {
            batch.delete(raw);
        }
        self.db.write_opt(batch, &self.write_opts).map_err(|e| index_error("batch delete", None, &self.path, e))
    }

    /// Reads every entry.
    pub fn scan(&self) -> Result<IndexScan, SsdError> {
        let mut scan = IndexScan::default();
        for item in self.db.iterator(IteratorMode::Start) {
            let (raw_key, raw_value) = item.map_err(|e| index_error("scan", None, &self.path, e))?;
            match (decode_key(&raw_key), IndexRecord::decode(&raw_value)) {
                (Some(key), Some(record)) => scan.records.push((key, record)),
                _ => scan.undecodable.push(raw_key),
            }
        }
        Ok(scan)
    }

    /// Encodes `key` as the index does, for callers that drop entries in bulk.
    pub fn raw_key(key: BlockKey) -> Box<[u8]> {
        Box::new(encode_key(key))
    }
}

fn index_error(op: &'static str, key: Option<BlockKey>, path: &Path, err: rocksdb::Error) -> SsdError {
    SsdError::Index { op, key, path: path.to_path_buf(), message: err.into_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let record = IndexRecord { len: 4097, checksum: BlockChecksum(0xdead_beef_0123_4567) };
        assert_eq!(IndexRecord::decode(&record.encode()), Some(record));
        let mut wrong_version = record.encode();
        wrong_version[0] = 9;
        assert_eq!(IndexRecord::decode(&wrong_version), None);
        assert_eq!(IndexRecord::decode(&record.encode()[..16]), None);
        assert_eq!(decode_key(&encode_key(BlockKey(42))), Some(BlockKey(42)));
        assert_eq!(decode_key(&[1, 2, 3]), None);
    }

    #[test]
    fn scan_separates_undecodable_entries() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let index = Index::open(&dir.path().join("index"), false)?;
        let record = IndexRecord { len: 10, checksum: BlockChecksum(7) };
        index.put(BlockKey(2), record)?;
        index.put(BlockKey(1), record)?;
        index.db.put(b"junk", b"x")?;
        let scan = index.scan()?;
        assert_eq!(scan.records, vec![(BlockKey(1), record), (BlockKey(2), record)]);
        assert_eq!(scan.undecodable, vec![Box::from(&b"junk"[..])]);
        index.delete_raw(&scan.undecodable)?;
        index.delete(BlockKey(1))?;
        let scan = index.scan()?;
        assert_eq!(scan.records, vec![(BlockKey(2), record)]);
        assert!(scan.undecodable.is_empty());
        Ok(())
    }
}
