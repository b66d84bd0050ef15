//! Comparing secrets without leaking them through timing: presented
//! secrets are hashed (SHA-256) and the digests compared in constant time,
//! so neither a secret's bytes nor its length show in how long a check
//! takes. The conductor's API keys (`tandem_conductor::auth`) use it.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Whether two digests are equal, in time independent of where they differ.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match_and_any_difference_does_not() {
        let d = digest(b"a-secret-key");
        assert!(digests_equal(&d, &digest(b"a-secret-key")));
        assert!(!digests_equal(&d, &digest(b"a-secret-kez")));
        assert!(!digests_equal(&d, &digest(b"")));
        // The published SHA-256 of "abc".
        let hex: String = digest(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
