//! Where each request runs (DESIGN.md §5): Mooncake's Algorithm 1 made
//! concrete, and the baseline policies it is compared with. Pure and
//! synchronous: the caller passes the clock and a view of the cluster, so
//! every decision can be replayed and unit-tested.
//!
//! KV-centric: for each prefill node `p`,
//! `TTFT(p) = queued work + prefill(uncached, cached) + prefix read time`;
//! the lowest wins. Then, for the decode nodes, the load they are
//! **predicted** to carry when that prefill ends (sequences assigned to
//! them join, running ones finish) plus this request gives a predicted
//! step time; the lowest within the TBT SLO with KV room wins. If the best
//! TTFT or TBT misses its SLO, the request is rejected at arrival.

pub mod cost;

pub use cost::{DecodeCost, PrefillCost};
use serde::{Deserialize, Serialize};

/// Service-level objectives of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tbt_ms: f64,
}

/// A prefill node as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct PrefillView {
    pub name: String,
    /// Alive and not draining.
    pub accepting: bool,
    /// Predicted time (ms) to finish the prefills already queued on it.
    pub queued_ms: f64,
    pub cost: PrefillCost,
    /// How fast it reads blocks from the store (bytes per ms).
    pub read_bytes_per_ms: f64,
}

/// One sequence on (or on its way to) a decode node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqLoad {
    /// Tokens in its KV when it joins (or now, if running).
    pub context: u32,
    /// Tokens it may still generate.
    pub remaining: u32,
    /// When it joins the batch (ms); at or before now if running.
    pub joins_at_ms: u64,
}

/// A decode node as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct DecodeView {
    pub name: String,
    pub accepting: bool,
    pub max_batch: u32,
    pub kv_capacity_tokens: u64,
    pub cost: DecodeCost,
    pub seqs: Vec<SeqLoad>,
}

/// What the scheduler knows of a request.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    pub block_tokens: u32,
    pub block_bytes: u64,
    /// Cached prefix blocks usable by each prefill node (same order as the
    /// prefill views).
    pub cached_blocks: Vec<u32>,
}

/// Which policy picks nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Mooncake's Algorithm 1 with early rejection (the default).
    #[default]
    KvCentric,
    Random,
    RoundRobin,
    /// Shortest prefill queue, smallest decode batch.
    LeastLoaded,
    /// Longest cached prefix, ignoring load.
    CacheAffinity,
}

/// Where a request goes and what the scheduler expects of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub prefill: usize,
    pub decode: usize,
    pub predicted_ttft_ms: f64,
    pub predicted_tbt_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Accept(Placement),
    /// Rejected before any work (HTTP 429 with `Retry-After`).
    Reject {
        reason: String,
        retry_after_ms: u64,
    },
}

/// The scheduler: a policy, the SLOs and the state of the simple policies.
#[derive(Debug, Clone)]
pub struct Scheduler {
    pub policy: PolicyKind,
    pub slo: Slo,
    /// Share of each SLO kept free for prediction error: a request is
    /// admitted only if its predictions are within `(1 - headroom)` of the
    /// SLOs (0 = trust the predictions exactly).
    pub headroom: f64,
    next_prefill: usize,
    next_decode: usize,
    rng: u64,
}

impl Scheduler {
    pub fn new(policy: PolicyKind, slo: Slo, seed: u64) -> Scheduler {
        Scheduler { policy, slo, headroom: 0.0, next_prefill: 0, next_decode: 0, rng: seed | 1 }
    }

    /// Places one request arriving at `now_ms`.
    pub fn schedule(
        &mut self,
        now_ms: u64,
        req: &RequestInfo,
        prefill: &[PrefillView],
        decode: &[DecodeView],
    ) -> Verdict {
        self.decide(now_ms, req, prefill, decode, true)
    }

    /// Places a request already accepted (again, after its node failed):
    /// the policy's choice without the SLO checks; refused only when no
    /// node can take it.
    pub fn place(&mut self, now_ms: u64, req: &RequestInfo, prefill: &[PrefillView], decode: &[DecodeView]) -> Verdict {
        self.decide(now_ms, req, prefill, decode, false)
    }

    fn decide(
        &mut self,
        now_ms: u64,
        req: &RequestInfo,
        prefill: &[PrefillView],
        decode: &[DecodeView],
        enforce_slo: bool,
    ) -> Verdict {
        let ttfts: Vec<f64> = prefill.iter().enumerate().map(|(i, p)| predicted_ttft(p, req, i)).collect();
        let live: Vec<usize> = (0..prefill.len()).filter(|&i| prefill[i].accepting).collect();
        if live.is_empty() {
            return reject("no prefill node is accepting work", 1000);
        }
        let p = match self.policy {
            PolicyKind::KvCentric => *live.iter().min_by(|&&a, &&b| ttfts[a].total_cmp(&ttfts[b])).expect("non-empty"),
            PolicyKind::Random => live[(self.random() % live.len() as u64) as usize],
            PolicyKind::RoundRobin => {
                self.next_prefill = self.next_prefill.wrapping_add(1);
                live[(self.next_prefill - 1) % live.len()]
            }
            PolicyKind::LeastLoaded => *live
                .iter()
                .min_by(|&&a, &&b| prefill[a].queued_ms.total_cmp(&prefill[b].queued_ms))
                .expect("non-empty"),
            PolicyKind::CacheAffinity => *live
                .iter()
                .max_by(|&&a, &&b| {
                    let hits = |i: usize| req.cached_blocks.get(i).copied().unwrap_or(0);
                    hits(a).cmp(&hits(b)).then(prefill[b].queued_ms.total_cmp(&prefill[a].queued_ms))
                })
                .expect("non-empty"),
        };
        let ttft = ttfts[p];
        let keep = 1.0 - self.headroom.clamp(0.0, 0.9);
        if enforce_slo && self.policy == PolicyKind::KvCentric && ttft > self.slo.ttft_ms * keep {
            return reject(
                &format!("predicted TTFT {ttft:.0} ms exceeds the SLO of {:.0} ms", self.slo.ttft_ms),
                (ttft - self.slo.ttft_ms).ceil() as u64,
            );
        }

        // Decode load when this prefill is predicted to end.
        let at = now_ms + ttft.ceil() as u64;
        match self.pick_decode(now_ms, at, req, decode) {
            Err(v) => v,
            Ok((_, step)) if enforce_slo && self.policy == PolicyKind::KvCentric && step > self.slo.tbt_ms * keep => {
                reject(&format!("predicted TBT {step:.1} ms exceeds the SLO of {:.1} ms", self.slo.tbt_ms), 1000)
            }
            Ok((d, step)) => {
                Verdict::Accept(Placement { prefill: p, decode: d, predicted_ttft_ms: ttft, predicted_tbt_ms: step })
            }
        }
    }

    /// Colocated mode (every worker prefills and decodes, vLLM-style): the
    /// policy's choice among the decode nodes for a request that joins now.
    /// No SLO rejection (the baseline has none); refused only when no node
    /// has room. `Placement::prefill` is the chosen node too.
    pub fn schedule_colocated(&mut self, now_ms: u64, req: &RequestInfo, decode: &[DecodeView]) -> Verdict {
        match self.pick_decode(now_ms, now_ms, req, decode) {
            Err(v) => v,
            Ok((d, step)) => {
                Verdict::Accept(Placement { prefill: d, decode: d, predicted_ttft_ms: 0.0, predicted_tbt_ms: step })
            }
        }
    }

    /// The decode node for a request joining at `at_ms`, with its predicted
    /// step time: lowest predicted TBT (kv-centric), or the simple
    /// policies' choice, among nodes with a batch slot and KV room.
    fn pick_decode(
        &mut self,
        now_ms: u64,
        at_ms: u64,
        req: &RequestInfo,
        decode: &[DecodeView],
    ) -> Result<(usize, f64), Verdict> {
        let loads: Vec<Option<(u32, u64)>> =
            decode.iter().map(|d| d.accepting.then(|| predicted_load(d, now_ms, at_ms))).collect();
        let need = req.prompt_tokens as u64 + 1;
        let fits = |i: usize| {
            loads[i].is_some_and(|(b, c)| b < decode[i].max_batch && c + need <= decode[i].kv_capacity_tokens)
        };
        let room: Vec<usize> = (0..decode.len()).filter(|&i| fits(i)).collect();
        if room.is_empty() {
            return Err(reject("no decode node has room for the request", 1000));
        }
        let tbt = |i: usize| {
            let (b, c) = loads[i].expect("has room");
            decode[i].cost.predict_ms(b + 1, c + need)
        };
        let d = match self.policy {
            PolicyKind::KvCentric => *room.iter().min_by(|&&a, &&b| tbt(a).total_cmp(&tbt(b))).expect("non-empty"),
            PolicyKind::Random => room[(self.random() % room.len() as u64) as usize],
            PolicyKind::RoundRobin => {
                self.next_decode = self.next_decode.wrapping_add(1);
                room[(self.next_decode - 1) % room.len()]
            }
            PolicyKind::LeastLoaded | PolicyKind::CacheAffinity => {
                *room.iter().min_by_key(|&&i| loads[i].expect("has room")).expect("non-empty")
            }
        };
        Ok((d, tbt(d)))
    }

    /// xorshift64: deterministic for a seed, so runs replay.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

fn reject(reason: &str, retry_after_ms: u64) -> Verdict {
    Verdict::Reject { reason: reason.to_owned(), retry_after_ms: retry_after_ms.max(1) }
}

/// Queue + compute of the uncached part + reading the cached prefix.
fn predicted_ttft(p: &PrefillView, req: &RequestInfo, i: usize) -> f64 {
    let bt = req.block_tokens.max(1);
    // At least the last prompt token is computed (its logits give the
    // first token).
    let usable = (req.prompt_tokens.saturating_sub(1) / bt).min(req.cached_blocks.get(i).copied().unwrap_or(0));
    let cached = usable * bt;
    let transfer = usable as f64 * req.block_bytes as f64 / p.read_bytes_per_ms.max(1e-9);
    p.queued_ms + p.cost.predict_ms(req.prompt_tokens - cached, cached) + transfer
}

/// `(batch, context tokens)` the node is predicted to hold at `at_ms`:
/// sequences that have joined by then, minus those predicted to have
/// finished, each grown by the tokens it will have generated.
fn predicted_load(d: &DecodeView, now_ms: u64, at_ms: u64) -> (u32, u64) {
    // Step time of the batch as if every sequence that joins by then were
    // decoding (an upper bound on how fast they progress: conservative).
    let joined: Vec<&SeqLoad> = d.seqs.iter().filter(|s| s.joins_at_ms <= at_ms).collect();
    let context: u64 = joined.iter().map(|s| s.context as u64).sum();
    let step = d.cost.predict_ms(joined.len() as u32, context).max(0.1);
    let (mut batch, mut context) = (0u32, 0u64);
    for s in &d.seqs {
        if s.joins_at_ms > at_ms {
            continue;
        }
        let decoding_ms = at_ms.saturating_sub(s.joins_at_ms.max(now_ms)) as f64;
        let generated = (decoding_ms / step) as u64;
        if generated >= s.remaining as u64 {
            continue;
        }
        batch += 1;
        context += s.context as u64 + generated;
    }
    (batch, context)
}

#[cfg(test)]
mod tests;
