//! Cheaply clonable, immutable byte ranges that keep their owner alive.
//!
//! Weights live in memory maps (safetensors, GGUF) or, for the few tensors a
//! loader must rewrite (GGUF's permuted Q/K rows), in owned buffers. Kernels
//! see both as `&[u8]`; the owner (an `Arc<Mmap>` or a `Vec<u8>`) stays
//! alive as long as any matrix refers to it. No copy is made at load.

use std::fmt;
use std::sync::Arc;

/// Anything that owns a byte buffer that never moves or changes.
pub trait ByteOwner: AsRef<[u8]> + Send + Sync + 'static {}
impl<T: AsRef<[u8]> + Send + Sync + 'static> ByteOwner for T {}

/// A shared, immutable byte range `[start, start + len)` of an owner.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn ByteOwner>,
    start: usize,
    len: usize,
}

impl SharedBytes {
    /// The whole of `owner`.
    pub fn new(owner: Arc<dyn ByteOwner>) -> Self {
        let len = (*owner).as_ref().len();
        Self { owner, start: 0, len }
    }

    /// An owned buffer.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self::new(Arc::new(bytes))
    }

    /// A sub-range; `None` when it does not lie inside this range.
    pub fn slice(&self, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(Self { owner: Arc::clone(&self.owner), start: self.start + start, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBytes").field("start", &self.start).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_stay_inside_their_owner() {
        let b = SharedBytes::from_vec((0u8..100).collect());
        let s = b.slice(10, 20).unwrap();
        assert_eq!(s.as_slice()[0], 10);
        assert_eq!(s.len(), 20);
        let t = s.slice(5, 15).unwrap();
        assert_eq!(t.as_slice(), &(15u8..30).collect::<Vec<_>>()[..]);
        assert!(s.slice(5, 16).is_none());
        assert!(b.slice(usize::MAX, 2).is_none());
    }
}
