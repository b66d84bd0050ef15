//! Block checksums (xxh3-64), written with each block and checked on read.

use twox_hash::XxHash3_64;

/// The checksum of a block's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockChecksum(pub u64);

impl BlockChecksum {
    pub fn of(bytes: &[u8]) -> Self {
        BlockChecksum(XxHash3_64::oneshot(bytes))
    }

    /// Whether `bytes` still match; callers treat `false` as a miss.
    pub fn verify(self, bytes: &[u8]) -> bool {
        Self::of(bytes) == self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_fails_verification() {
        let mut block = vec![7u8; 4096];
        let sum = BlockChecksum::of(&block);
        assert!(sum.verify(&block));
        block[1234] ^= 0x10;
        assert!(!sum.verify(&block));
    }
}
