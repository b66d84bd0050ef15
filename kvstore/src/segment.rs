//! DRAM segments: a file in shared memory (`/dev/shm` by default) mapped into
//! the storage node, and mappable by same-host clients for one-sided copies.
//!
//! A segment is raw shared memory. Which byte ranges are in use is decided by
//! the master's allocator; concurrent readers and writers only ever touch
//! ranges the master handed to them, so the copies here are plain
//! `memcpy`s through raw pointers, bounds-checked against the mapping.
//!
//! Segment files are created owner-only (0600): a same-host client maps
//! them only when it runs as the storage node's user, so the files'
//! permissions are the shm transport's access check (the node's control
//! service, which names them, requires the cluster token).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

/// A mapped segment file.
#[derive(Debug)]
pub struct Segment {
    map: MmapRaw,
    path: PathBuf,
    /// The creating node removes the file when it drops the segment.
    owned: bool,
}

/// Errors of segment access.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("range {offset}+{len} is outside segment of {size} bytes")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("segment file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl Segment {
    /// Creates (or truncates) `path` with `bytes` bytes and maps it. With
    /// `huge_pages`, asks the kernel for transparent huge pages on the
    /// mapping (best effort: ignored where unsupported).
    pub fn create(path: &Path, bytes: u64, huge_pages: bool) -> Result<Segment, SegmentError> {
        let io_err = |source| SegmentError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        // `mode` applies only to a new file: a left-over one is narrowed too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        file.set_len(bytes).map_err(io_err)?;
        let map = MmapOptions::new().len(bytes as usize).map_raw(&file).map_err(io_err)?;
        if huge_pages {
            // Best effort: the mapping works the same without it.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Segment { map, path: path.to_owned(), owned: true })
    }

    /// Maps an existing segment file of another process (same host).
    pub fn open(path: &Path) -> Result<Segment, SegmentError> {
        let io_err = |source| SegmentError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err)?;
        let map = MmapOptions::new().map_raw(&file).map_err(io_err)?;
        Ok(Segment { map, path: path.to_owned(), owned: false })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, SegmentError> {
        let size = self.len();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize),
            _ => Err(SegmentError::OutOfBounds { offset, len: len as u64, size }),
        }
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), SegmentError> {
        let start = self.check(offset, dst.len())?;
        // SAFETY: `start + dst.len()` is within the mapping (checked above);
        // the mapping lives as long as `self`; `dst` is a distinct Rust
        // allocation, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the segment at `offset`.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<(), SegmentError> {
        let start = self.check(offset, src.len())?;
        // SAFETY: as in `read_at`; the mapping is writable (opened read-write).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(start), src.len()) };
        Ok(())
    }

    /// A read-only view of `len` bytes at `offset`, e.g. to send on a socket
    /// without a copy. The caller must only use ranges no one writes
    /// concurrently (ranges the master leased to it).
    pub fn slice(&self, offset: u64, len: usize) -> Result<&[u8], SegmentError> {
        let start = self.check(offset, len)?;
        // SAFETY: in bounds (checked); lifetime tied to `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), len) })
    }

    /// A writable view of `len` bytes at `offset`, e.g. to receive from a
    /// socket without a copy. Same contract as [`Segment::slice`].
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, offset: u64, len: usize) -> Result<&mut [u8], SegmentError> {
        let start = self.check(offset, len)?;
        // SAFETY: in bounds (checked); the range is exclusively the caller's
        // by the master's allocation (module docs).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(start), len) })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_sees_writes_and_bounds_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg0");
        std::fs::write(&path, b"left over").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let seg = Segment::create(&path, 1 << 20, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "segment files are owner-only");
        seg.write_at(4096, b"hello").unwrap();
        let peer = Segment::open(&path).unwrap();
        let mut buf = [0u8; 5];
        peer.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(peer.read_at((1 << 20) - 2, &mut buf), Err(SegmentError::OutOfBounds { .. })));
        assert!(seg.write_at(u64::MAX - 1, b"xx").is_err());
        drop(peer);
        drop(seg);
        assert!(!path.exists(), "the owner removes its segment file");
    }
}
