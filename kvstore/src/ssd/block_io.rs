//! Block-file I/O: 4 KiB-aligned `O_DIRECT` writes, with a buffered fallback
//! for filesystems that reject `O_DIRECT`, and plain positional reads.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

/// Alignment of `O_DIRECT` buffers, offsets and lengths, and the unit block
/// files are padded to.
pub const BLOCK_ALIGN: u64 = 4096;

/// `BLOCK_ALIGN` as a `usize`, for buffer arithmetic.
const ALIGN: usize = BLOCK_ALIGN as usize;

/// Bytes copied into the aligned staging buffer per `O_DIRECT` write; bounds
/// the staging memory of one write regardless of block size.
const STAGING_BYTES: usize = 1 << 20;

/// `len` rounded up to [`BLOCK_ALIGN`]: a block's size on disk. `None` on
/// overflow.
pub fn padded_len(len: u64) -> Option<u64> {
    len.checked_next_multiple_of(BLOCK_ALIGN)
}

/// How a block file ended up being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// Through `O_DIRECT`.
    Direct,
    /// Buffered: `O_DIRECT` was not asked for, or was rejected.
    Buffered,
}

/// Writes `bytes` to a new file at `path` (truncating any file there),
/// zero-padded to [`BLOCK_ALIGN`], and syncs its data when `sync`.
///
/// With `try_direct`, writes through `O_DIRECT`; when the filesystem answers
/// EINVAL, calls `direct_rejected` and falls back to a buffered write. On
/// error the file may be left partially written; the caller removes it.
pub(crate) fn write_block_file(
    path: &Path,
    bytes: &[u8],
    try_direct: bool,
    sync: bool,
    direct_rejected: impl FnOnce(),
) -> io::Result<WriteMode> {
    with_direct_fallback(
        try_direct,
        || write_direct(path, bytes, sync),
        || write_buffered(path, bytes, sync),
        direct_rejected,
    )
}

/// Runs `direct` when `try_direct`, and `buffered` when not or when `direct`
/// failed with EINVAL (the filesystem does not do `O_DIRECT`), calling
/// `direct_rejected` first in that case.
fn with_direct_fallback(
    try_direct: bool,
    direct: impl FnOnce() -> io::Result<()>,
    buffered: impl FnOnce() -> io::Result<()>,
    direct_rejected: impl FnOnce(),
) -> io::Result<WriteMode> {
    if try_direct {
        match direct() {
            Ok(()) => return Ok(WriteMode::Direct),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => direct_rejected(),
            Err(err) => return Err(err),
        }
    }
    buffered()?;
    Ok(WriteMode::Buffered)
}

fn create(path: &Path, extra_flags: libc::c_int) -> io::Result<File> {
    // Owner-only: same-host readers map these files as the node's user, and
    // nobody else should read cached KV.
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).custom_flags(extra_flags).open(path)
}

fn write_direct(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let file = create(path, libc::O_DIRECT)?;
    // A 4096-aligned caller buffer (a block in a mapped DRAM segment) is
    // written in place up to its last whole 4 KiB; the rest goes through an
    // aligned, zero-padded staging buffer.
    let in_place = if bytes.as_ptr().align_offset(ALIGN) == 0 { bytes.len() / ALIGN * ALIGN } else { 0 };
    let (aligned, tail) = bytes.split_at(in_place);
    let mut offset = 0u64;
    // Each chunk starts 4096-aligned (STAGING_BYTES is a multiple of ALIGN)
    // and is a whole number of 4 KiB units long.
    for chunk in aligned.chunks(STAGING_BYTES) {
        file.write_all_at(chunk, offset)?;
        offset += chunk.len() as u64;
    }
    if !tail.is_empty() {
        let staging_len = tail.len().min(STAGING_BYTES).next_multiple_of(ALIGN);
        let mut staging = AlignedBuf::zeroed(staging_len)?;
        for chunk in tail.chunks(STAGING_BYTES) {
            let padded = chunk.len().next_multiple_of(ALIGN);
            let buf = staging.as_mut_slice();
            buf[..chunk.len()].copy_from_slice(chunk);
            buf[chunk.len()..padded].fill(0);
            file.write_all_at(&buf[..padded], offset)?;
            offset += padded as u64;
        }
    }
    if sync {
        // O_DIRECT bypasses the page cache but not the file's metadata (its
        // size, its extents) nor the device's volatile cache.
        file.sync_data()?;
    }
    Ok(())
}

fn write_buffered(path: &Path, bytes: &[u8], sync: bool) -> io::Result<()> {
    let file = create(path, 0)?;
    file.write_all_at(bytes, 0)?;
    let padded = padded_len(bytes.len() as u64).ok_or_else(|| io::Error::other("block length overflows"))?;
    // Extending reads back as zeros: the same padding the O_DIRECT path writes.
    file.set_len(padded)?;
    if sync {
        file.sync_data()?;
    }
    Ok(())
}

/// Fills `dst` with the first `dst.len()` bytes of the file at `path`.
/// A file shorter than `dst` is `ErrorKind::UnexpectedEof`.
pub(crate) fn read_block_file(path: &Path, dst: &mut [u8]) -> io::Result<()> {
    File::open(path)?.read_exact_at(dst, 0)
}

/// A zero-initialised heap buffer aligned to [`BLOCK_ALIGN`], as `O_DIRECT`
/// requires of user buffers.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes; `len` must be a non-zero multiple of
    /// [`BLOCK_ALIGN`].
    fn zeroed(len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(ALIGN) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad aligned buffer length {len}")));
        }
        let layout = Layout::from_size_align(len, ALIGN).map_err(io::Error::other)?;
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` bytes allocated (and zeroed,
        // so initialised) by `zeroed`, owned by `self` until `drop`; the
        // `&mut self` borrow makes this the only reference to them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by `alloc_zeroed` with exactly `layout`
        // and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.layout.size()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_rounds_up_to_4k() {
        assert_eq!(padded_len(0), Some(0));
        assert_eq!(padded_len(1), Some(4096));
        assert_eq!(padded_len(4096), Some(4096));
        assert_eq!(padded_len(4097), Some(8192));
        assert_eq!(padded_len(u64::MAX), None);
    }

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() -> io::Result<()> {
        let mut buf = AlignedBuf::zeroed(3 * ALIGN)?;
        let slice = buf.as_mut_slice();
        assert_eq!(slice.len(), 3 * ALIGN);
        assert_eq!(slice.as_ptr().align_offset(ALIGN), 0);
        assert!(slice.iter().all(|&b| b == 0));
        assert!(AlignedBuf::zeroed(0).is_err());
        assert!(AlignedBuf::zeroed(100).is_err());
        Ok(())
    }

    #[test]
    fn einval_from_direct_falls_back_to_buffered() -> io::Result<()> {
        let mut buffered_ran = false;
        let mut rejected = false;
        let mode = with_direct_fallback(
            true,
            || Err(io::Error::from_raw_os_error(libc::EINVAL)),
            || {
                buffered_ran = true;
                Ok(())
            },
            || rejected = true,
        )?;
        assert_eq!(mode, WriteMode::Buffered);
        assert!(buffered_ran && rejected);
        Ok(())
    }

    #[test]
    fn other_direct_errors_do_not_fall_back() {
        let result = with_direct_fallback(
            true,
            || Err(io::Error::from_raw_os_error(libc::EIO)),
            || panic!("must not fall back on EIO"),
            || panic!("EIO is not a rejection of O_DIRECT"),
        );
        assert_eq!(result.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
        let mode = with_direct_fallback(false, || panic!("direct not asked for"), || Ok(()), || panic!("not tried"));
        assert_eq!(mode.ok(), Some(WriteMode::Buffered));
    }

    /// Writes through both paths, from aligned and unaligned sources, and
    /// checks the on-disk image is the block followed by zero padding.
    #[test]
    fn both_paths_write_padded_images() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        // An aligned source, so the in-place path runs too.
        let mut source = AlignedBuf::zeroed(4 * ALIGN)?;
        for (i, b) in source.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let source = source.as_mut_slice();
        for len in [0, 1, 4095, 4096, 4097, 3 * ALIGN + 5] {
            for (aligned_start, try_direct) in [(0, true), (1, true), (0, false)] {
                let bytes = &source[aligned_start..aligned_start + len];
                let path = dir.path().join(format!("b{len}-{aligned_start}-{try_direct}"));
                let mode = write_block_file(&path, bytes, try_direct, true, || panic!("/tmp takes O_DIRECT"))?;
                let expected = if try_direct { WriteMode::Direct } else { WriteMode::Buffered };
                assert_eq!(mode, expected);
                let image = std::fs::read(&path)?;
                assert_eq!(image.len() as u64, padded_len(len as u64).unwrap_or(0));
                assert_eq!(&image[..len], bytes);
                assert!(image[len..].iter().all(|&b| b == 0));
                let mut back = vec![0u8; len];
                read_block_file(&path, &mut back)?;
                assert_eq!(back, bytes);
            }
        }
        Ok(())
    }
}
