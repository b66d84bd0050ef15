//! Pluggable eviction: which resident block of a tier goes when space is needed.
//!
//! The master keeps one [`EvictionPolicy`] per node per tier and tells it
//! what happens to blocks (inserted, read, removed); when the tier is full it
//! asks for a victim, passing a predicate that rules out blocks that must stay
//! (leased for a read, pinned, being written). Policies know nothing of bytes
//! or capacity: the caller decides *when* to evict, the policy decides *what*.
//!
//! - [`lru`] — least recently used; the baseline.
//! - [`s3fifo`] — S3-FIFO (SOSP'23): small + main FIFO with a ghost queue.
//! - [`arc`] — ARC (FAST'03): recency/frequency lists with adaptive split.
//!
//! [`PolicyKind::DEFAULT`] is ARC: it is scan-resistant, needs no tuning,
//! and on the Mooncake synthetic trace it had the best prefix-hit ratio of
//! the three at 1k and 10k blocks and tied S3-FIFO at 30k, all above LRU
//! (`tests/eviction_trace.rs` checks this and prints the table).

mod list;

pub mod arc;
pub mod lru;
pub mod s3fifo;

use std::fmt;
use std::hash::Hash;
use std::str::FromStr;

pub use self::arc::ArcPolicy;
pub use self::lru::Lru;
pub use self::s3fifo::S3Fifo;

/// Chooses victims among the resident blocks of one tier.
///
/// Calls are single-threaded (the owner serialises them); implementations
/// bound their own memory by the number of resident keys.
pub trait EvictionPolicy<K: Copy + Eq + Hash>: Send + fmt::Debug {
    /// The policy's configuration name (see [`PolicyKind::name`]).
    fn name(&self) -> &'static str;
    /// `key` became resident (a new block). Inserting a resident key is a touch.
    fn insert(&mut self, key: K);
    /// `key` was read (a hit). Unknown keys are ignored.
    fn touch(&mut self, key: &K);
    /// `key` left by other means (removed, dropped with its node). Unknown keys are ignored.
    fn remove(&mut self, key: &K);
    /// Picks a victim and forgets it. Keys for which `evictable` returns false (leased, pinned,
    /// being written) must be skipped and stay resident with their standing unchanged as far as
    /// the algorithm allows. None when nothing is evictable.
    fn evict(&mut self, evictable: &mut dyn FnMut(&K) -> bool) -> Option<K>;
    /// Number of resident keys.
    fn len(&self) -> usize;
    /// No key is resident.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The eviction policies a tier can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Least recently used.
    Lru,
    /// S3-FIFO: small/main/ghost FIFOs.
    S3Fifo,
    /// Adaptive Replacement Cache.
    Arc,
}

impl PolicyKind {
    /// The policy a tier gets unless configured otherwise.
    pub const DEFAULT: PolicyKind = PolicyKind::Arc;

    /// Every policy, baseline first.
    pub const ALL: &'static [PolicyKind] = &[PolicyKind::Lru, PolicyKind::S3Fifo, PolicyKind::Arc];

    /// A fresh, empty policy of this kind.
    pub fn build<K: Copy + Eq + Hash + Send + fmt::Debug + 'static>(self) -> Box<dyn EvictionPolicy<K>> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new()),
            PolicyKind::S3Fifo => Box::new(S3Fifo::new()),
            PolicyKind::Arc => Box::new(ArcPolicy::new()),
        }
    }

    /// The name used in configuration files and reports (as serialized).
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::S3Fifo => "s3-fifo",
            PolicyKind::Arc => "arc",
        }
    }
}

impl Default for PolicyKind {
    fn default() -> Self {
        PolicyKind::DEFAULT
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name that is not one of [`PolicyKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction policy `{given}`; valid policies: {}", valid_names())]
pub struct UnknownPolicy {
    /// The name that was asked for.
    pub given: String,
}

fn valid_names() -> String {
    PolicyKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
}

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| UnknownPolicy { given: s.to_owned() })
    }
}

/// The conformance suite: every test runs against every [`PolicyKind`].
#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn drain(p: &mut dyn EvictionPolicy<u32>) -> Vec<u32> {
        std::iter::from_fn(|| p.evict(&mut |_| true)).collect()
    }

    #[test]
    fn names_round_trip() {
        for &kind in PolicyKind::ALL {
            assert_eq!(kind.name().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(kind.build::<u32>().name(), kind.name());
            assert_eq!(serde_json::to_string(&kind).ok(), Some(format!("\"{kind}\"")));
        }
        let err = "lfu".parse::<PolicyKind>().err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("unknown eviction policy `lfu`; valid policies: lru, s3-fifo, arc"));
        assert_eq!(PolicyKind::default(), PolicyKind::DEFAULT);
    }

    #[test]
    fn every_key_is_evicted_exactly_once() {
        for &kind in PolicyKind::ALL {
            let mut p = kind.build::<u32>();
            assert!(p.is_empty());
            for k in 0..100 {
                p.insert(k);
                if k % 3 == 0 {
                    p.touch(&k);
                }
            }
            for k in 0..10 {
                p.insert(k); // a touch: no new key
            }
            assert_eq!(p.len(), 100, "{kind}");
            let mut got = drain(p.as_mut());
            got.sort_unstable();
            assert_eq!(got, (0..100).collect::<Vec<_>>(), "{kind}");
            assert!(p.is_empty(), "{kind}");
            assert_eq!(p.evict(&mut |_| true), None, "{kind}");
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        for &kind in PolicyKind::ALL {
            let mut p = kind.build::<u32>();
            p.touch(&7);
            p.remove(&7);
            assert!(p.is_empty(), "{kind}");
            p.insert(1);
            p.touch(&7);
            p.remove(&7);
            assert_eq!(p.len(), 1, "{kind}");
            assert_eq!(drain(p.as_mut()), vec![1], "{kind}");
        }
    }

    #[test]
    fn removed_keys_are_never_victims() {
        for &kind in PolicyKind::ALL {
            let mut p = kind.build::<u32>();
            for k in 0..10 {
                p.insert(k);
            }
            p.remove(&0);
            p.remove(&5);
            p.remove(&5);
            assert_eq!(p.len(), 8, "{kind}");
            let got: HashSet<u32> = drain(p.as_mut()).into_iter().collect();
            assert_eq!(got, [1, 2, 3, 4, 6, 7, 8, 9].into_iter().collect(), "{kind}");
        }
    }

    #[test]
    fn non_evictable_keys_are_skipped_and_stay() {
        for &kind in PolicyKind::ALL {
            let mut p = kind.build::<u32>();
            for k in 0..20 {
                p.insert(k);
                if k % 2 == 0 {
                    p.touch(&k);
                }
            }
            let pinned = |k: &u32| k.is_multiple_of(4);
            let mut got = Vec::new();
            while let Some(k) = p.evict(&mut |k| !pinned(k)) {
                assert!(!pinned(&k), "{kind} evicted pinned key {k}");
                got.push(k);
            }
            assert_eq!(got.len(), 15, "{kind}");
            assert_eq!(p.len(), 5, "{kind}");
            let mut rest = drain(p.as_mut());
            rest.sort_unstable();
            assert_eq!(rest, vec![0, 4, 8, 12, 16], "{kind}");
        }
    }

    /// Random operations against a model of the resident set: victims are
    /// resident and evictable, `None` only when no resident key is evictable.
    #[test]
    fn random_operations_keep_the_resident_set() {
        let seed = std::env::var("TANDEM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x00c0_ffeeu64);
        println!("seed {seed}");
        for &kind in PolicyKind::ALL {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut p = kind.build::<u32>();
            let mut model = HashSet::new();
            for step in 0..50_000 {
                let key = rng.random_range(0..300u32);
                match rng.random_range(0..10) {
                    0..=3 => {
                        p.insert(key);
                        model.insert(key);
                    }
                    4..=5 => p.touch(&key),
                    6 => {
                        p.remove(&key);
                        model.remove(&key);
                    }
                    _ => {
                        let m = rng.random_range(1..6u32);
                        let evictable = |k: &u32| !k.is_multiple_of(m) || m == 1;
                        match p.evict(&mut |k| evictable(k)) {
                            Some(k) => {
                                assert!(evictable(&k), "{kind} seed {seed} step {step}: pinned {k}");
                                assert!(model.remove(&k), "{kind} seed {seed} step {step}: {k} not resident");
                            }
                            None => assert!(
                                !model.iter().any(evictable),
                                "{kind} seed {seed} step {step}: nothing evicted, but some key could be"
                            ),
                        }
                    }
                }
                assert_eq!(p.len(), model.len(), "{kind} seed {seed} step {step}");
            }
        }
    }

    /// A hot working set read repeatedly, then one pass over ten times the
    /// capacity of never-repeated keys. Returns how many hot keys were evicted.
    fn hot_keys_lost_to_scan(kind: PolicyKind) -> usize {
        const CAPACITY: usize = 100;
        let mut p = kind.build::<u32>();
        let hot = 0..50u32;
        for _ in 0..3 {
            for k in hot.clone() {
                p.insert(k);
            }
        }
        let mut lost = 0;
        for k in 1_000..1_000 + 10 * CAPACITY as u32 {
            p.insert(k);
            while p.len() > CAPACITY {
                match p.evict(&mut |_| true) {
                    Some(v) if hot.contains(&v) => lost += 1,
                    Some(_) => {}
                    None => unreachable!("every key is evictable"),
                }
            }
        }
        lost
    }

    #[test]
    fn scan_does_not_flush_hot_set() {
        assert_eq!(hot_keys_lost_to_scan(PolicyKind::DEFAULT), 0);
        assert_eq!(hot_keys_lost_to_scan(PolicyKind::S3Fifo), 0);
        assert_eq!(hot_keys_lost_to_scan(PolicyKind::Arc), 0);
        // The test can fail: LRU is flushed.
        assert_eq!(hot_keys_lost_to_scan(PolicyKind::Lru), 50);
    }
}
