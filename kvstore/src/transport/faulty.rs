//! [`FaultyTransport`]: wraps any transport and injects faults, so store
//! tests can check that every failure is a miss or a clean error.
//!
//! Faults are drawn from a seeded RNG (the seed is logged and kept in
//! [`Faults::seed`], `TANDEM_FAULT_SEED` replays it) under a config that
//! tests change at run time through a shared [`Faults`] handle:
//!
//! | fault       | unit  | effect                                                              |
//! |-------------|-------|---------------------------------------------------------------------|
//! | `partition` | batch | every op fails [`TransferError::Unreachable`]; the peer is not asked |
//! | `delay`     | batch | the batch waits `delay_ms` before it is forwarded                   |
//! | `drop`      | op    | the op fails [`TransferError::ConnectionLost`] and is not forwarded  |
//! | `corrupt`   | op    | one byte flipped: in the caller's buffer after a successful read, in the bytes sent for a write; the op still reports success, so the block checksum must catch it |

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{BoxFuture, ReadOp, TransferError, Transport, TransportKind, WriteOp};

/// Probabilities (each in `0.0..=1.0`; out-of-range values are clamped) of
/// each fault; all zero injects nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    /// Per op: fail with `ConnectionLost` instead of forwarding.
    pub drop: f64,
    /// Per batch: sleep `delay_ms` first.
    pub delay: f64,
    pub delay_ms: u64,
    /// Per op: flip one byte of the data.
    pub corrupt: f64,
    /// Per batch: fail every op with `Unreachable` (1.0 = partitioned).
    pub partition: f64,
}

/// How many faults have been injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub dropped: u64,
    pub delayed: u64,
    pub corrupted: u64,
    pub partitioned: u64,
}

/// Shared, run-time changeable fault settings and RNG; clones share state.
#[derive(Debug, Clone)]
pub struct Faults {
    seed: u64,
    state: Arc<Mutex<FaultState>>,
}

#[derive(Debug)]
struct FaultState {
    cfg: FaultConfig,
    rng: StdRng,
    stats: FaultStats,
}

/// The faults drawn for one batch.
#[derive(Debug)]
struct Plan {
    partitioned: bool,
    delay: Option<Duration>,
    dropped: Vec<bool>,
    /// Per op: where to flip a byte (taken modulo the op's length).
    corrupt_at: Vec<Option<usize>>,
}

fn chance(rng: &mut StdRng, p: f64) -> bool {
    // NaN compares false, so it injects nothing.
    rng.random::<f64>() < p.clamp(0.0, 1.0)
}

impl Faults {
    /// Faults drawn from `seed`, initially none.
    pub fn new(seed: u64) -> Faults {
        tracing::info!(seed, "fault injection seeded");
        Faults {
            seed,
            state: Arc::new(Mutex::new(FaultState {
                cfg: FaultConfig::default(),
                rng: StdRng::seed_from_u64(seed),
                stats: FaultStats::default(),
            })),
        }
    }

    /// Seeded from `TANDEM_FAULT_SEED` when set, else randomly; prints the
    /// seed to stderr so a failing test can be replayed.
    pub fn from_env_or_random() -> Faults {
        let seed = std::env::var("TANDEM_FAULT_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(rand::random::<u64>);
        eprintln!("fault injection seed: {seed} (TANDEM_FAULT_SEED={seed} replays it)");
        Faults::new(seed)
    }

    /// The seed the RNG started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Replaces the fault config; takes effect from the next batch.
    pub fn set(&self, cfg: FaultConfig) {
        self.state.lock().cfg = cfg;
    }

    /// Changes the fault config in place.
    pub fn update(&self, f: impl FnOnce(&mut FaultConfig)) {
        f(&mut self.state.lock().cfg);
    }

    /// Stops injecting faults.
    pub fn heal(&self) {
        self.set(FaultConfig::default());
    }

    /// The current config.
    pub fn config(&self) -> FaultConfig {
        self.state.lock().cfg.clone()
    }

    /// Faults injected so far.
    pub fn stats(&self) -> FaultStats {
        self.state.lock().stats
    }

    /// Draws every fault of a batch of `n` ops, in a fixed order so a seed
    /// replays the same faults for the same sequence of batches.
    fn plan(&self, n: usize) -> Plan {
        let mut guard = self.state.lock();
        let FaultState { cfg, rng, stats } = &mut *guard;
        let partitioned = chance(rng, cfg.partition);
        let delay = chance(rng, cfg.delay).then(|| Duration::from_millis(cfg.delay_ms));
        let mut dropped = Vec::with_capacity(n);
        let mut corrupt_at = Vec::with_capacity(n);
        for _ in 0..n {
            dropped.push(chance(rng, cfg.drop));
            let corrupt = chance(rng, cfg.corrupt);
            let at = rng.random::<u64>() as usize;
            corrupt_at.push(corrupt.then_some(at));
        }
        if partitioned {
            stats.partitioned += 1;
        } else {
            stats.delayed += u64::from(delay.is_some());
            stats.dropped += dropped.iter().filter(|&&d| d).count() as u64;
        }
        Plan { partitioned, delay, dropped, corrupt_at }
    }

    fn count_corruption(&self) {
        self.state.lock().stats.corrupted += 1;
    }
}

/// A transport that injects the faults of a [`Faults`] handle into an
/// inner transport's batches.
#[derive(Debug)]
pub struct FaultyTransport {
    inner: Arc<dyn Transport>,
    faults: Faults,
}

impl FaultyTransport {
    /// Wraps `inner`; change `faults` (a clone) to inject.
    pub fn new(inner: Arc<dyn Transport>, faults: Faults) -> FaultyTransport {
        FaultyTransport { inner, faults }
    }

    /// The shared fault handle.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
}

fn partitioned() -> TransferError {
    TransferError::Unreachable("fault injection: partitioned".to_owned())
}

fn dropped() -> TransferError {
    TransferError::ConnectionLost("fault injection: dropped".to_owned())
}

fn missing() -> TransferError {
    TransferError::Protocol("inner transport returned too few results".to_owned())
}

impl Transport for FaultyTransport {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn read<'a>(&'a self, ops: &'a mut [ReadOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(async move {
            let plan = self.faults.plan(ops.len());
            if plan.partitioned {
                return vec![Err(partitioned()); ops.len()];
            }
            if let Some(d) = plan.delay {
                tokio::time::sleep(d).await;
            }
            let mut results = vec![Err(dropped()); ops.len()];
            let (mut index, mut forwarded) = (Vec::new(), Vec::new());
            for (i, op) in ops.iter_mut().enumerate() {
                if !plan.dropped[i] {
                    index.push(i);
                    forwarded.push(ReadOp::new(op.src, &mut *op.dst));
                }
            }
            let mut inner = self.inner.read(&mut forwarded).await.into_iter();
            let mut sums = vec![None; plan.dropped.len()];
            for (op, &i) in forwarded.iter_mut().zip(&index) {
                let result = inner.next().unwrap_or_else(|| Err(missing()));
                if let (Ok(()), Some(at), false) = (&result, plan.corrupt_at[i], op.dst.is_empty()) {
                    let at = at % op.dst.len();
                    op.dst[at] ^= 0xff;
                    self.faults.count_corruption();
                } else {
                    // Bytes left as the inner transport hashed them.
                    sums[i] = op.checksum;
                }
                results[i] = result;
            }
            drop(forwarded);
            for (op, sum) in ops.iter_mut().zip(sums) {
                op.checksum = sum;
            }
            results
        })
    }

    fn write<'a>(&'a self, ops: &'a [WriteOp<'_>]) -> BoxFuture<'a, Vec<Result<(), TransferError>>> {
        Box::pin(async move {
            let plan = self.faults.plan(ops.len());
            if plan.partitioned {
                return vec![Err(partitioned()); ops.len()];
            }
            if let Some(d) = plan.delay {
                tokio::time::sleep(d).await;
            }
            // Corrupted payloads are copies; the caller's bytes are never touched.
            let corrupted: Vec<Option<Vec<u8>>> = ops
                .iter()
                .zip(plan.corrupt_at.iter().zip(&plan.dropped))
                .map(|(op, (at, &dropped))| match at {
                    Some(at) if !dropped && !op.src.is_empty() => {
                        let mut copy = op.src.to_vec();
                        let at = at % copy.len();
                        copy[at] ^= 0xff;
                        self.faults.count_corruption();
                        Some(copy)
                    }
                    _ => None,
                })
                .collect();
            let mut results = vec![Err(dropped()); ops.len()];
            let (mut index, mut forwarded) = (Vec::new(), Vec::new());
            for (i, op) in ops.iter().enumerate() {
                if !plan.dropped[i] {
                    index.push(i);
                    let src = corrupted[i].as_deref().unwrap_or(op.src);
                    forwarded.push(WriteOp { dst: op.dst, src, grant: op.grant });
                }
            }
            let mut inner = self.inner.write(&forwarded).await.into_iter();
            for &i in &index {
                results[i] = inner.next().unwrap_or_else(|| Err(missing()));
            }
            results
        })
    }
}
