//! Stage 1: the shm transport against a plain `memcpy` of the same bytes.
//!
//! A segment file in shared memory stands in for a storage node's DRAM; a
//! [`ShmTransport`] maps it (as a same-host client does) and reads batches
//! of blocks into caller buffers, then writes them back. The baseline copies
//! the same blocks, in the same order and batch shape, between two heap
//! buffers of the same total size with `copy_from_slice`. Every buffer is
//! written once before timing so no page fault lands inside a timed run,
//! and the first repetition of each run is a discarded warm-up.
//!
//! Source and destination sit at the same offsets within a page on both
//! sides (segment offsets and buffers page-aligned): glibc's `memcpy` speed
//! depends on `(dst - src) mod 4096`. One more run reads into a buffer at
//! the offset `malloc` gives large allocations (16 bytes into a page), with
//! a `memcpy` at the same alignment beside it, to show what a caller with
//! such a buffer gets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;
use tandem_kvstore::segment::Segment;
use tandem_kvstore::transport::{local_host_id, ReadOp, ShmConfig, ShmTransport, Transport, WriteOp};
use tandem_kvstore::types::{Location, PeerInfo, SegmentDesc};

use super::sys::{fill, gbps};
use crate::stats::median;

/// Where glibc's `malloc` puts large (mmap-backed) allocations within a page.
pub const MALLOC_PAGE_OFFSET: usize = 16;
const PAGE: usize = 4096;

/// What stage 1 measures.
#[derive(Debug, Clone, Serialize)]
pub struct ShmSettings {
    /// Bytes copied per repetition (the segment, and each buffer, this big).
    pub region_bytes: usize,
    /// Bytes handed to the transport per call.
    pub batch_bytes: usize,
    pub block_sizes: Vec<usize>,
    /// Timed repetitions (the median is reported), after one warm-up.
    pub reps: usize,
}

/// Results for one block size (GB/s are medians of the repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct ShmPoint {
    pub block_bytes: usize,
    /// Single-threaded `copy_from_slice` loop, page-aligned heap buffers.
    pub memcpy_gbps: f64,
    /// Transport reads with `copy_threads = 1` (like for like with the baseline).
    pub read_gbps: f64,
    /// Transport writes with `copy_threads = 1`.
    pub write_gbps: f64,
    /// Transport reads with the default [`ShmConfig`] (what the store runs).
    pub read_default_config_gbps: f64,
    /// Transport writes with the default [`ShmConfig`].
    pub write_default_config_gbps: f64,
    /// Transport reads (`copy_threads = 1`) into a buffer 16 bytes into a
    /// page, where `malloc` puts large buffers.
    pub read_malloc_offset_gbps: f64,
    /// `memcpy` from page-aligned memory to 16 bytes into a page.
    pub memcpy_malloc_offset_gbps: f64,
    /// Every repetition of every run, GB/s.
    pub runs_gbps: BTreeMap<&'static str, Vec<f64>>,
}

/// A buffer whose start sits `phase` bytes into a page.
struct PageBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// `len` pseudo-random bytes (every page written) starting `phase`
    /// bytes into a page.
    fn new(len: usize, phase: usize, seed: u64) -> PageBuf {
        let mut storage = vec![0u8; len + 2 * PAGE];
        let addr = storage.as_ptr() as usize;
        let start = (PAGE - addr % PAGE) % PAGE + phase % PAGE;
        fill(&mut storage, seed);
        PageBuf { storage, start, len }
    }

    fn get(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The runs of one repetition, in order.
const RUNS: [&str; 7] = [
    "memcpy",
    "read",
    "write",
    "read_default_config",
    "write_default_config",
    "read_malloc_offset",
    "memcpy_malloc_offset",
];

/// Runs stage 1 with segment files in `dir`.
pub async fn run(settings: &ShmSettings, dir: &Path) -> anyhow::Result<Vec<ShmPoint>> {
    let region = settings.region_bytes;
    let path = dir.join(format!("tandem-bench-shm-{}.seg", std::process::id()));
    let segment = Segment::create(&path, region as u64, true).context("creating the bench segment")?;
    // Written once so that its pages exist (tmpfs allocates on first write).
    let base_src = PageBuf::new(region, 0, 1);
    segment.write_at(0, base_src.get()).context("filling the bench segment")?;
    let peer = PeerInfo {
        name: "bench-shm".into(),
        incarnation: 1,
        data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        host_id: local_host_id(),
        segments: vec![SegmentDesc { id: 0, bytes: region as u64, path: path.clone() }],
        ssd_dir: None,
    };
    let single = ShmTransport::new(&peer, ShmConfig { copy_threads: 1, ..ShmConfig::default() });
    let default = ShmTransport::new(&peer, ShmConfig::default());
    let mut caller = PageBuf::new(region, 0, 2);
    let mut base_dst = PageBuf::new(region, 0, 3);
    let mut caller_off = PageBuf::new(region, MALLOC_PAGE_OFFSET, 4);
    let mut base_dst_off = PageBuf::new(region, MALLOC_PAGE_OFFSET, 5);

    let mut points = Vec::with_capacity(settings.block_sizes.len());
    for &block in &settings.block_sizes {
        if block == 0 || !block.is_multiple_of(PAGE) || !region.is_multiple_of(block) || settings.batch_bytes < block {
            bail!("block size {block} must be whole pages, divide the region ({region}) and fit a batch");
        }
        eprintln!("[kvstore bench]   shm: {} KiB blocks", block >> 10);
        let per_batch = settings.batch_bytes / block;
        let mut runs: [Vec<f64>; RUNS.len()] = Default::default();
        for rep in 0..=settings.reps {
            let t = [
                time(|| memcpy_blocks(base_src.get(), base_dst.get_mut(), block)),
                time_async(read_blocks(&single, caller.get_mut(), block, per_batch)).await?,
                time_async(write_blocks(&single, caller.get(), block, per_batch)).await?,
                time_async(read_blocks(&default, caller.get_mut(), block, per_batch)).await?,
                time_async(write_blocks(&default, caller.get(), block, per_batch)).await?,
                time_async(read_blocks(&single, caller_off.get_mut(), block, per_batch)).await?,
                time(|| memcpy_blocks(base_src.get(), base_dst_off.get_mut(), block)),
            ];
            if rep > 0 {
                for (run, secs) in runs.iter_mut().zip(t) {
                    run.push(gbps(region as u64, secs));
                }
            }
        }
        // Untimed: fresh bytes written through one transport must read back
        // through the other and through the segment itself.
        fill(caller.get_mut(), block as u64);
        write_blocks(&single, caller.get(), block, per_batch).await?;
        fill(base_dst.get_mut(), 6);
        read_blocks(&default, base_dst.get_mut(), block, per_batch).await?;
        let mut direct = vec![0u8; block];
        segment.read_at((region - block) as u64, &mut direct).context("reading back the bench segment")?;
        if caller.get() != base_dst.get() || direct[..] != caller.get()[region - block..] {
            bail!("shm transport round trip changed the bytes ({} KiB blocks)", block >> 10);
        }
        let m: Vec<f64> = runs.iter().map(|r| median(r)).collect();
        points.push(ShmPoint {
            block_bytes: block,
            memcpy_gbps: m[0],
            read_gbps: m[1],
            write_gbps: m[2],
            read_default_config_gbps: m[3],
            write_default_config_gbps: m[4],
            read_malloc_offset_gbps: m[5],
            memcpy_malloc_offset_gbps: m[6],
            runs_gbps: RUNS.iter().copied().zip(runs).collect(),
        });
    }
    drop((single, default));
    drop(segment);
    Ok(points)
}

fn time(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

async fn time_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<f64> {
    let start = Instant::now();
    f.await?;
    Ok(start.elapsed().as_secs_f64())
}

/// The baseline: block by block, in order, like the transport's ops.
fn memcpy_blocks(src: &[u8], dst: &mut [u8], block: usize) {
    for (d, s) in dst.chunks_exact_mut(block).zip(src.chunks_exact(block)) {
        d.copy_from_slice(s);
    }
    std::hint::black_box(dst);
}

/// Reads block `i` of the segment into block `i` of `caller`, `per_batch`
/// blocks per transport call.
async fn read_blocks(t: &ShmTransport, caller: &mut [u8], block: usize, per_batch: usize) -> anyhow::Result<()> {
    let mut index = 0u64;
    for batch in caller.chunks_mut(block * per_batch) {
        let mut ops: Vec<ReadOp<'_>> = batch
            .chunks_exact_mut(block)
            .map(|dst| {
                let offset = index * block as u64;
                index += 1;
                ReadOp::new(Location::Dram { segment: 0, offset }, dst)
            })
            .collect();
        check(t.read(&mut ops).await)?;
    }
    Ok(())
}

/// Writes block `i` of `caller` to block `i` of the segment.
async fn write_blocks(t: &ShmTransport, caller: &[u8], block: usize, per_batch: usize) -> anyhow::Result<()> {
    let mut index = 0u64;
    for batch in caller.chunks(block * per_batch) {
        let ops: Vec<WriteOp<'_>> = batch
            .chunks_exact(block)
            .map(|src| {
                let offset = index * block as u64;
                index += 1;
                WriteOp { dst: Location::Dram { segment: 0, offset }, src, grant: None }
            })
            .collect();
        check(t.write(&ops).await)?;
    }
    Ok(())
}

/// The first failed op of a batch, as an error.
pub(crate) fn check(results: Vec<Result<(), tandem_kvstore::transport::TransferError>>) -> anyhow::Result<()> {
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(anyhow::anyhow!("transfer failed: {e}")),
        None => Ok(()),
    }
}
