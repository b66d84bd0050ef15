//! [`ShmTransport`]: a peer on this host, reached through its files.
//!
//! The peer's DRAM segments are shared-memory files; this transport maps
//! each once (on first use) and every op is a bounds-checked `memcpy`
//! between the mapping and caller memory — one-sided, no RPC. SSD blocks
//! are read with `pread` from the peer's SSD directory.
//!
//! The mappings belong to one incarnation of the peer: a restarted node
//! creates new files, and callers make a new transport for the new
//! [`PeerInfo`] (its `incarnation` changes).
//!
//! Large batches can be copied on several threads (`copy_threads`, above
//! `parallel_min_bytes`; by default only on machines with 16+ cores); the copy runs inside
//! [`tokio::task::block_in_place`] on a multi-threaded runtime so that it
//! does not stall other tasks on the worker.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use tandem_proto::BlockKey;

use super::{run_blocking, BoxFuture, ReadOp, ShmConfig, TransferError, Transport, TransportKind, WriteOp};
use crate::segment::Segment;
use crate::ssd::block_file_name;
use crate::types::{Location, PeerInfo};

/// A transport to a peer storage node on this host.
#[derive(Debug)]
pub struct ShmTransport {
    peer: String,
    /// Segment files and sizes the peer advertised.
    files: HashMap<u32, (PathBuf, u64)>,
    mapped: RwLock<HashMap<u32, Arc<Segment>>>,
    ssd_dir: Option<PathBuf>,
    cfg: ShmConfig,
    /// Resolved from `cfg.copy_threads` once.
    copy_threads: usize,
}

/// One planned copy: source bytes and destination bytes of equal length.
type Copy<'a> = (&'a [u8], &'a mut [u8]);

impl ShmTransport {
    /// A transport to `peer`, which must run on this host. Maps nothing yet.
    pub fn new(peer: &PeerInfo, cfg: ShmConfig) -> ShmTransport {
        ShmTransport {
            peer: peer.name.clone(),
            files: peer.segments.iter().map(|s| (s.id, (s.path.clone(), s.bytes))).collect(),
            mapped: RwLock::new(HashMap::new()),
            ssd_dir: peer.ssd_dir.clone(),
            copy_threads: cfg.effective_copy_threads(),
            cfg,
        }
    }

    /// Segment `id`, mapped on first use. Failures are not cached: a later
    /// batch tries again.
    fn segment(&self, id: u32) -> Result<Arc<Segment>, TransferError> {
        if let Some(seg) = self.mapped.read().get(&id) {
            return Ok(seg.clone());
        }
        let Some((path, bytes)) = self.files.get(&id) else {
            return Err(TransferError::Rejected(format!("peer {} has no segment {id}", self.peer)));
        };
        let seg = Segment::open(path).map_err(|e| TransferError::Unreachable(format!("mapping {}: {e}", self.peer)))?;
        if seg.len() != *bytes {
            // Not the file the peer advertised (e.g. a newer incarnation's).
            let msg = format!("segment file {} has {} bytes, peer advertised {bytes}", path.display(), seg.len());
            return Err(TransferError::Unreachable(msg));
        }
        let seg = Arc::new(seg);
        Ok(self.mapped.write().entry(id).or_insert(seg).clone())
    }

    /// Segments of every DRAM location in `locs`, mapped, in op order.
    fn resolve<'l>(
        &self,
        locs: impl Iterator<Item = &'l Location>,
    ) -> Vec<Option<Result<Arc<Segment>, TransferError>>> {
        locs.map(|loc| match loc {
            Location::Dram { segment, .. } => Some(self.segment(*segment)),
            Location::Ssd { .. } => None,
        })
        .collect()
    }

    fn read_ssd(&self, key: BlockKey, dst: &mut [u8]) -> Result<(), TransferError> {
        let Some(dir) = &self.ssd_dir else {
            return Err(TransferError::NotFound);
        };
        let path = dir.join(block_file_name(key));
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(TransferError::NotFound),
            Err(e) => return Err(TransferError::Io(format!("{}: {e}", path.display()))),
        };
        file.read_exact_at(dst, 0).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                TransferError::Io(format!("{} is shorter than the block ({} bytes)", path.display(), dst.len()))
            }
            _ => TransferError::Io(format!("{}: {e}", path.display())),
        })
    }

    fn read_sync(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<(), TransferError>> {
        let segments = self.resolve(ops.iter().map(|op| &op.src));
        let mut results = vec![Ok(()); ops.len()];
        let mut copies: Vec<Copy<'_>> = Vec::with_capacity(ops.len());
        for ((op, seg), result) in ops.iter_mut().zip(&segments).zip(&mut results) {
            *result = match (op.src, seg) {
                (Location::Ssd { key }, _) => self.read_ssd(key, op.dst),
                (Location::Dram { offset, .. }, Some(Ok(seg))) => match seg.slice(offset, op.dst.len()) {
                    Ok(src) => {
                        copies.push((src, &mut *op.dst));
                        Ok(())
                    }
                    Err(e) => Err(TransferError::Rejected(e.to_string())),
                },
                (Location::Dram { .. }, Some(Err(e))) => Err(e.clone()),
                (Location::Dram { .. }, None) => Err(TransferError::Protocol("unresolved segment".to_owned())),
            };
        }
        self.copy_all(copies);
        results
    }

    fn write_sync(&self, ops: &[WriteOp<'_>]) -> Vec<Result<(), TransferError>> {
        let segments = self.resolve(ops.iter().map(|op| &op.dst));
        let mut results: Vec<Result<(), TransferError>> = vec![Ok(()); ops.len()];
        // Two ops of one batch writing overlapping bytes would alias two
        // `&mut` views of the mapping: refuse all but the first.
        let mut claimed: Vec<(u32, u64, u64, usize)> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| match op.dst {
                Location::Dram { segment, offset } => {
                    Some((segment, offset, offset.saturating_add(op.src.len() as u64), i))
                }
                Location::Ssd { .. } => None,
            })
            .collect();
        claimed.sort_unstable();
        let mut reach: Option<(u32, u64)> = None;
        for (segment, start, end, i) in claimed {
            match reach {
                Some((s, e)) if s == segment && start < e => {
                    results[i] = Err(TransferError::Rejected("overlaps another write of the batch".to_owned()));
                }
                Some((s, e)) if s == segment => reach = Some((s, e.max(end))),
                _ => reach = Some((segment, end)),
            }
        }
        let mut copies: Vec<Copy<'_>> = Vec::with_capacity(ops.len());
        for ((op, seg), result) in ops.iter().zip(&segments).zip(&mut results) {
            if result.is_err() {
                continue;
            }
            *result = match (op.dst, seg) {
                (Location::Ssd { .. }, _) => {
                    Err(TransferError::Rejected("writes go to DRAM locations only".to_owned()))
                }
                (Location::Dram { offset, .. }, Some(Ok(seg))) => match seg.slice_mut(offset, op.src.len()) {
                    Ok(dst) => {
                        copies.push((op.src, dst));
                        Ok(())
                    }
                    Err(e) => Err(TransferError::Rejected(e.to_string())),
                },
                (Location::Dram { .. }, Some(Err(e))) => Err(e.clone()),
                (Location::Dram { .. }, None) => Err(TransferError::Protocol("unresolved segment".to_owned())),
            };
        }
        self.copy_all(copies);
        results
    }

    /// Performs the planned copies, on several threads when the batch is
    /// large enough to repay the thread start-up.
    fn copy_all(&self, copies: Vec<Copy<'_>>) {
        let total: usize = copies.iter().map(|(s, _)| s.len()).sum();
        let threads = self.copy_threads;
        if threads == 1 || (total as u64) < self.cfg.parallel_min_bytes.as_u64() {
            for (src, dst) in copies {
                dst.copy_from_slice(src);
            }
            return;
        }
        let mut shares = split_copies(copies, threads, total);
        let mine = shares.pop().unwrap_or_default();
        std::thread::scope(|scope| {
            for share in shares {
                scope.spawn(move || {
                    for (src, dst) in share {
                        dst.copy_from_slice(src);
                    }
                });
            }
            for (src, dst) in mine {
                dst.copy_from_slice(src);
            }
        });
    }
}

/// Cuts the copies into `parts` shares of about equal bytes, splitting a
/// copy where a share boundary falls inside it.
fn split_copies(copies: Vec<Copy<'_>>, parts: usize, total: usize) -> Vec<Vec<Copy<'_>>> {
    let per = total.div_ceil(parts).max(1);
    let mut shares: Vec<Vec<Copy<'_>>> = vec![Vec::new()];
    let mut room = per;
    for (mut src, mut dst) in copies {
        while !src.is_empty() {
            if room == 0 {
                shares.push(Vec::new());
                room = per;
            }
            let n = room.min(src.len());
            let (s_head, s_tail) = src.split_at(n);
            let (d_head, d_tail) = dst.split_at_mut(n);
            if let Some(share) = shares.last_mut() {
                share.push((s_head, d_head));
            }
            (src, dst, room) = (s_tail, d_tail, room - n);
        }
    }
    shares
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(async move { run_blocking(|| self.read_sync(ops)) })
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(async move { run_blocking(|| self.write_sync(ops)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_split_into_equal_shares_across_op_boundaries() {
        let src: Vec<u8> = (0..100u8).collect();
        let mut a = [0u8; 30];
        let mut b = [0u8; 70];
        let copies: Vec<Copy<'_>> = vec![(&src[..30], &mut a[..]), (&src[30..], &mut b[..])];
        let shares = split_copies(copies, 4, 100);
        assert_eq!(shares.len(), 4);
        for share in &shares {
            assert_eq!(share.iter().map(|(s, _)| s.len()).sum::<usize>(), 25);
        }
        for share in shares {
            for (s, d) in share {
                d.copy_from_slice(s);
            }
        }
        assert_eq!(a[..], src[..30]);
        assert_eq!(b[..], src[30..]);
    }
}
