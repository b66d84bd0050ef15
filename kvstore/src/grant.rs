//! Write grants: what binds a data-plane write to the put that reserved its
//! range (DESIGN.md §4, two-phase puts).
//!
//! A storage node picks a random [`GrantKey`] at every start and hands it to
//! the master when it registers. For every DRAM placement `put_start` makes,
//! the master mints a [`WriteGrant`]: the put's id and sequence number, the
//! placement's segment, offset and length, the put's deadline, and an
//! HMAC-SHA256 (the first 128 bits) of all of them under the node's key. The
//! writer sends the grant with every piece it writes over the network, and
//! the node refuses a write whose grant is missing, forged or minted for
//! another node (or another life of this one), whose put's deadline has
//! passed (master and node clocks must agree to well within the put
//! timeout), or that reaches outside the granted range.
//!
//! A range can be handed to a new put before the old grant expires (the
//! old put was revoked, or its block removed). The node's [`GrantLedger`]
//! remembers the newest grant it has seen over each range and refuses older
//! grants that overlap it, so once the new owner has written, the old
//! holder cannot touch its bytes; whatever the old holder wrote before that
//! the new owner overwrites.
//!
//! Same-host clients that map a node's segment files (the shm transport)
//! bypass the data port, and with it the grant: there the segment files'
//! permissions are the boundary. Bytes a client writes into its own range
//! after publishing it, or into a range the node filled itself (promotion,
//! replication), are caught by the readers' checksums: a miss, never bad
//! bytes.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a node's grant key.
pub const GRANT_KEY_LEN: usize = 32;
/// Bytes of an encoded [`WriteGrant`].
pub const GRANT_LEN: usize = 64;
/// Bytes of the (truncated) MAC in a grant.
const MAC_LEN: usize = 16;
/// Separates grant MACs from any other use of the key.
const DOMAIN: &[u8] = b"tandem-kvstore-write-grant-v1";

/// A storage node's secret for its grants; a new one every start.
#[derive(Clone, PartialEq, Eq)]
pub struct GrantKey([u8; GRANT_KEY_LEN]);

impl std::fmt::Debug for GrantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("GrantKey(..)")
    }
}

impl GrantKey {
    /// A fresh key from the thread's CSPRNG (seeded by the OS).
    pub fn random() -> GrantKey {
        GrantKey(rand::random())
    }

    /// A key received on the wire; `None` unless exactly [`GRANT_KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<GrantKey> {
        bytes.try_into().ok().map(GrantKey)
    }

    pub fn as_bytes(&self) -> &[u8; GRANT_KEY_LEN] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

/// The right to write `[offset, offset + len)` of DRAM segment `segment` on
/// one storage node until `expires_ms` (wall clock), for put `put_id`.
/// `seq` orders grants: a later put's grant has a larger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteGrant {
    pub put_id: u64,
    pub seq: u64,
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
    pub expires_ms: u64,
    mac: [u8; MAC_LEN],
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("write without a grant: put_start hands one out with every placement")]
    Missing,
    #[error("malformed grant: {0}")]
    Malformed(String),
    #[error("forged grant, or one minted for another node or an earlier start of this one")]
    BadMac,
    #[error("grant of put {put_id} expired at {expires_ms} (now {now_ms}): the reservation may belong to another put")]
    Expired { put_id: u64, expires_ms: u64, now_ms: u64 },
    #[error("grant of put {put_id} is stale: its range was granted since to put {by_put}")]
    Superseded { put_id: u64, by_put: u64 },
    #[error(
        "write of {len} bytes at segment {segment} offset {offset} is outside the range granted to put {put_id} \
         (segment {granted_segment}, {granted_len} bytes at {granted_offset})"
    )]
    OutsideGrant {
        put_id: u64,
        segment: u32,
        offset: u64,
        len: u64,
        granted_segment: u32,
        granted_offset: u64,
        granted_len: u64,
    },
}

impl WriteGrant {
    /// The grant for one placement, signed with the placement node's key.
    pub fn mint(key: &GrantKey, put_id: u64, seq: u64, range: (u32, u64, u64), expires_ms: u64) -> WriteGrant {
        let (segment, offset, len) = range;
        let mut g = WriteGrant { put_id, seq, segment, offset, len, expires_ms, mac: [0; MAC_LEN] };
        let tag = g.tag(key).finalize().into_bytes();
        g.mac.copy_from_slice(&tag[..MAC_LEN]);
        g
    }

    fn tag(&self, key: &GrantKey) -> Hmac<Sha256> {
        let mut mac = key.mac();
        mac.update(DOMAIN);
        mac.update(&self.put_id.to_le_bytes());
        mac.update(&self.seq.to_le_bytes());
        mac.update(&self.segment.to_le_bytes());
        mac.update(&self.offset.to_le_bytes());
        mac.update(&self.len.to_le_bytes());
        mac.update(&self.expires_ms.to_le_bytes());
        mac
    }

    /// The wire form: put id, segment, 4 zero bytes, offset, len, expiry,
    /// sequence number (little-endian), then the MAC.
    pub fn encode(&self) -> [u8; GRANT_LEN] {
        let mut out = [0u8; GRANT_LEN];
        out[0..8].copy_from_slice(&self.put_id.to_le_bytes());
        out[8..12].copy_from_slice(&self.segment.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.len.to_le_bytes());
        out[32..40].copy_from_slice(&self.expires_ms.to_le_bytes());
        out[40..48].copy_from_slice(&self.seq.to_le_bytes());
        out[48..64].copy_from_slice(&self.mac);
        out
    }

    /// Parses the wire form (the MAC is checked by [`WriteGrant::check`]).
    pub fn decode(bytes: &[u8]) -> Result<WriteGrant, GrantError> {
        let b: &[u8; GRANT_LEN] = bytes
            .try_into()
            .map_err(|_| GrantError::Malformed(format!("{} bytes, a grant is {GRANT_LEN}", bytes.len())))?;
        if b[12..16] != [0; 4] {
            return Err(GrantError::Malformed("reserved bytes are not zero".into()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default());
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&b[48..64]);
        Ok(WriteGrant {
            put_id: u64_at(0),
            seq: u64_at(40),
            segment: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            offset: u64_at(16),
            len: u64_at(24),
            expires_ms: u64_at(32),
            mac,
        })
    }

    /// Whether this grant, checked against the node's `key` at `now_ms`,
    /// allows writing `len` bytes at `offset` of `segment`.
    pub fn check(&self, key: &GrantKey, segment: u32, offset: u64, len: u64, now_ms: u64) -> Result<(), GrantError> {
        // Constant-time comparison of the truncated tag.
        self.tag(key).verify_truncated_left(&self.mac).map_err(|_| GrantError::BadMac)?;
        // The master reclaims the reservation at its deadline.
        if now_ms >= self.expires_ms {
            return Err(GrantError::Expired { put_id: self.put_id, expires_ms: self.expires_ms, now_ms });
        }
        let inside = segment == self.segment
            && offset >= self.offset
            && offset.checked_add(len).zip(self.offset.checked_add(self.len)).is_some_and(|(end, g_end)| end <= g_end);
        if !inside {
            return Err(GrantError::OutsideGrant {
                put_id: self.put_id,
                segment,
                offset,
                len,
                granted_segment: self.segment,
                granted_offset: self.offset,
                granted_len: self.len,
            });
        }
        Ok(())
    }
}

/// What a storage node remembers of the grants written with: per range,
/// the newest grant seen, until it expires. Bounded by the puts of one put
/// timeout (expired entries are pruned as the ledger grows).
#[derive(Debug, Default)]
pub struct GrantLedger {
    /// (segment, offset) -> the newest grant seen starting there.
    seen: BTreeMap<(u32, u64), Seen>,
    /// Longest range ever recorded: how far back an overlap can start.
    max_len: u64,
    /// Entries after the last prune; the next prune is at twice this.
    pruned_len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    len: u64,
    seq: u64,
    put_id: u64,
    expires_ms: u64,
}

impl GrantLedger {
    /// Admits a write under `g` (already [`WriteGrant::check`]ed): refused
    /// when a newer grant overlapping `g`'s range has been written with.
    /// Records `g`, forgetting the older grants it overlaps.
    pub fn admit(&mut self, g: &WriteGrant, now_ms: u64) -> Result<(), GrantError> {
        if self.seen.len() >= (2 * self.pruned_len).max(1024) {
            self.seen.retain(|_, s| s.expires_ms > now_ms);
            self.pruned_len = self.seen.len();
        }
        let end = g.offset.saturating_add(g.len);
        let from = g.offset.saturating_sub(self.max_len);
        let overlapping: Vec<((u32, u64), Seen)> = self
            .seen
            .range((g.segment, from)..(g.segment, end))
            .filter(|(&(_, offset), s)| offset.saturating_add(s.len) > g.offset && s.expires_ms > now_ms)
            .map(|(k, s)| (*k, *s))
            .collect();
        if let Some((_, newer)) = overlapping.iter().find(|(_, s)| s.seq > g.seq) {
            return Err(GrantError::Superseded { put_id: g.put_id, by_put: newer.put_id });
        }
        for (k, s) in overlapping {
            if s.seq < g.seq {
                self.seen.remove(&k);
            }
        }
        self.seen
            .insert((g.segment, g.offset), Seen { len: g.len, seq: g.seq, put_id: g.put_id, expires_ms: g.expires_ms });
        self.max_len = self.max_len.max(g.len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_allows_exactly_its_range_until_it_expires() {
        let key = GrantKey::random();
        let g = WriteGrant::mint(&key, 7, 1, (1, 4096, 1000), 50_000);
        let g = WriteGrant::decode(&g.encode()).unwrap();
        assert_eq!(g.check(&key, 1, 4096, 1000, 49_999), Ok(()));
        assert_eq!(g.check(&key, 1, 4596, 500, 10), Ok(()), "a piece inside the range");
        assert!(matches!(g.check(&key, 1, 4096, 1001, 10), Err(GrantError::OutsideGrant { .. })));
        assert!(matches!(g.check(&key, 1, 4032, 64, 10), Err(GrantError::OutsideGrant { .. })));
        assert!(matches!(g.check(&key, 0, 4096, 10, 10), Err(GrantError::OutsideGrant { .. })));
        assert!(matches!(g.check(&key, 1, u64::MAX, 2, 10), Err(GrantError::OutsideGrant { .. })));
        assert!(matches!(g.check(&key, 1, 4096, 10, 50_000), Err(GrantError::Expired { .. })));
        assert_eq!(g.check(&GrantKey::random(), 1, 4096, 10, 10), Err(GrantError::BadMac), "another node's key");
    }

    #[test]
    fn tampering_with_any_field_breaks_the_mac() {
        let key = GrantKey::random();
        let wire = WriteGrant::mint(&key, 7, 1, (1, 4096, 1000), 50_000).encode();
        for at in (0..12).chain(16..GRANT_LEN) {
            let mut bad = wire;
            bad[at] ^= 1;
            let g = WriteGrant::decode(&bad).unwrap();
            assert!(g.check(&key, g.segment, g.offset, 1, 0).is_err(), "flipping byte {at} must be caught");
        }
        let mut bad = wire;
        bad[13] = 1;
        assert!(matches!(WriteGrant::decode(&bad), Err(GrantError::Malformed(_))));
        assert!(matches!(WriteGrant::decode(&wire[..GRANT_LEN - 1]), Err(GrantError::Malformed(_))));
        assert!(GrantKey::from_bytes(&[0; 31]).is_none());
        assert_eq!(format!("{key:?}"), "GrantKey(..)");
    }

    #[test]
    fn a_newer_grant_over_a_range_locks_out_older_ones() {
        let key = GrantKey::random();
        let old = WriteGrant::mint(&key, 1, 10, (0, 0, 8192), 100_000);
        let new = WriteGrant::mint(&key, 2, 11, (0, 4096, 4096), 100_000);
        let other = WriteGrant::mint(&key, 3, 12, (0, 8192, 4096), 100_000);
        let mut ledger = GrantLedger::default();
        assert_eq!(ledger.admit(&old, 1), Ok(()), "the old holder writes first: the new owner overwrites it");
        assert_eq!(ledger.admit(&new, 1), Ok(()));
        assert_eq!(ledger.admit(&other, 1), Ok(()), "a neighbour does not overlap");
        assert_eq!(ledger.admit(&old, 1), Err(GrantError::Superseded { put_id: 1, by_put: 2 }));
        assert_eq!(ledger.admit(&new, 1), Ok(()), "the owner writes more pieces");
        assert_eq!(ledger.admit(&other, 1), Ok(()));
        let elsewhere = WriteGrant::mint(&key, 4, 9, (1, 0, 8192), 100_000);
        assert_eq!(ledger.admit(&elsewhere, 1), Ok(()), "another segment");
    }
}
