//! The SSD tier of a storage node.
//!
//! A node-local store of whole blocks on disk: the master demotes blocks here
//! from DRAM, and they are read back on an SSD hit or a promotion. Contents
//! survive a restart of the process.
//!
//! # On-disk layout
//!
//! ```text
//! dir/
//!   blocks/<key as 16 hex digits>.blk      one block; see block_file_name
//!   blocks/<key as 16 hex digits>.blk.tmp  a write in progress
//!   index/                                 rocksdb: key -> (len, checksum)
//! ```
//!
//! A block file's first `len` bytes are the block, zero-padded to a multiple
//! of [`BLOCK_ALIGN`]; its size is exactly the padded length. Files are
//! written with `O_DIRECT` from 4 KiB-aligned buffers (buffered + `fdatasync`
//! where the filesystem refuses `O_DIRECT`).
//!
//! # Crash safety
//!
//! The index entry is the commit point. A write goes temp file → data sync →
//! (when replacing, delete the old entry) → rename to the real name → sync
//! of the blocks directory → index put; a removal unlinks the file, then
//! deletes the entry. (The syncs are skipped with [`SsdOptions::sync`] off,
//! which keeps crash safety for process crashes but not for power loss.) Whatever a crash
//! leaves half done, [`SsdTier::open`] reconciles: entries whose file is
//! missing or the wrong size are dropped, files without an entry and temp
//! files are deleted. A name never holds a half-written block, and an entry
//! never describes bytes other than its file's (the checksum, verified on
//! every read, backs this up against faults below the filesystem).
//!
//! # Concurrency
//!
//! [`SsdTier`] is `Send + Sync` and every method takes `&self`. The map of
//! entries and the byte accounting sit under one short lock that is never
//! held across disk I/O; mutations of the same key are serialised by a
//! per-key lock, so reads and writes of different keys run in parallel.

mod block_io;
mod error;
mod index;
mod key_lock;
mod reconcile;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tandem_proto::BlockKey;
use tracing::{info, warn};

pub use self::block_io::BLOCK_ALIGN;
use self::block_io::{padded_len, read_block_file, write_block_file, WriteMode};
pub use self::error::SsdError;
use self::index::{Index, IndexRecord};
use self::key_lock::KeyLocks;
use crate::checksum::BlockChecksum;

/// Path of `key`'s block file, relative to the SSD tier's directory. The
/// file's first `len` bytes are the block (it may be padded after them).
/// Same-host readers (the shm transport) open it directly.
pub fn block_file_name(key: BlockKey) -> String {
    format!("blocks/{:016x}.blk", key.0)
}

/// The directory of block files, relative to the tier's directory; the
/// prefix of every [`block_file_name`].
pub(crate) const BLOCKS_DIR: &str = "blocks";
/// The rocksdb index, relative to the tier's directory.
const INDEX_DIR: &str = "index";
/// Appended to a block file's name while it is being written.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// Default for [`SsdOptions::max_block_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BLOCK_BYTES: u64 = 64 << 20;
/// Upper bound on [`SsdOptions::max_block_bytes`], keeping padded lengths
/// and accounting far from overflow.
const MAX_BLOCK_BYTES_LIMIT: u64 = 1 << 40;

/// How to open an [`SsdTier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SsdOptions {
    /// Bytes of block files (padded to [`BLOCK_ALIGN`]) the tier may hold.
    pub capacity_bytes: u64,
    /// Largest block accepted by [`SsdTier::write`].
    pub max_block_bytes: u64,
    /// Write block files with `O_DIRECT` (falling back to buffered writes if
    /// the filesystem refuses it).
    pub direct_io: bool,
    /// Sync each block file's data and each index update before a write or
    /// removal returns, so they also survive power loss; without it they
    /// survive a process crash only.
    pub sync: bool,
}

impl SsdOptions {
    /// The defaults for a tier of `capacity_bytes`: 64 MiB maximum block,
    /// `O_DIRECT`, synced writes.
    pub fn new(capacity_bytes: u64) -> Self {
        SsdOptions { capacity_bytes, max_block_bytes: DEFAULT_MAX_BLOCK_BYTES, direct_io: true, sync: true }
    }

    /// Checks the options are usable.
    pub fn validate(&self) -> Result<(), SsdError> {
        if self.max_block_bytes == 0 || self.max_block_bytes > MAX_BLOCK_BYTES_LIMIT {
            return Err(SsdError::InvalidOptions(format!(
                "max_block_bytes must be in 1..={MAX_BLOCK_BYTES_LIMIT}, got {}",
                self.max_block_bytes
            )));
        }
        Ok(())
    }
}

/// One block held by the SSD tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SsdEntry {
    pub key: BlockKey,
    /// The block's length in bytes (its file is padded beyond this).
    pub len: u64,
    /// Checksum of the block's bytes, verified on every read.
    pub checksum: BlockChecksum,
}

impl SsdEntry {
    /// Bytes the block's file takes on disk (and against the capacity).
    pub fn disk_bytes(&self) -> u64 {
        disk_bytes(self.len)
    }
}

/// What went wrong on a tier since it was opened (a storage node reports
/// these with its stats).
#[derive(Debug, Default)]
pub struct SsdCounters {
    /// Reads that found a block's file damaged (checksum mismatch, or
    /// shorter than the block): the entry was dropped, the read a miss.
    pub corrupt_blocks: AtomicU64,
    /// Reads that found a block's file gone: the entry was dropped.
    pub missing_blocks: AtomicU64,
    /// Writes that failed on a disk fault (I/O error, index failure, or
    /// the filesystem out of space); nothing of them was kept.
    pub write_failures: AtomicU64,
    /// Of `write_failures`, those that ran out of space (ENOSPC).
    pub disk_full: AtomicU64,
}

impl SsdCounters {
    /// `(name, value)` of each counter, as a storage node reports them in
    /// its `NodeStats` counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("ssd_corrupt_blocks", self.corrupt_blocks.load(Ordering::Relaxed)),
            ("ssd_missing_blocks", self.missing_blocks.load(Ordering::Relaxed)),
            ("ssd_write_failures", self.write_failures.load(Ordering::Relaxed)),
            ("ssd_disk_full", self.disk_full.load(Ordering::Relaxed)),
        ]
    }
}

/// A node's SSD tier: block files under `dir/blocks/`, indexed by rocksdb at
/// `dir/index`. See the [module docs](self) for layout, crash safety and
/// concurrency.
pub struct SsdTier {
    dir: PathBuf,
    /// `dir/blocks`.
    blocks_dir: PathBuf,
    options: SsdOptions,
    index: Index,
    state: Mutex<State>,
    key_locks: KeyLocks,
    /// Cleared, once, when the filesystem rejects `O_DIRECT`.
    direct_io: AtomicBool,
    counters: SsdCounters,
}

/// Entries and accounting, under [`SsdTier::state`]'s short lock.
#[derive(Debug, Default)]
struct State {
    entries: HashMap<BlockKey, IndexRecord>,
    /// Padded bytes of committed entries.
    used_bytes: u64,
    /// Padded bytes promised to writes in flight.
    reserved_bytes: u64,
}

impl std::fmt::Debug for SsdTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock();
        f.debug_struct("SsdTier")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .field("entries", &state.entries.len())
            .field("used_bytes", &state.used_bytes)
            .field("reserved_bytes", &state.reserved_bytes)
            .field("direct_io", &self.direct_io.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SsdTier {
    /// Opens (creating if needed) the tier at `dir` with `capacity_bytes` and
    /// default [`SsdOptions`]. Reconciles the index with the block files
    /// first; see the [module docs](self).
    pub fn open(dir: &Path, capacity_bytes: u64) -> Result<SsdTier, SsdError> {
        Self::open_with(dir, SsdOptions::new(capacity_bytes))
    }

    /// Opens (creating if needed) the tier at `dir` with `options`.
    pub fn open_with(dir: &Path, options: SsdOptions) -> Result<SsdTier, SsdError> {
        options.validate()?;
        let blocks_dir = dir.join(BLOCKS_DIR);
        fs::create_dir_all(&blocks_dir).map_err(|source| SsdError::Dir {
            op: "create",
            path: blocks_dir.clone(),
            source,
        })?;
        let index = Index::open(&dir.join(INDEX_DIR), options.sync)?;
        let (entries, _report) = reconcile::reconcile(&blocks_dir, &index)?;
        let used_bytes = entries.values().map(|record| disk_bytes(record.len)).sum::<u64>();
        if used_bytes > options.capacity_bytes {
            warn!(
                dir = %dir.display(),
                used_bytes,
                capacity_bytes = options.capacity_bytes,
                "ssd: tier holds more than its capacity; writes fail with Full until blocks are removed"
            );
        }
        info!(
            dir = %dir.display(),
            entries = entries.len(),
            used_bytes,
            capacity_bytes = options.capacity_bytes,
            "ssd: tier open"
        );
        Ok(SsdTier {
            dir: dir.to_path_buf(),
            blocks_dir,
            direct_io: AtomicBool::new(options.direct_io),
            options,
            index,
            state: Mutex::new(State { entries, used_bytes, reserved_bytes: 0 }),
            key_locks: KeyLocks::default(),
            counters: SsdCounters::default(),
        })
    }

    /// Stores `bytes` under `key`, replacing any block already there.
    ///
    /// Fails with [`SsdError::TooLarge`] over the maximum block size and
    /// [`SsdError::Full`] when the padded size does not fit (the caller
    /// evicts and retries). A failed write leaves no file and no entry for
    /// the new bytes, and the accounting unchanged; when replacing, a failure
    /// before the new file is complete keeps the old block, while a (rare)
    /// failure after it drops the old block too.
    pub fn write(&self, key: BlockKey, bytes: &[u8], checksum: BlockChecksum) -> Result<(), SsdError> {
        let result = self.write_block(key, bytes, checksum);
        if let Err(err) = &result {
            if err.is_disk_fault() {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                if matches!(err, SsdError::DiskFull { .. }) {
                    self.counters.disk_full.fetch_add(1, Ordering::Relaxed);
                }
                warn!(error = %err, "ssd: block not stored (disk fault)");
            }
        }
        result
    }

    fn write_block(&self, key: BlockKey, bytes: &[u8], checksum: BlockChecksum) -> Result<(), SsdError> {
        let len = bytes.len() as u64;
        let max = self.options.max_block_bytes;
        let too_large = || SsdError::TooLarge { key, len, max };
        if len > max {
            return Err(too_large());
        }
        let new_disk_bytes = padded_len(len).ok_or_else(too_large)?;
        let _key_guard = self.key_locks.lock(key);
        let reservation = self.reserve(key, new_disk_bytes)?;

        let path = self.block_path(key);
        let temp = self.temp_path(key);
        self.write_temp(key, &temp, bytes)?;

        // The key lock keeps the old entry, if any, from changing under us.
        let replacing = self.state.lock().entries.contains_key(&key);
        if replacing {
            // The old entry goes before its file is replaced, so a crash from
            // here on leaves an orphan file, never an entry for other bytes.
            if let Err(err) = self.index.delete(key) {
                remove_quietly(&temp);
                return Err(err);
            }
        }
        if let Err(source) = fs::rename(&temp, &path) {
            remove_quietly(&temp);
            if replacing {
                // The old entry is gone from the index; its file goes too.
                remove_quietly(&path);
                self.forget(key, &path);
            }
            return Err(SsdError::block_io(key, "rename", temp, source));
        }
        if self.options.sync {
            // Make the rename durable before the entry that names its bytes.
            if let Err(source) = sync_dir(&self.blocks_dir) {
                remove_quietly(&path);
                self.forget(key, &path);
                return Err(SsdError::block_io(key, "sync dir", self.blocks_dir.clone(), source));
            }
        }
        let record = IndexRecord { len, checksum };
        if let Err(err) = self.index.put(key, record) {
            remove_quietly(&path);
            self.forget(key, &path);
            return Err(err);
        }
        self.commit(reservation, key, record);
        Ok(())
    }

    /// Reads `key`'s block into `dst`, whose length must equal the block's,
    /// and verifies its checksum.
    ///
    /// Fails with [`SsdError::NotFound`] if the tier does not hold `key`, and
    /// with [`SsdError::Corrupt`] if the bytes do not match the checksum (the
    /// entry is then dropped, so the block is not served again). On error the
    /// contents of `dst` are unspecified.
    pub fn read_into(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), SsdError> {
        let path = self.block_path(key);
        // Fast path: no key lock, so reads never wait on each other.
        let record = self.record_for_read(key, &path, dst.len())?;
        match read_block_file(&path, dst) {
            Ok(()) if record.checksum.verify(dst) => return Ok(()),
            // A mismatch, a short or a vanished file may be a replacement or
            // removal racing with us: look again with writers held off.
            Ok(()) => {}
            Err(err) if matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof) => {}
            Err(source) => return Err(SsdError::block_io(key, "read", path, source)),
        }

        let _key_guard = self.key_locks.lock(key);
        let record = self.record_for_read(key, &path, dst.len())?;
        match read_block_file(&path, dst) {
            Ok(()) if record.checksum.verify(dst) => Ok(()),
            Ok(()) => {
                self.counters.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                self.drop_damaged(key, &path, "checksum mismatch");
                Err(SsdError::Corrupt { key, path })
            }
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                self.counters.corrupt_blocks.fetch_add(1, Ordering::Relaxed);
                self.drop_damaged(key, &path, "file shorter than the block");
                Err(SsdError::Corrupt { key, path })
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                self.counters.missing_blocks.fetch_add(1, Ordering::Relaxed);
                self.drop_damaged(key, &path, "file missing");
                Err(SsdError::NotFound { key, path })
            }
            Err(source) => Err(SsdError::block_io(key, "read", path, source)),
        }
    }

    /// Removes `key`'s block; `Ok(false)` if the tier did not hold it.
    pub fn remove(&self, key: BlockKey) -> Result<bool, SsdError> {
        let _key_guard = self.key_locks.lock(key);
        if !self.contains(key) {
            return Ok(false);
        }
        let path = self.block_path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SsdError::block_io(key, "remove", path, source)),
        }
        // With the file gone the block is gone: an index entry left behind by
        // a failed delete names a missing file and is dropped at open.
        self.forget(key, &path);
        Ok(true)
    }

    /// Whether the tier holds `key`.
    pub fn contains(&self, key: BlockKey) -> bool {
        self.state.lock().entries.contains_key(&key)
    }

    /// The tier's entry for `key`, if it holds one.
    pub fn entry(&self, key: BlockKey) -> Option<SsdEntry> {
        let record = self.state.lock().entries.get(&key).copied()?;
        Some(SsdEntry { key, len: record.len, checksum: record.checksum })
    }

    /// Every entry, in key order (reported to the master at registration).
    pub fn list(&self) -> Vec<SsdEntry> {
        let mut entries: Vec<SsdEntry> = self
            .state
            .lock()
            .entries
            .iter()
            .map(|(&key, record)| SsdEntry { key, len: record.len, checksum: record.checksum })
            .collect();
        entries.sort_unstable_by_key(|entry| entry.key);
        entries
    }

    /// Padded on-disk bytes of the blocks held (writes in flight excluded).
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used_bytes
    }

    /// The tier's capacity in padded on-disk bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.options.capacity_bytes
    }

    /// Bytes a new write may take now: capacity less held and reserved bytes.
    pub fn free_bytes(&self) -> u64 {
        let state = self.state.lock();
        self.options.capacity_bytes.saturating_sub(state.used_bytes + state.reserved_bytes)
    }

    /// The largest block [`SsdTier::write`] accepts.
    pub fn max_block_bytes(&self) -> u64 {
        self.options.max_block_bytes
    }

    /// Number of blocks held.
    pub fn len(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// Whether the tier holds no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Faults seen since the tier was opened.
    pub fn counters(&self) -> &SsdCounters {
        &self.counters
    }

    /// The tier's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Absolute path of `key`'s block file (`dir` + [`block_file_name`]).
    pub fn block_path(&self, key: BlockKey) -> PathBuf {
        self.dir.join(block_file_name(key))
    }

    /// Whether block files are being written with `O_DIRECT` (false if
    /// disabled, or once the filesystem has rejected it).
    pub fn direct_io_active(&self) -> bool {
        self.direct_io.load(Ordering::Relaxed)
    }

    fn temp_path(&self, key: BlockKey) -> PathBuf {
        let mut path = self.block_path(key).into_os_string();
        path.push(TEMP_SUFFIX);
        PathBuf::from(path)
    }

    /// Reserves room for `new_disk_bytes` of `key`, counting the bytes an
    /// existing copy of `key` frees when it is replaced. The caller holds the
    /// key lock, so that copy stays put until commit.
    fn reserve(&self, key: BlockKey, new_disk_bytes: u64) -> Result<Reservation<'_>, SsdError> {
        let mut state = self.state.lock();
        let old_disk_bytes = state.entries.get(&key).map_or(0, |record| disk_bytes(record.len));
        let needed = new_disk_bytes.saturating_sub(old_disk_bytes);
        let free = self.options.capacity_bytes.saturating_sub(state.used_bytes + state.reserved_bytes);
        if needed > free {
            return Err(SsdError::Full { key, needed, free });
        }
        state.reserved_bytes += needed;
        Ok(Reservation { state: &self.state, bytes: needed })
    }

    /// Makes a written block visible: replaces any old entry and turns the
    /// reservation into used bytes.
    fn commit(&self, mut reservation: Reservation<'_>, key: BlockKey, record: IndexRecord) {
        let mut state = self.state.lock();
        state.reserved_bytes -= reservation.bytes;
        reservation.bytes = 0;
        let old_disk_bytes = state.entries.insert(key, record).map_or(0, |old| disk_bytes(old.len));
        debug_assert!(state.used_bytes >= old_disk_bytes);
        state.used_bytes = state.used_bytes - old_disk_bytes + disk_bytes(record.len);
    }

    /// Writes the temp file, noting (once) a filesystem that refuses
    /// `O_DIRECT`. On failure nothing is left at `temp`.
    fn write_temp(&self, key: BlockKey, temp: &Path, bytes: &[u8]) -> Result<(), SsdError> {
        let direct_rejected = || {
            if self.direct_io.swap(false, Ordering::Relaxed) {
                warn!(
                    dir = %self.dir.display(),
                    "ssd: filesystem rejects O_DIRECT (EINVAL); writing block files buffered + fdatasync"
                );
            }
        };
        match write_block_file(temp, bytes, self.direct_io_active(), self.options.sync, direct_rejected) {
            Ok(WriteMode::Direct | WriteMode::Buffered) => Ok(()),
            Err(source) => {
                remove_quietly(temp);
                Err(SsdError::block_io(key, "write", temp.to_path_buf(), source))
            }
        }
    }

    /// The entry to read `key` into a buffer of `dst_len` bytes.
    fn record_for_read(&self, key: BlockKey, path: &Path, dst_len: usize) -> Result<IndexRecord, SsdError> {
        let record = self.state.lock().entries.get(&key).copied();
        let Some(record) = record else {
            return Err(SsdError::NotFound { key, path: path.to_path_buf() });
        };
        if record.len != dst_len as u64 {
            return Err(SsdError::LenMismatch { key, stored: record.len, requested: dst_len as u64 });
        }
        Ok(record)
    }

    /// Drops an entry whose file failed a read. The caller holds the key lock.
    fn drop_damaged(&self, key: BlockKey, path: &Path, why: &str) {
        warn!(key = format_args!("{:016x}", key.0), path = %path.display(), why, "ssd: dropping damaged block");
        remove_quietly(path);
        self.forget(key, path);
    }

    /// Drops `key`'s entry from the index and the accounting (its file is
    /// already gone or not the caller's concern). Index failures are logged:
    /// an entry left in the index names a file that is gone or replaced by an
    /// orphan, and the next open drops it. The caller holds the key lock.
    fn forget(&self, key: BlockKey, path: &Path) {
        if let Err(err) = self.index.delete(key) {
            warn!(error = %err, path = %path.display(), "ssd: index delete failed; the entry is dropped at next open");
        }
        let mut state = self.state.lock();
        if let Some(old) = state.entries.remove(&key) {
            state.used_bytes -= disk_bytes(old.len);
        }
    }
}

/// Capacity promised to one write in flight; released on drop unless
/// committed.
struct Reservation<'a> {
    state: &'a Mutex<State>,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.state.lock().reserved_bytes -= self.bytes;
        }
    }
}

/// On-disk bytes of a block of `len` bytes. Lengths are bounded by
/// [`MAX_BLOCK_BYTES_LIMIT`] on the way in, so this cannot overflow for an
/// entry the tier wrote; an index entry from elsewhere with an absurd length
/// fails reconciliation's size check instead.
fn disk_bytes(len: u64) -> u64 {
    padded_len(len).unwrap_or(u64::MAX)
}

/// Syncs a directory, making renames and unlinks in it durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes `path`, logging (not returning) failures: used on cleanup paths
/// whose leftovers the next open reconciles.
fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => warn!(path = %path.display(), error = %err, "ssd: could not remove file; the next open will"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tier_is_send_and_sync() {
        assert_send_sync::<SsdTier>();
    }

    #[test]
    fn options_are_validated() {
        assert!(SsdOptions::new(1 << 30).validate().is_ok());
        let zero = SsdOptions { max_block_bytes: 0, ..SsdOptions::new(1) };
        assert!(matches!(zero.validate(), Err(SsdError::InvalidOptions(_))));
        let huge = SsdOptions { max_block_bytes: u64::MAX, ..SsdOptions::new(1) };
        assert!(matches!(huge.validate(), Err(SsdError::InvalidOptions(_))));
    }

    #[test]
    fn reservations_are_released_unless_committed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let tier = SsdTier::open(dir.path(), 3 * BLOCK_ALIGN)?;
        let reservation = tier.reserve(BlockKey(1), 2 * BLOCK_ALIGN)?;
        assert_eq!(tier.free_bytes(), BLOCK_ALIGN);
        assert!(matches!(
            tier.reserve(BlockKey(2), 2 * BLOCK_ALIGN),
            Err(SsdError::Full { needed, free, .. }) if needed == 2 * BLOCK_ALIGN && free == BLOCK_ALIGN
        ));
        drop(reservation);
        assert_eq!(tier.free_bytes(), 3 * BLOCK_ALIGN);
        assert_eq!(tier.used_bytes(), 0);
        Ok(())
    }

    #[test]
    fn a_missing_file_found_on_read_drops_the_entry() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let tier = SsdTier::open(dir.path(), 1 << 20)?;
        let block = vec![3u8; 5000];
        tier.write(BlockKey(9), &block, BlockChecksum::of(&block))?;
        fs::remove_file(tier.block_path(BlockKey(9)))?;
        let mut dst = vec![0u8; block.len()];
        assert!(matches!(tier.read_into(BlockKey(9), &mut dst), Err(SsdError::NotFound { .. })));
        assert!(!tier.contains(BlockKey(9)));
        assert_eq!(tier.used_bytes(), 0);
        Ok(())
    }

    #[test]
    fn block_files_are_owner_only() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let tier = SsdTier::open(dir.path(), 1 << 20)?;
        let block = vec![5u8; 4096];
        tier.write(BlockKey(11), &block, BlockChecksum::of(&block))?;
        let mode = fs::metadata(tier.block_path(BlockKey(11)))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "cached KV must not be readable by other users");
        Ok(())
    }

    #[test]
    fn temp_files_sit_next_to_the_block_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let tier = SsdTier::open(dir.path(), 0)?;
        let temp = tier.temp_path(BlockKey(0xab));
        assert_eq!(temp, dir.path().join("blocks/00000000000000ab.blk.tmp"));
        Ok(())
    }
}
