//! What the store's cache should give a run: the same prompts replayed
//! offline, one request at a time, through the store's eviction policy at
//! the store's capacity (`tandem_kvstore::sim::serve`, which follows the
//! serving path's order of store operations).
//!
//! Runs whose requests do not overlap (`--concurrency 1`) must measure
//! exactly this block hit ratio; overlapping runs measure less where a
//! request arrives before the blocks it shares with an earlier one are
//! written.

use super::cluster::{Compute, Setup};
use super::load::Conversation;
use tandem_kvstore::node::StorageConfig;
use tandem_kvstore::policy::PolicyKind;
use tandem_kvstore::sim::{serve, ServedRequest};
use tandem_proto::block_key::{block_keys, KeySalt};

/// Bytes of one KV block in the store, when the harness can know them
/// (modeled compute: the profile's KV bytes per token / `kv_scale`).
pub fn block_bytes(setup: &Setup) -> Option<u64> {
    match &setup.compute {
        Compute::Modeled { profile, kv_scale } => {
            let m = tandem_model::modeled::Modeled::new(profile, *kv_scale).ok()?;
            Some(m.scaled_kv_bytes_per_token() as u64 * u64::from(setup.block_tokens))
        }
        Compute::Real => None,
    }
}

/// Blocks of `block_bytes` the one storage node's DRAM holds: whole blocks
/// per segment (segments of the node's default size, the last one smaller;
/// the master's allocator aligns each block to 64 bytes).
pub fn capacity_blocks(dram_bytes: u64, block_bytes: u64) -> u64 {
    let segment = StorageConfig::default().segment_size.as_u64().max(1);
    let block = block_bytes.div_ceil(64).max(1) * 64;
    let (full, rest) = (dram_bytes / segment, dram_bytes % segment);
    full * (segment / 64 * 64 / block) + rest / 64 * 64 / block
}

/// The store's eviction policy for this setup.
pub fn policy(setup: &Setup) -> anyhow::Result<PolicyKind> {
    match &setup.eviction {
        Some(name) => name.parse().map_err(|e| anyhow::anyhow!("eviction policy {name:?}: {e}")),
        None => Ok(tandem_kvstore::master::MasterConfig::default().policy),
    }
}

/// The block hit ratio of `work`'s turns, in order, replayed offline
/// through the store of `setup` (None where the harness cannot size the
/// store's blocks, or with no store in the path: prefix cache off).
pub fn hit_ratio_blocks(setup: &Setup, work: &[Conversation]) -> anyhow::Result<Option<f64>> {
    let Some(block) = block_bytes(setup) else { return Ok(None) };
    if !setup.prefix_reads {
        return Ok(None);
    }
    let dram: bytesize::ByteSize =
        setup.store_dram.parse().map_err(|e| anyhow::anyhow!("store DRAM {:?}: {e}", setup.store_dram))?;
    let capacity = capacity_blocks(dram.as_u64(), block) as usize;
    let bt = setup.block_tokens.max(1) as usize;
    // Any salt: only equality of keys matters offline.
    let salt = KeySalt::new("offline", &setup.kv_dtype, bt);
    let requests: Vec<ServedRequest> = work
        .iter()
        .flat_map(|c| &c.turns)
        .map(|t| ServedRequest {
            keys: block_keys(salt, &t.prompt, bt).into_iter().map(|k| k.0).collect(),
            reusable: t.prompt.len().saturating_sub(1) / bt,
            // A one-token answer ends at prefill's first token.
            read_back: t.max_tokens > 1,
        })
        .collect();
    Ok(Some(serve(&requests, capacity, policy(setup)?).hit_ratio))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_counts_whole_aligned_blocks_per_segment() {
        let gib = 1u64 << 30;
        assert_eq!(capacity_blocks(64 << 20, 256 << 10), 256);
        assert_eq!(capacity_blocks(2 * gib, 256 << 10), 8192);
        // 100-byte blocks take 128 bytes each.
        assert_eq!(capacity_blocks(1 << 20, 100), (1 << 20) / 128);
        // A block never straddles two segments: 1.5 GiB of 700 MiB blocks
        // holds one per segment, not two.
        assert_eq!(capacity_blocks(gib + gib / 2, 700 << 20), 1);
    }
}
