//! Open-time reconciliation of the SSD tier's index with its block files.
//!
//! A crash can leave: a temp file (died mid-write), a block file with no
//! index entry (died between rename and index put, or between the old entry's
//! delete and the rename of a replacement), or an index entry whose file is
//! missing or the wrong size (a file lost or truncated behind our back).
//! Reconciliation keeps only entries whose file has exactly the padded size,
//! and deletes every file no kept entry owns.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

use tandem_proto::BlockKey;
use tracing::{debug, info, warn};

use super::block_io::padded_len;
use super::error::SsdError;
use super::index::{Index, IndexRecord};
use super::{block_file_name, BLOCKS_DIR, TEMP_SUFFIX};

/// What reconciliation found and fixed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ReconcileReport {
    /// Entries kept.
    pub kept: usize,
    /// Entries dropped because their file was missing.
    pub missing_files: usize,
    /// Entries dropped (and files deleted) because the file had the wrong size.
    pub wrong_size: usize,
    /// Entries dropped because their key or value did not decode.
    pub undecodable: usize,
    /// Block files deleted because no entry owned them.
    pub orphans: usize,
    /// Temp files of interrupted writes deleted.
    pub temps: usize,
    /// Entries in the blocks directory left alone because they are not ours.
    pub foreign: usize,
}

impl ReconcileReport {
    fn changed_anything(&self) -> bool {
        self.missing_files + self.wrong_size + self.undecodable + self.orphans + self.temps > 0
    }
}

/// The key of a block file named `name` (a file name inside the blocks
/// directory), if it is one; the exact inverse of [`block_file_name`].
pub(crate) fn parse_block_file_name(name: &str) -> Option<BlockKey> {
    let hex = name.strip_suffix(".blk")?;
    if hex.len() != 16 {
        return None;
    }
    let key = BlockKey(u64::from_str_radix(hex, 16).ok()?);
    (block_file_name(key) == format!("{BLOCKS_DIR}/{name}")).then_some(key)
}

/// Brings `index` and the files under `blocks_dir` into agreement and
/// returns the surviving entries.
pub(crate) fn reconcile(
    blocks_dir: &Path,
    index: &Index,
) -> Result<(HashMap<BlockKey, IndexRecord>, ReconcileReport), SsdError> {
    let mut report = ReconcileReport::default();
    let mut files = scan_blocks_dir(blocks_dir, &mut report)?;
    let scan = index.scan()?;
    report.undecodable = scan.undecodable.len();
    let mut drop_keys = scan.undecodable;
    let mut kept = HashMap::with_capacity(scan.records.len());

    for (key, record) in scan.records {
        let path = blocks_dir.join(file_name(key));
        match files.remove(&key) {
            None => {
                debug!(key = format_args!("{:016x}", key.0), path = %path.display(), "ssd: index entry without a file; dropped");
                report.missing_files += 1;
                drop_keys.push(Index::raw_key(key));
            }
            Some(size) if Some(size) != padded_len(record.len) => {
                debug!(
                    key = format_args!("{:016x}", key.0),
                    path = %path.display(),
                    size,
                    len = record.len,
                    "ssd: block file has the wrong size; dropped"
                );
                report.wrong_size += 1;
                drop_keys.push(Index::raw_key(key));
                remove_file(&path)?;
            }
            Some(_) => {
                kept.insert(key, record);
            }
        }
    }
    // Drop index entries before deleting orphans: either order is safe to
    // crash in, since the next open redoes what is left.
    index.delete_raw(&drop_keys)?;
    for key in files.into_keys() {
        let path = blocks_dir.join(file_name(key));
        debug!(key = format_args!("{:016x}", key.0), path = %path.display(), "ssd: orphan block file; deleted");
        report.orphans += 1;
        remove_file(&path)?;
    }
    report.kept = kept.len();
    if report.changed_anything() {
        warn!(dir = %blocks_dir.display(), ?report, "ssd: reconciled index with block files");
    } else {
        info!(dir = %blocks_dir.display(), entries = report.kept, "ssd: index and block files agree");
    }
    Ok((kept, report))
}

/// The file name (inside the blocks directory) of `key`'s block.
fn file_name(key: BlockKey) -> String {
    let name = block_file_name(key);
    match name.strip_prefix(BLOCKS_DIR).and_then(|rest| rest.strip_prefix('/')) {
        Some(rest) => rest.to_string(),
        None => name,
    }
}

/// Block files by key with their sizes; deletes temp files on the way.
fn scan_blocks_dir(blocks_dir: &Path, report: &mut ReconcileReport) -> Result<HashMap<BlockKey, u64>, SsdError> {
    let dir_err = |op, source| SsdError::Dir { op, path: blocks_dir.to_path_buf(), source };
    let mut files = HashMap::new();
    for entry in fs::read_dir(blocks_dir).map_err(|e| dir_err("read dir", e))? {
        let entry = entry.map_err(|e| dir_err("read dir", e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| SsdError::Dir { op: "stat", path: path.clone(), source: e })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            report.foreign += 1;
            warn!(path = %path.display(), "ssd: unexpected file in blocks dir; left alone");
            continue;
        };
        let is_temp = name.strip_suffix(TEMP_SUFFIX).and_then(parse_block_file_name).is_some();
        if is_temp && !file_type.is_dir() {
            debug!(path = %path.display(), "ssd: temp file of an interrupted write; deleted");
            report.temps += 1;
            remove_file(&path)?;
            continue;
        }
        match parse_block_file_name(name) {
            Some(key) if file_type.is_file() => {
                let size = entry.metadata().map_err(|e| SsdError::Dir { op: "stat", path: path.clone(), source: e })?;
                files.insert(key, size.len());
            }
            _ => {
                report.foreign += 1;
                warn!(path = %path.display(), "ssd: unexpected entry in blocks dir; left alone");
            }
        }
    }
    Ok(files)
}

fn remove_file(path: &Path) -> Result<(), SsdError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SsdError::Dir { op: "remove", path: path.to_path_buf(), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_file_names_parse_back_to_their_key() {
        for key in [0, 1, 0xdead_beef, u64::MAX] {
            let key = BlockKey(key);
            let name = file_name(key);
            assert_eq!(parse_block_file_name(&name), Some(key), "{name}");
        }
        for bad in ["", ".blk", "00000000000000ff.tmp", "ff.blk", "00000000000000FF.blk", "+000000000000000f.blk"] {
            assert_eq!(parse_block_file_name(bad), None, "{bad}");
        }
    }
}
