//! The SSD tier against real files in a temp dir under /tmp (ext4, so
//! `O_DIRECT` is in play): round trips, restarts, capacity, corruption,
//! reconciliation, concurrency and disk faults.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::ssd::{block_file_name, SsdEntry, SsdError, SsdOptions, SsdTier, BLOCK_ALIGN};
use tandem_proto::BlockKey;

const MIB: u64 = 1 << 20;

/// Deterministic, key-dependent block contents.
fn block(key: u64, len: usize) -> Vec<u8> {
    let mut state = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn write(tier: &SsdTier, key: u64, bytes: &[u8]) -> Result<(), SsdError> {
    tier.write(BlockKey(key), bytes, BlockChecksum::of(bytes))
}

fn read(tier: &SsdTier, key: u64, len: usize) -> Result<Vec<u8>, SsdError> {
    let mut dst = vec![0u8; len];
    tier.read_into(BlockKey(key), &mut dst)?;
    Ok(dst)
}

fn padded(len: usize) -> u64 {
    (len as u64).next_multiple_of(BLOCK_ALIGN)
}

/// Names of the files in the tier's blocks directory, sorted.
fn block_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir.join("blocks"))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

const SIZES: [usize; 7] = [1, 4095, 4096, 4097, 256 << 10, (2 << 20) + 3, 0];

#[test]
fn ssd_round_trips_many_sizes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    ensure!(tier.direct_io_active(), "/tmp is ext4 and should take O_DIRECT");
    let mut expected_used = 0;
    for (i, &len) in SIZES.iter().enumerate() {
        let key = 100 + i as u64;
        let bytes = block(key, len);
        write(&tier, key, &bytes)?;
        expected_used += padded(len);
        assert_eq!(read(&tier, key, len)?, bytes, "len {len}");
        let on_disk = fs::read(dir.path().join(block_file_name(BlockKey(key))))?;
        assert_eq!(on_disk.len() as u64, padded(len), "file of len {len} is padded to 4 KiB");
        assert_eq!(&on_disk[..len], &bytes[..]);
        assert!(on_disk[len..].iter().all(|&b| b == 0), "padding is zeros");
        assert_eq!(
            tier.entry(BlockKey(key)),
            Some(SsdEntry { key: BlockKey(key), len: len as u64, checksum: BlockChecksum::of(&bytes) })
        );
    }
    assert!(tier.direct_io_active(), "no fallback on ext4");
    assert_eq!(tier.used_bytes(), expected_used);
    assert_eq!(tier.len(), SIZES.len());
    assert_eq!(tier.capacity_bytes(), 64 * MIB);
    assert_eq!(tier.dir(), dir.path());
    // A block that sits 4096-aligned in memory takes the in-place O_DIRECT path.
    let aligned = block(7, 3 * BLOCK_ALIGN as usize + 10);
    let mut storage = vec![0u8; aligned.len() + BLOCK_ALIGN as usize];
    let start = storage.as_ptr().align_offset(BLOCK_ALIGN as usize);
    storage[start..start + aligned.len()].copy_from_slice(&aligned);
    write(&tier, 7, &storage[start..start + aligned.len()])?;
    assert_eq!(read(&tier, 7, aligned.len())?, aligned);
    Ok(())
}

#[test]
fn ssd_survives_reopen() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (entries, used) = {
        let tier = SsdTier::open(dir.path(), 64 * MIB)?;
        for (i, &len) in SIZES.iter().enumerate() {
            write(&tier, i as u64, &block(i as u64, len))?;
        }
        ensure!(tier.remove(BlockKey(0))?, "key 0 was there");
        (tier.list(), tier.used_bytes())
    };
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    assert_eq!(tier.list(), entries);
    assert_eq!(tier.used_bytes(), used);
    assert!(!tier.contains(BlockKey(0)));
    for (i, &len) in SIZES.iter().enumerate().skip(1) {
        assert_eq!(read(&tier, i as u64, len)?, block(i as u64, len), "len {len}");
    }
    let keys: Vec<u64> = tier.list().iter().map(|e| e.key.0).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "list is in key order: {keys:?}");
    Ok(())
}

#[test]
fn ssd_full_until_blocks_are_removed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 3 * BLOCK_ALIGN)?;
    write(&tier, 1, &block(1, 4096))?;
    write(&tier, 2, &block(2, 4097))?; // two 4 KiB units
    assert_eq!(tier.used_bytes(), 3 * BLOCK_ALIGN);
    let err = write(&tier, 3, &block(3, 1)).expect_err("the tier is full");
    match &err {
        SsdError::Full { key, needed, free } => {
            assert_eq!((*key, *needed, *free), (BlockKey(3), BLOCK_ALIGN, 0));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(err.to_string().contains("0000000000000003"), "{err}");
    assert!(!tier.contains(BlockKey(3)));
    assert_eq!(block_files(dir.path())?.len(), 2, "a refused write leaves no file");

    ensure!(tier.remove(BlockKey(1))?, "key 1 was there");
    assert!(!tier.remove(BlockKey(1))?, "second remove finds nothing");
    assert_eq!(tier.used_bytes(), 2 * BLOCK_ALIGN);
    write(&tier, 3, &block(3, 1))?;
    assert_eq!(read(&tier, 3, 1)?, block(3, 1));
    assert_eq!(tier.used_bytes(), 3 * BLOCK_ALIGN);
    assert_eq!(tier.free_bytes(), 0);
    Ok(())
}

#[test]
fn ssd_max_block_size_is_enforced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let options = SsdOptions { max_block_bytes: 10_000, ..SsdOptions::new(MIB) };
    let tier = SsdTier::open_with(dir.path(), options)?;
    write(&tier, 1, &block(1, 10_000))?;
    let err = write(&tier, 2, &block(2, 10_001)).expect_err("over the maximum");
    assert!(matches!(err, SsdError::TooLarge { len: 10_001, max: 10_000, .. }), "{err:?}");
    assert_eq!(tier.used_bytes(), padded(10_000));
    assert_eq!(tier.len(), 1);

    let tier_default = SsdTier::open(&dir.path().join("other"), u64::MAX)?;
    assert_eq!(tier_default.max_block_bytes(), 64 * MIB);
    Ok(())
}

#[test]
fn ssd_corrupt_file_is_detected_then_dropped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    let bytes = block(5, 300_000);
    write(&tier, 5, &bytes)?;
    write(&tier, 6, &block(6, 4096))?;
    let path = tier.block_path(BlockKey(5));
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 123_456)?;
    file.write_all_at(&[byte[0] ^ 0x01], 123_456)?;
    file.sync_all()?;
    drop(file);

    let err = read(&tier, 5, bytes.len()).expect_err("flipped byte");
    assert!(matches!(err, SsdError::Corrupt { key: BlockKey(5), .. }), "{err:?}");
    assert!(err.is_miss());
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    let err = read(&tier, 5, bytes.len()).expect_err("dropped");
    assert!(matches!(err, SsdError::NotFound { key: BlockKey(5), .. }), "{err:?}");
    assert!(!path.exists(), "the corrupt file is removed");
    assert_eq!(tier.used_bytes(), BLOCK_ALIGN);
    assert_eq!(read(&tier, 6, 4096)?, block(6, 4096), "other blocks unaffected");

    drop(tier);
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    assert!(!tier.contains(BlockKey(5)), "the drop reached the index");
    assert_eq!(tier.len(), 1);
    Ok(())
}

#[test]
fn ssd_short_file_is_corrupt_on_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    write(&tier, 8, &block(8, 9000))?;
    OpenOptions::new().write(true).open(tier.block_path(BlockKey(8)))?.set_len(4096)?;
    let err = read(&tier, 8, 9000).expect_err("truncated under us");
    assert!(matches!(err, SsdError::Corrupt { .. }), "{err:?}");
    assert_eq!(tier.used_bytes(), 0);
    Ok(())
}

#[test]
fn ssd_open_reconciles_truncated_missing_orphan_and_temp_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let tier = SsdTier::open(dir.path(), 64 * MIB)?;
        for key in 1..=4 {
            write(&tier, key, &block(key, 10_000))?;
        }
    }
    let blocks = dir.path().join("blocks");
    // 1: truncated. 2: deleted. 3: untouched. 4: grown. Plus an orphan block
    // file, a temp file of an interrupted write and a foreign file.
    let name = |key| dir.path().join(block_file_name(BlockKey(key)));
    OpenOptions::new().write(true).open(name(1))?.set_len(4096)?;
    fs::remove_file(name(2))?;
    OpenOptions::new().write(true).open(name(4))?.set_len(5 * 4096)?;
    fs::write(name(9), vec![1u8; 4096])?;
    fs::write(blocks.join("0000000000000003.blk.tmp"), b"half")?;
    fs::write(blocks.join("README"), b"not ours")?;

    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    let keys: Vec<u64> = tier.list().iter().map(|e| e.key.0).collect();
    assert_eq!(keys, vec![3]);
    assert_eq!(tier.used_bytes(), padded(10_000));
    assert_eq!(read(&tier, 3, 10_000)?, block(3, 10_000));
    assert_eq!(block_files(dir.path())?, vec!["0000000000000003.blk", "README"]);
    assert!(matches!(read(&tier, 1, 10_000), Err(SsdError::NotFound { .. })));

    // The drops reached the index: a second open finds nothing to fix.
    drop(tier);
    let tier = SsdTier::open(dir.path(), 64 * MIB)?;
    assert_eq!(tier.len(), 1);
    Ok(())
}

#[test]
fn ssd_replacing_a_key_keeps_accounting_right() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 4 * BLOCK_ALIGN)?;
    write(&tier, 1, &block(1, 100))?;
    write(&tier, 2, &block(2, 100))?;
    // Growing key 1 to three units fits only because its old unit is freed.
    write(&tier, 1, &block(11, 3 * 4096))?;
    assert_eq!(tier.used_bytes(), 4 * BLOCK_ALIGN);
    assert_eq!(read(&tier, 1, 3 * 4096)?, block(11, 3 * 4096));
    assert!(matches!(read(&tier, 1, 100), Err(SsdError::LenMismatch { stored: 12_288, requested: 100, .. })));
    // Growing it past the capacity fails and keeps the old block.
    let err = write(&tier, 1, &block(12, 4 * 4096)).expect_err("needs one more unit");
    assert!(matches!(err, SsdError::Full { needed: 4096, free: 0, .. }), "{err:?}");
    assert_eq!(read(&tier, 1, 3 * 4096)?, block(11, 3 * 4096));
    // Shrinking frees.
    write(&tier, 1, &block(13, 5))?;
    assert_eq!(tier.used_bytes(), 2 * BLOCK_ALIGN);
    assert_eq!(tier.len(), 2);
    assert_eq!(read(&tier, 1, 5)?, block(13, 5));
    drop(tier);
    let tier = SsdTier::open(dir.path(), 4 * BLOCK_ALIGN)?;
    assert_eq!(tier.used_bytes(), 2 * BLOCK_ALIGN);
    assert_eq!(read(&tier, 1, 5)?, block(13, 5));
    Ok(())
}

#[test]
fn ssd_wrong_destination_length_is_an_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), MIB)?;
    write(&tier, 1, &block(1, 5000))?;
    for len in [4999, 5001, 8192, 0] {
        let err = read(&tier, 1, len).expect_err("wrong length");
        assert!(matches!(err, SsdError::LenMismatch { stored: 5000, .. }), "{err:?}");
        assert!(err.to_string().contains("0000000000000001"), "{err}");
    }
    assert_eq!(read(&tier, 1, 5000)?, block(1, 5000), "a wrong length does not drop the block");
    assert!(matches!(read(&tier, 2, 5000), Err(SsdError::NotFound { key: BlockKey(2), .. })));
    Ok(())
}

#[test]
fn ssd_concurrent_writers_and_readers() -> Result<()> {
    const THREADS: u64 = 6;
    const KEYS_PER_THREAD: u64 = 40;
    let dir = tempfile::tempdir()?;
    let tier = Arc::new(SsdTier::open(dir.path(), 256 * MIB)?);
    let len_of = |key: u64| 1 + (key as usize * 7919) % (64 << 10);
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for t in 0..THREADS {
            let tier = &tier;
            handles.push(s.spawn(move || -> Result<()> {
                for i in 0..KEYS_PER_THREAD {
                    let key = t * 1000 + i;
                    write(tier, key, &block(key, len_of(key)))?;
                    // Read back our own and a neighbour's keys as they appear.
                    assert_eq!(read(tier, key, len_of(key))?, block(key, len_of(key)));
                    let other = ((t + 1) % THREADS) * 1000 + i;
                    match read(tier, other, len_of(other)) {
                        Ok(bytes) => assert_eq!(bytes, block(other, len_of(other))),
                        Err(SsdError::NotFound { .. }) => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                Ok(())
            }));
        }
        // Two threads fight over one shared key, with readers checking they
        // only ever see one writer's complete block.
        for t in 0..2u64 {
            let tier = &tier;
            handles.push(s.spawn(move || -> Result<()> {
                for round in 0..30u64 {
                    let version = t * 100 + round;
                    write(tier, 999_999, &block(version, 8192))?;
                    let bytes = read(tier, 999_999, 8192)?;
                    let is_some_version = (0..2u64).any(|w| (0..30).any(|r| bytes == block(w * 100 + r, 8192)));
                    ensure!(is_some_version, "read a torn block");
                }
                Ok(())
            }));
        }
        for handle in handles {
            handle.join().map_err(|_| anyhow::anyhow!("a thread panicked"))??;
        }
        Ok(())
    })?;
    let expected: u64 = (0..THREADS)
        .flat_map(|t| (0..KEYS_PER_THREAD).map(move |i| t * 1000 + i))
        .map(|key| padded(len_of(key)))
        .sum::<u64>()
        + padded(8192);
    assert_eq!(tier.len() as u64, THREADS * KEYS_PER_THREAD + 1);
    assert_eq!(tier.used_bytes(), expected);
    assert_eq!(block_files(dir.path())?.len() as u64, THREADS * KEYS_PER_THREAD + 1, "no temp files left");
    drop(tier);
    let tier = SsdTier::open(dir.path(), 256 * MIB)?;
    assert_eq!(tier.used_bytes(), expected);
    Ok(())
}

/// Injects a failure at the temp file: a directory there makes its creation
/// fail (EISDIR), which works even as root, unlike a read-only directory.
#[test]
fn ssd_failed_write_leaves_no_trace() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), MIB)?;
    write(&tier, 1, &block(1, 5000))?;
    let before = (tier.list(), tier.used_bytes(), tier.free_bytes(), block_files(dir.path())?);

    for key in [2u64, 1] {
        // A fresh key, then a replacement of an existing one.
        let temp = dir.path().join(format!("{}.tmp", block_file_name(BlockKey(key))));
        fs::create_dir(&temp)?;
        let err = write(&tier, key, &block(key + 50, 7000)).expect_err("temp path is a directory");
        assert!(matches!(&err, SsdError::Io { op: "write", .. }), "{err:?}");
        assert!(err.is_disk_fault());
        assert!(err.to_string().contains(&format!("{key:016x}")), "{err}");
        fs::remove_dir(&temp)?;
        assert_eq!((tier.list(), tier.used_bytes(), tier.free_bytes(), block_files(dir.path())?), before);
    }
    assert_eq!(read(&tier, 1, 5000)?, block(1, 5000), "the old block survives a failed replacement");

    // A rename failure: a non-empty directory squats on the real name.
    let squat = dir.path().join(block_file_name(BlockKey(3)));
    fs::create_dir(&squat)?;
    fs::write(squat.join("x"), b"x")?;
    let err = write(&tier, 3, &block(3, 100)).expect_err("real name is a directory");
    assert!(matches!(&err, SsdError::Io { op: "rename", .. }), "{err:?}");
    assert!(!tier.contains(BlockKey(3)));
    assert_eq!(tier.used_bytes(), before.1);
    assert!(!dir.path().join(format!("{}.tmp", block_file_name(BlockKey(3)))).exists());
    fs::remove_dir_all(&squat)?;

    drop(tier);
    let tier = SsdTier::open(dir.path(), MIB)?;
    assert_eq!(tier.list(), before.0, "the index never saw the failed writes");
    Ok(())
}

/// A temp path that leads to /dev/full: `O_DIRECT` is refused there (EINVAL),
/// so the write falls back to buffered I/O, which then hits ENOSPC.
#[test]
fn ssd_disk_full_and_direct_io_fallback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), 8 * MIB)?;
    assert!(tier.direct_io_active());
    let temp = dir.path().join(format!("{}.tmp", block_file_name(BlockKey(4))));
    std::os::unix::fs::symlink("/dev/full", &temp)?;
    let err = write(&tier, 4, &block(4, 6000)).expect_err("ENOSPC");
    assert!(matches!(err, SsdError::DiskFull { key: BlockKey(4), .. }), "{err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(!tier.direct_io_active(), "the EINVAL switched the tier to buffered writes");
    assert!(fs::symlink_metadata(&temp).is_err(), "the failed temp is cleaned up");
    assert_eq!((tier.len(), tier.used_bytes()), (0, 0));

    // The buffered path works end to end, across a reopen.
    for (i, &len) in SIZES.iter().enumerate() {
        write(&tier, i as u64, &block(i as u64, len))?;
        assert_eq!(read(&tier, i as u64, len)?, block(i as u64, len));
        let size = fs::metadata(tier.block_path(BlockKey(i as u64)))?.len();
        assert_eq!(size, padded(len), "buffered files are padded too");
    }
    let used = tier.used_bytes();
    drop(tier);
    let tier = SsdTier::open(dir.path(), 8 * MIB)?;
    assert_eq!(tier.used_bytes(), used);
    assert_eq!(read(&tier, 5, (2 << 20) + 3)?, block(5, (2 << 20) + 3));
    Ok(())
}

/// tmpfs: older kernels reject `O_DIRECT` there (exercising the fallback),
/// newer ones take it; either way blocks must round-trip.
#[test]
fn ssd_on_tmpfs() -> Result<()> {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipping");
        return Ok(());
    }
    let dir = tempfile::tempdir_in(shm).context("temp dir in /dev/shm")?;
    let tier = SsdTier::open(dir.path(), 16 * MIB)?;
    for (i, &len) in SIZES.iter().enumerate() {
        write(&tier, i as u64, &block(i as u64, len))?;
        assert_eq!(read(&tier, i as u64, len)?, block(i as u64, len));
    }
    eprintln!("tmpfs O_DIRECT still active after writes: {}", tier.direct_io_active());
    Ok(())
}

#[test]
fn ssd_buffered_mode_by_option() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let options = SsdOptions { direct_io: false, sync: false, ..SsdOptions::new(MIB) };
    let tier = SsdTier::open_with(dir.path(), options)?;
    assert!(!tier.direct_io_active());
    write(&tier, 1, &block(1, 4097))?;
    assert_eq!(read(&tier, 1, 4097)?, block(1, 4097));
    assert_eq!(tier.used_bytes(), 2 * BLOCK_ALIGN);
    Ok(())
}

#[test]
fn ssd_one_tier_per_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tier = SsdTier::open(dir.path(), MIB)?;
    let err = SsdTier::open(dir.path(), MIB).expect_err("the index is locked by the first tier");
    assert!(matches!(err, SsdError::Index { op: "open", .. }), "{err:?}");
    drop(tier);
    SsdTier::open(dir.path(), MIB)?;
    Ok(())
}
