//! The decode engine thread: a paged KV pool and the continuous batch.
//!
//! Each loop turn takes in new admissions (their blocks already read by
//! the service, off this thread; a colocated request's from the local
//! cache, here), admits as many as pages and `max_batch` allow, preempts
//! when the running batch would outgrow the pool, runs one forward pass
//! for every running sequence and streams each new token. A sequence with
//! more than its next token to compute (a colocated prompt, blocks the
//! store lost) rides in the same passes, in chunks under `chunk_tokens`,
//! and samples when its chunk reaches the last token.

use crate::local_cache::LocalCache;
use crate::wire;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_kvstore::client::{PutOutcome, StoreClient};
use tandem_model::engine::FinishReason;
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, SeqKv};
use tandem_model::sampling::Sampler;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::{self as pb};
use tandem_proto::{block_keys, BlockKey, KeySalt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tonic::Status;

/// Where a sequence's events go.
pub type EventSender = mpsc::UnboundedSender<Result<pb::GenerateEvent, Status>>;

/// Per-request counters, reported when it finishes.
#[derive(Debug, Default, Clone)]
pub struct RequestStats {
    pub fetched_blocks: u32,
    pub recomputed_tokens: u32,
    pub written_back: Arc<AtomicU64>,
    pub preemptions: u32,
    pub fetch: Duration,
}

/// Where a sequence came from, which decides where its blocks live.
#[derive(Debug)]
pub enum Origin {
    /// Handed off by a prefill node: its blocks come from the store and
    /// blocks that fill go back to it.
    Handoff,
    /// A colocated `Generate`: this node computes the prompt, reading and
    /// filling its own prefix cache; the store is never touched.
    Colocated(PromptStats),
}

/// A colocated request's prompt phase, reported in its `Prefilled` event.
#[derive(Debug)]
pub struct PromptStats {
    pub enqueued: Instant,
    /// When it was first admitted (its prompt began computing).
    pub started: Option<Instant>,
    /// Prompt blocks taken from the local cache.
    pub cached_blocks: u32,
    /// Prompt tokens computed by forward passes.
    pub computed_tokens: u32,
}

impl PromptStats {
    pub fn new() -> PromptStats {
        PromptStats { enqueued: Instant::now(), started: None, cached_blocks: 0, computed_tokens: 0 }
    }
}

impl Default for PromptStats {
    fn default() -> Self {
        Self::new()
    }
}

/// A sequence ready to (re)join the batch.
#[derive(Debug)]
pub struct Admission {
    pub id: String,
    /// Every token so far (prompt, then generated). The KV holds a prefix
    /// of them; the forward passes compute the rest, in chunks, and the
    /// one that reaches the last token samples the next. A decoding
    /// sequence's KV covers all but the last; a colocated request's prompt
    /// starts with none of it (less what the local cache has).
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub sampler: Sampler,
    /// Keys of the leading full blocks to read back (from the store for a
    /// handoff, from the local cache for a colocated request), in order.
    pub keys: Vec<BlockKey>,
    /// The salt of its keys: the node's, for the request's tenant.
    pub salt: KeySalt,
    /// The leading blocks read from the store.
    pub fetched: Vec<Vec<u8>>,
    /// The KV's last partial block (whole-page bytes; its first
    /// `partial_tokens` slots are valid), usable when every block of
    /// `keys` was read back; empty when none.
    pub partial: Vec<u8>,
    pub partial_tokens: usize,
    pub origin: Origin,
    pub out: EventSender,
    pub stats: RequestStats,
}

impl Admission {
    /// A colocated request whose prompt is still to compute (no token
    /// sampled yet).
    fn in_prompt(&self) -> bool {
        matches!(self.origin, Origin::Colocated(_)) && self.tokens.len() == self.prompt_len
    }
}

/// Blocks read per store call while prefetching.
const FETCH_BATCH: usize = 16;

/// Paces prefetch so it yields to decoding: fetches run one batch at a
/// time across the whole node, and while sequences are decoding each batch
/// is followed by a pause that keeps prefetch to `duty` of the wall clock
/// (on a CPU node the copy and checksum compete with the forward pass for
/// cores). With nothing decoding, fetches run flat out.
#[derive(Debug)]
pub struct Pacer {
    turn: tokio::sync::Mutex<()>,
    duty: f64,
    stats: Arc<EngineStats>,
}

impl Pacer {
    pub fn new(duty: f64, stats: Arc<EngineStats>) -> Pacer {
        Pacer { turn: tokio::sync::Mutex::new(()), duty: duty.clamp(0.01, 1.0), stats }
    }
}

/// Reads `a`'s leading blocks from the store (any failure is a miss; the
/// engine recomputes what is missing), in paced batches.
pub async fn fetch(store: Option<&StoreClient>, a: &mut Admission, block_bytes: usize, pacer: &Pacer) {
    let Some(store) = store else { return };
    let started = Instant::now();
    let mut asked = 0;
    while a.fetched.len() == asked && asked < a.keys.len() {
        let keys = &a.keys[asked..(asked + FETCH_BATCH).min(a.keys.len())];
        asked += keys.len();
        let turn = pacer.turn.lock().await;
        let busy = Instant::now();
        match store.get(keys, block_bytes).await {
            // A miss ends the usable prefix: the loop stops after it.
            Ok(blocks) => a.fetched.extend(blocks.into_iter().map_while(|b| b.filter(|b| b.len() == block_bytes))),
            Err(e) => tracing::warn!(request = %a.id, "store read failed; recomputing: {e}"),
        }
        let busy = busy.elapsed();
        if pacer.duty < 1.0 && pacer.stats.batch_size.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(busy.mul_f64(1.0 / pacer.duty - 1.0)).await;
        }
        drop(turn);
    }
    a.stats.fetch += started.elapsed();
    a.stats.fetched_blocks += a.fetched.len() as u32;
}

/// What the engine reports (read by the status RPC).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub batch_size: AtomicU64,
    /// Tokens in the KV of the running batch (summed over its sequences),
    /// as of the last step.
    pub context_tokens: AtomicU64,
    pub waiting: AtomicU64,
    pub free_pages: AtomicU64,
    /// Exponentially weighted mean step time (ns).
    pub step_ns: AtomicU64,
    pub steps: AtomicU64,
    /// Time spent in forward passes (ns).
    pub compute_ns: AtomicU64,
    pub completed: AtomicU64,
    pub generated: AtomicU64,
    pub fetched_blocks: AtomicU64,
    pub recomputed_tokens: AtomicU64,
    pub written_back: AtomicU64,
    pub writebacks_in_flight: AtomicU64,
    pub preemptions: AtomicU64,
    /// Prompt blocks colocated requests took from the local cache.
    pub local_cache_hits: AtomicU64,
    /// Blocks the local cache holds now.
    pub local_cache_blocks: AtomicU64,
}

struct Running {
    a: Admission,
    seq: SeqKv,
    /// Leading full blocks already where they belong (the store for a
    /// handoff, the local cache for a colocated request): those past them
    /// are put there as they fill.
    published: usize,
}

/// The engine: run it on its own thread with [`DecodeEngine::run`].
#[derive(Debug)]
pub struct DecodeEngine {
    pub name: String,
    pub model: Model,
    pub cache: KvCache,
    pub salt: KeySalt,
    pub max_batch: usize,
    pub chunk_tokens: usize,
    pub store: Option<Arc<StoreClient>>,
    pub write_back: bool,
    pub rt: Handle,
    pub stats: Arc<EngineStats>,
    pub rx: Receiver<Admission>,
    /// Preempted sequences go back through here after a fresh fetch.
    pub resubmit: Sender<Admission>,
    /// Set when the node shuts down: the engine exits once idle.
    pub draining: Arc<AtomicBool>,
    pub pacer: Arc<Pacer>,
    /// Colocated requests' prefix cache.
    pub local: LocalCache,
}

impl DecodeEngine {
    pub fn run(mut self) {
        let mut waiting: VecDeque<Admission> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        loop {
            if waiting.is_empty() && running.is_empty() {
                self.publish(&waiting, &running);
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(a) => waiting.push_back(a),
                    Err(RecvTimeoutError::Timeout) => {
                        if self.draining.load(Ordering::Relaxed) && self.rx.is_empty() {
                            return;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            waiting.extend(self.rx.try_iter());
            waiting.retain(|a| !a.out.is_closed());
            running.retain_mut(|r| {
                if r.a.out.is_closed() {
                    tracing::debug!(request = %r.a.id, "caller went away; cancelled");
                    self.cache.release(std::mem::take(&mut r.seq));
                    false
                } else {
                    true
                }
            });
            while running.len() < self.max_batch {
                let Some(front) = waiting.front() else { break };
                // Pages for everything it computes before it samples.
                let need = self.cache.pages_for(front.tokens.len());
                if need > self.cache.num_pages() {
                    let Some(a) = waiting.pop_front() else { break };
                    let msg = format!("the sequence needs {need} KV pages; this node has {}", self.cache.num_pages());
                    let _ = a.out.send(Err(Status::resource_exhausted(msg)));
                    continue;
                }
                if need > self.cache.free_pages() {
                    break;
                }
                let Some(a) = waiting.pop_front() else { break };
                running.extend(self.admit(a));
            }
            self.publish(&waiting, &running);
            if !running.is_empty() {
                self.step(&mut running);
            }
        }
    }

    fn publish(&self, waiting: &VecDeque<Admission>, running: &[Running]) {
        self.publish_batch(running);
        self.stats.waiting.store(waiting.len() as u64, Ordering::Relaxed);
        self.stats.local_cache_blocks.store(self.local.len() as u64, Ordering::Relaxed);
    }

    /// The running batch's size, KV tokens and the pool's free pages.
    fn publish_batch(&self, running: &[Running]) {
        let context: usize = running.iter().map(|r| r.seq.len()).sum();
        self.stats.batch_size.store(running.len() as u64, Ordering::Relaxed);
        self.stats.context_tokens.store(context as u64, Ordering::Relaxed);
        self.stats.free_pages.store(self.cache.free_pages() as u64, Ordering::Relaxed);
    }

    fn block_tokens(&self) -> usize {
        self.cache.geometry().page_tokens
    }

    /// Puts `a`'s KV in pages: its leading blocks (fetched from the store
    /// for a handoff, found in the local cache for a colocated request),
    /// then its partial block, and reserves pages for the rest, which the
    /// steps compute. At least the last token is always left to compute:
    /// its logits give the next token. On failure the caller gets the
    /// error and nothing stays allocated.
    fn admit(&mut self, mut a: Admission) -> Option<Running> {
        let bt = self.block_tokens();
        let most = (a.tokens.len() - 1) / bt;
        let mut seq = SeqKv::default();
        let in_prompt = a.in_prompt();
        match &mut a.origin {
            Origin::Handoff => {
                a.fetched.truncate(most);
                let views: Vec<&[u8]> = a.fetched.iter().map(Vec::as_slice).collect();
                if let Err(e) = self.cache.append_blocks(&mut seq, &views) {
                    tracing::warn!(request = %a.id, "fetched blocks unusable; recomputing: {e}");
                }
                self.stats.fetched_blocks.fetch_add(a.stats.fetched_blocks as u64, Ordering::Relaxed);
            }
            Origin::Colocated(p) => {
                p.started.get_or_insert_with(Instant::now);
                let views = self.local.prefix(&a.keys);
                let whole = views.len().min(most);
                let mut hits = match self.cache.append_blocks(&mut seq, &views[..whole]) {
                    Ok(()) => whole,
                    Err(e) => {
                        tracing::warn!(request = %a.id, "local blocks unusable; computing them: {e}");
                        0
                    }
                };
                // A prompt of whole blocks, every one held: the last block
                // goes in but for its last token, which is all that is
                // computed.
                if hits == most && views.len() > most && bt > 1 {
                    match self.cache.append_partial(&mut seq, views[most], bt - 1) {
                        Ok(()) => hits += 1,
                        Err(e) => tracing::warn!(request = %a.id, "local block unusable; computing it: {e}"),
                    }
                }
                self.stats.local_cache_hits.fetch_add(hits as u64, Ordering::Relaxed);
                if in_prompt {
                    p.cached_blocks += hits as u32;
                }
            }
        }
        a.fetched = Vec::new();
        let partial_fits = seq.len() + a.partial_tokens < a.tokens.len();
        if seq.len() == a.keys.len() * bt && a.partial_tokens > 0 && !a.partial.is_empty() && partial_fits {
            if let Err(e) = self.cache.append_partial(&mut seq, &a.partial, a.partial_tokens) {
                tracing::warn!(request = %a.id, "partial block unusable; recomputing: {e}");
            }
        }
        a.partial = Vec::new();
        a.partial_tokens = 0;
        // Admission counted these pages as taken; holding them keeps the
        // next admissions honest while the prompt computes chunk by chunk.
        if let Err(e) = self.cache.reserve(&mut seq, a.tokens.len()) {
            self.cache.release(seq);
            let _ = a.out.send(Err(Status::resource_exhausted(format!("KV pages for the sequence: {e}"))));
            return None;
        }
        let published = match a.origin {
            Origin::Handoff => a.keys.len(),
            Origin::Colocated(_) => seq.len() / bt,
        };
        Some(Running { a, seq, published })
    }

    /// Preempts the most recently admitted sequence: its pages go back to
    /// the pool; its full blocks are (or are being) in the store or the
    /// local cache and its partial block is kept, so it re-joins after a
    /// fetch (a colocated one at once: its blocks are on this node).
    fn preempt(&mut self, mut r: Running) {
        let bt = self.block_tokens();
        let kv_len = r.seq.len();
        let full = kv_len / bt;
        r.a.keys = block_keys(r.a.salt, &r.a.tokens[..full * bt], bt);
        r.a.partial_tokens = kv_len % bt;
        r.a.partial = if r.a.partial_tokens > 0 {
            r.seq
                .block_table()
                .get(full)
                .and_then(|&p| self.cache.page_bytes(p).ok())
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.cache.release(std::mem::take(&mut r.seq));
        r.a.stats.preemptions += 1;
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(request = %r.a.id, tokens = kv_len, "preempted (pages exhausted)");
        let mut a = r.a;
        if let Origin::Colocated(_) = a.origin {
            let _ = self.resubmit.send(a);
            return;
        }
        let store = self.store.clone();
        let back = self.resubmit.clone();
        let block_bytes = self.cache.block_bytes();
        let pacer = self.pacer.clone();
        self.rt.spawn(async move {
            fetch(store.as_deref(), &mut a, block_bytes, &pacer).await;
            let _ = back.send(a);
        });
    }

    /// Tokens each running sequence computes in the next step (0: none):
    /// one for a decoding sequence; for the others (a prompt, or blocks
    /// the store lost) chunks sharing `chunk_tokens`, oldest first.
    fn plan(&self, running: &[Running]) -> Vec<usize> {
        let mut budget = self.chunk_tokens;
        running
            .iter()
            .map(|r| match r.a.tokens.len() - r.seq.len() {
                1 => 1,
                pending => {
                    let take = pending.min(budget);
                    budget -= take;
                    take
                }
            })
            .collect()
    }

    /// One forward pass over every running sequence's planned tokens; each
    /// that reaches its last token samples the next.
    fn step(&mut self, running: &mut Vec<Running>) {
        // Make room for the planned tokens by preempting the youngest
        // (never the last one standing).
        let plan = loop {
            let plan = self.plan(running);
            let need: usize = running
                .iter()
                .zip(&plan)
                .map(|(r, &take)| self.cache.pages_for(r.seq.len() + take).saturating_sub(r.seq.block_table().len()))
                .sum();
            if need <= self.cache.free_pages() {
                break plan;
            }
            let Some(victim) = running.pop() else { break plan };
            if running.is_empty() {
                let msg = "the KV pool is exhausted by a single sequence";
                let _ = victim.a.out.send(Err(Status::resource_exhausted(msg)));
                self.cache.release(victim.seq);
                return;
            }
            self.preempt(victim);
        };
        let chunked = plan.iter().any(|&take| take > 1);
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(running.len());
        for (r, &take) in running.iter_mut().zip(&plan).filter(|(_, take)| **take > 0) {
            let (start, end) = (r.seq.len(), r.seq.len() + take);
            let logits = if end == r.a.tokens.len() { Logits::Last } else { Logits::None };
            steps.push(Step { tokens: &r.a.tokens[start..end], seq: &mut r.seq, logits });
        }
        let started = Instant::now();
        let result = self.model.forward(&mut self.cache, &mut steps);
        drop(steps);
        self.stats.compute_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // The step time reported is a decode step's: passes carrying prompt
        // chunks would skew the scheduler's step-time model.
        if !chunked {
            let took = started.elapsed().as_nanos() as u64;
            let old = self.stats.step_ns.load(Ordering::Relaxed);
            let ewma = if old == 0 { took } else { (old * 7 + took * 3) / 10 };
            self.stats.step_ns.store(ewma, Ordering::Relaxed);
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    let _ = r.a.out.send(Err(Status::internal(format!("forward pass failed: {e}"))));
                    self.cache.release(r.seq);
                }
                return;
            }
        };
        // The forward pass returns one row per sequence that took tokens;
        // a short result leaves the rest for the next step.
        let took: Vec<(usize, Vec<f32>)> =
            plan.iter().enumerate().filter(|(_, take)| **take > 0).map(|(i, _)| i).zip(logits).collect();
        for &(i, _) in &took {
            self.count_computed(&mut running[i], plan[i]);
            self.publish_blocks(&mut running[i]);
        }
        // The status counts the KV behind a token before the token leaves.
        self.publish_batch(running);
        let mut done = Vec::new();
        for (i, logits) in took {
            let r = &mut running[i];
            if r.seq.len() == r.a.tokens.len() && !self.next_token(r, &logits) {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let r = running.remove(i);
            self.cache.release(r.seq);
        }
    }

    /// Books the `take` tokens a step just computed for `r`: a colocated
    /// prompt's are computed, the rest but a decode step's input token are
    /// recomputed.
    fn count_computed(&mut self, r: &mut Running, take: usize) {
        let in_prompt = r.a.in_prompt();
        if let (Origin::Colocated(p), true) = (&mut r.a.origin, in_prompt) {
            p.computed_tokens += take as u32;
            return;
        }
        let end = r.seq.len();
        let recomputed = end.min(r.a.tokens.len() - 1) - (end - take);
        if recomputed > 0 {
            r.a.stats.recomputed_tokens += recomputed as u32;
            self.stats.recomputed_tokens.fetch_add(recomputed as u64, Ordering::Relaxed);
        }
    }

    /// Samples `r`'s next token from `logits` and streams it (after the
    /// `Prefilled` event when it ends a colocated prompt). False when the
    /// sequence is done: finished, failed or its caller gone.
    fn next_token(&mut self, r: &mut Running, logits: &[f32]) -> bool {
        if let (Origin::Colocated(p), true) = (&r.a.origin, r.a.in_prompt()) {
            let started = p.started.unwrap_or(p.enqueued);
            let event = Event::Prefilled(pb::PrefillStats {
                cached_blocks: p.cached_blocks,
                computed_tokens: p.computed_tokens,
                stored_blocks: 0,
                queue_us: started.duration_since(p.enqueued).as_micros() as u64,
                prefill_us: started.elapsed().as_micros() as u64,
                node: self.name.clone(),
            });
            if r.a.out.send(Ok(pb::GenerateEvent { event: Some(event) })).is_err() {
                return false;
            }
        }
        let sampled = match r.a.sampler.sample(logits) {
            Ok(s) => s,
            Err(e) => {
                let _ = r.a.out.send(Err(Status::internal(format!("sampling failed: {e}"))));
                return false;
            }
        };
        r.a.tokens.push(sampled.token);
        self.stats.generated.fetch_add(1, Ordering::Relaxed);
        let event = Event::Tokens(pb::Tokens { tokens: vec![wire::token_to_pb(&sampled)] });
        if r.a.out.send(Ok(pb::GenerateEvent { event: Some(event) })).is_err() {
            return false;
        }
        let generated = r.a.tokens.len() - r.a.prompt_len;
        let finish = if r.a.stop_ids.contains(&sampled.token) {
            Some(FinishReason::Stop)
        } else if generated >= r.a.max_tokens {
            Some(FinishReason::Length)
        } else if r.a.tokens.len() >= self.model.config().max_position_embeddings {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        let Some(reason) = finish else { return true };
        let _ = r.a.out.send(Ok(finished_event(&r.a, reason, &self.name)));
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Puts the full blocks `r` completed since the last call where they
    /// belong: the local cache for a colocated request, the store (when
    /// writing back) for a handoff, so the next turn of a conversation
    /// hits them.
    fn publish_blocks(&mut self, r: &mut Running) {
        let bt = self.block_tokens();
        let full = r.seq.len() / bt;
        if full <= r.published {
            return;
        }
        if r.a.keys.len() < full {
            r.a.keys = block_keys(r.a.salt, &r.a.tokens[..full * bt], bt);
        }
        let new = r.published..full;
        r.published = full;
        if let Origin::Colocated(_) = r.a.origin {
            for b in new {
                let key = r.a.keys[b];
                if !self.local.contains(key) {
                    if let Ok(bytes) = self.cache.page_bytes(r.seq.block_table()[b]) {
                        self.local.insert(key, bytes);
                    }
                }
            }
            return;
        }
        let (Some(store), true) = (self.store.clone(), self.write_back) else { return };
        let blocks: Vec<(BlockKey, Vec<u8>)> = new
            .filter_map(|b| Some((r.a.keys[b], self.cache.page_bytes(r.seq.block_table()[b]).ok()?.to_vec())))
            .collect();
        let stats = self.stats.clone();
        let counter = r.a.stats.written_back.clone();
        stats.writebacks_in_flight.fetch_add(1, Ordering::Relaxed);
        self.rt.spawn(async move {
            let items: Vec<(BlockKey, &[u8])> = blocks.iter().map(|(k, b)| (*k, b.as_slice())).collect();
            match store.put(&items).await {
                Ok(outcomes) => {
                    let stored = outcomes.iter().filter(|o| **o == PutOutcome::Stored).count() as u64;
                    stats.written_back.fetch_add(stored, Ordering::Relaxed);
                    counter.fetch_add(stored, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("write-back failed: {e}"),
            }
            stats.writebacks_in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The last event of a request.
pub fn finished_event(a: &Admission, reason: FinishReason, node: &str) -> pb::GenerateEvent {
    let s = &a.stats;
    pb::GenerateEvent {
        event: Some(Event::Finished(pb::Finished {
            reason: wire::finish_reason(reason).into(),
            generated: (a.tokens.len() - a.prompt_len) as u32,
            decode: Some(pb::DecodeStats {
                fetched_blocks: s.fetched_blocks,
                recomputed_tokens: s.recomputed_tokens,
                written_back_blocks: s.written_back.load(Ordering::Relaxed) as u32,
                preemptions: s.preemptions,
                fetch_us: s.fetch.as_micros() as u64,
                node: node.to_owned(),
            }),
        })),
    }
}
