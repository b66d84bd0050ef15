//! Prefix-chained block keys.
//!
//! `key[0] = H(salt, tokens[0..B])`, `key[i] = H(key[i-1], tokens[iB..(i+1)B])`
//! with H = xxh3-64. The salt folds in everything that makes KV bytes differ
//! for the same tokens (model fingerprint, KV dtype, block size), so equal
//! keys mean interchangeable blocks. [`KeySalt::for_tenant`] folds in a
//! tenant, so tenants never share (or probe) each other's cached prefixes.

use twox_hash::XxHash3_64;

/// The identity of one full block of KV for one token prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u64);

/// What distinguishes one KV layout from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeySalt(u64);

impl KeySalt {
    /// `model_fingerprint` identifies the weights; `kv_dtype` names the KV
    /// element type ("f32", "bf16"); `block_tokens` is the block size.
    pub fn new(model_fingerprint: &str, kv_dtype: &str, block_tokens: usize) -> Self {
        let text = format!("tandem-kv-v1\0{model_fingerprint}\0{kv_dtype}\0{block_tokens}");
        KeySalt(XxHash3_64::oneshot_with_seed(0, text.as_bytes()))
    }

    /// The salt of one tenant's blocks. The default tenant (empty) keeps
    /// the salt as it is, so untenanted deployments keep their keys; any
    /// other tenant gets a key space of its own. (Keys are 64-bit xxh3, not
    /// a cryptographic hash: this separates honest tenants and stops a probe
    /// with the same prompt, not a search for colliding token sequences.)
    pub fn for_tenant(self, tenant: &str) -> KeySalt {
        if tenant.is_empty() {
            return self;
        }
        let text = format!("tandem-tenant-v1\0{tenant}");
        KeySalt(XxHash3_64::oneshot_with_seed(self.0, text.as_bytes()))
    }
}

fn hash_block(seed: u64, tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    XxHash3_64::oneshot_with_seed(seed, &bytes)
}

/// Keys of every **full** block of `tokens`; a trailing partial block has
/// no key (it is not shareable until it fills).
pub fn block_keys(salt: KeySalt, tokens: &[u32], block_tokens: usize) -> Vec<BlockKey> {
    assert!(block_tokens > 0, "block_tokens must be positive");
    let mut seed = salt.0;
    tokens
        .chunks_exact(block_tokens)
        .map(|block| {
            seed = hash_block(seed, block);
            BlockKey(seed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_share_keys_and_divergence_propagates() {
        let salt = KeySalt::new("m", "f32", 4);
        let a: Vec<u32> = (0..12).collect();
        let mut b = a.clone();
        b[5] = 99; // second block differs
        let (ka, kb) = (block_keys(salt, &a, 4), block_keys(salt, &b, 4));
        assert_eq!(ka.len(), 3);
        assert_eq!(ka[0], kb[0]);
        assert_ne!(ka[1], kb[1]);
        assert_ne!(ka[2], kb[2], "a key commits to the whole prefix, not just its block");
    }

    #[test]
    fn partial_blocks_have_no_key_and_salts_separate_models() {
        let tokens: Vec<u32> = (0..10).collect();
        assert_eq!(block_keys(KeySalt::new("m", "f32", 4), &tokens, 4).len(), 2);
        let k1 = block_keys(KeySalt::new("m", "f32", 4), &tokens, 4);
        let k2 = block_keys(KeySalt::new("m", "bf16", 4), &tokens, 4);
        let k3 = block_keys(KeySalt::new("other", "f32", 4), &tokens, 4);
        assert_ne!(k1[0], k2[0]);
        assert_ne!(k1[0], k3[0]);
    }

    #[test]
    fn tenants_get_separate_key_spaces_and_the_default_tenant_keeps_the_keys() {
        let tokens: Vec<u32> = (0..8).collect();
        let salt = KeySalt::new("m", "f32", 4);
        assert_eq!(salt.for_tenant(""), salt, "untenanted keys do not change");
        let (a, b) = (salt.for_tenant("acme"), salt.for_tenant("globex"));
        let keys = |s| block_keys(s, &tokens, 4);
        assert_eq!(keys(a), keys(salt.for_tenant("acme")));
        for (x, y) in [(a, b), (a, salt), (b, salt)] {
            let (kx, ky) = (keys(x), keys(y));
            assert!(kx.iter().all(|k| !ky.contains(k)), "no key is shared across tenants");
        }
    }
}
