//! The decode engine thread: a paged KV pool and the continuous batch.
//!
//! Each loop turn takes in new admissions (their blocks already read by
//! the service, off this thread), admits as many as pages and `max_batch`
//! allow, preempts when the running batch would outgrow the pool, runs one
//! forward pass for every running sequence and streams each new token.

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

/// A sequence ready to (re)join the batch.
#[derive(Debug)]
pub struct Admission {
    pub id: String,
    /// Every token so far (prompt, then generated); the KV covers all but
    /// the last, which is the next input.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub sampler: Sampler,
    /// Keys of the KV's full blocks, in order.
    pub keys: Vec<BlockKey>,
    /// The leading blocks read from the store.
    pub fetched: Vec<Vec<u8>>,
    /// The KV's last partial block (whole-page bytes), usable when every
    /// full block was fetched; empty when none.
    pub partial: Vec<u8>,
    pub out: EventSender,
    pub stats: RequestStats,
}

impl Admission {
    fn kv_len(&self) -> usize {
        self.tokens.len() - 1
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
    /// as the next step starts.
    pub context_tokens: AtomicU64,
    pub waiting: AtomicU64,
    pub free_pages: AtomicU64,
    /// Exponentially weighted mean step time (ns).
    pub step_ns: AtomicU64,
    pub steps: AtomicU64,
    pub completed: AtomicU64,
    pub generated: AtomicU64,
    pub fetched_blocks: AtomicU64,
    pub recomputed_tokens: AtomicU64,
    pub written_back: AtomicU64,
    pub writebacks_in_flight: AtomicU64,
    pub preemptions: AtomicU64,
}

struct Running {
    a: Admission,
    seq: SeqKv,
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
                let need = self.cache.pages_for(front.kv_len() + 1);
                if need > self.cache.num_pages() {
                    let a = waiting.pop_front().expect("front exists");
                    let msg = format!("the sequence needs {need} KV pages; this node has {}", self.cache.num_pages());
                    let _ = a.out.send(Err(Status::resource_exhausted(msg)));
                    continue;
                }
                if need > self.cache.free_pages() {
                    break;
                }
                let a = waiting.pop_front().expect("front exists");
                running.extend(self.admit(a));
            }
            self.publish(&waiting, &running);
            if !running.is_empty() {
                self.step(&mut running);
            }
        }
    }

    fn publish(&self, waiting: &VecDeque<Admission>, running: &[Running]) {
        let context: usize = running.iter().map(|r| r.seq.len()).sum();
        self.stats.batch_size.store(running.len() as u64, Ordering::Relaxed);
        self.stats.context_tokens.store(context as u64, Ordering::Relaxed);
        self.stats.waiting.store(waiting.len() as u64, Ordering::Relaxed);
        self.stats.free_pages.store(self.cache.free_pages() as u64, Ordering::Relaxed);
    }

    fn block_tokens(&self) -> usize {
        self.cache.geometry().page_tokens
    }

    /// Puts `a`'s KV in pages: fetched blocks, then its partial block, then
    /// recomputes whatever the store did not have. On failure the caller
    /// gets the error and nothing stays allocated.
    fn admit(&mut self, mut a: Admission) -> Option<Running> {
        let bt = self.block_tokens();
        let kv_len = a.kv_len();
        let mut seq = SeqKv::default();
        let views: Vec<&[u8]> = a.fetched.iter().map(Vec::as_slice).collect();
        if let Err(e) = self.cache.append_blocks(&mut seq, &views) {
            tracing::warn!(request = %a.id, "fetched blocks unusable; recomputing: {e}");
        }
        a.fetched = Vec::new();
        let partial_tokens = kv_len % bt;
        if seq.len() == a.keys.len() * bt && partial_tokens > 0 && !a.partial.is_empty() {
            if let Err(e) = self.cache.append_partial(&mut seq, &a.partial, partial_tokens) {
                tracing::warn!(request = %a.id, "partial block unusable; recomputing: {e}");
            }
        }
        a.partial = Vec::new();
        let mut pos = seq.len();
        while pos < kv_len {
            let end = (pos + self.chunk_tokens).min(kv_len);
            let mut steps = [Step { tokens: &a.tokens[pos..end], seq: &mut seq, logits: Logits::None }];
            if let Err(e) = self.model.forward(&mut self.cache, &mut steps) {
                self.cache.release(seq);
                let _ = a.out.send(Err(Status::internal(format!("recomputing the sequence's KV: {e}"))));
                return None;
            }
            a.stats.recomputed_tokens += (end - pos) as u32;
            self.stats.recomputed_tokens.fetch_add((end - pos) as u64, Ordering::Relaxed);
            pos = end;
        }
        self.stats.fetched_blocks.fetch_add(a.stats.fetched_blocks as u64, Ordering::Relaxed);
        Some(Running { a, seq })
    }

    /// Preempts the most recently admitted sequence: its pages go back to
    /// the pool; its full blocks are (or are being) in the store and its
    /// partial block is kept, so it re-joins after a fetch.
    fn preempt(&mut self, mut r: Running) {
        let bt = self.block_tokens();
        let kv_len = r.seq.len();
        let full = kv_len / bt;
        r.a.keys = block_keys(self.salt, &r.a.tokens[..full * bt], bt);
        r.a.partial = if !kv_len.is_multiple_of(bt) {
            r.seq
                .block_table()
                .last()
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
        let store = self.store.clone();
        let back = self.resubmit.clone();
        let block_bytes = self.cache.block_bytes();
        let mut a = r.a;
        let pacer = self.pacer.clone();
        self.rt.spawn(async move {
            fetch(store.as_deref(), &mut a, block_bytes, &pacer).await;
            let _ = back.send(a);
        });
    }

    fn step(&mut self, running: &mut Vec<Running>) {
        // Every sequence needs room for one more token; make it by
        // preempting the youngest (never the last one standing).
        loop {
            let need: usize = running
                .iter()
                .map(|r| self.cache.pages_for(r.seq.len() + 1).saturating_sub(r.seq.block_table().len()))
                .sum();
            if need <= self.cache.free_pages() {
                break;
            }
            let victim = running.pop().expect("a running sequence needs a page");
            if running.is_empty() {
                let msg = "the KV pool is exhausted by a single sequence";
                let _ = victim.a.out.send(Err(Status::resource_exhausted(msg)));
                self.cache.release(victim.seq);
                return;
            }
            self.preempt(victim);
        }
        let inputs: Vec<u32> = running.iter().map(|r| *r.a.tokens.last().expect("at least one token")).collect();
        let mut steps: Vec<Step<'_>> = running
            .iter_mut()
            .zip(&inputs)
            .map(|(r, t)| Step { tokens: std::slice::from_ref(t), seq: &mut r.seq, logits: Logits::Last })
            .collect();
        let started = Instant::now();
        let result = self.model.forward(&mut self.cache, &mut steps);
        drop(steps);
        let took = started.elapsed().as_nanos() as u64;
        let old = self.stats.step_ns.load(Ordering::Relaxed);
        let ewma = if old == 0 { took } else { (old * 7 + took * 3) / 10 };
        self.stats.step_ns.store(ewma, Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for r in running.drain(..) {
                    let _ = r.a.out.send(Err(Status::internal(format!("decode step failed: {e}"))));
                    self.cache.release(r.seq);
                }
                return;
            }
        };
        let ctx = self.model.config().max_position_embeddings;
        let mut done = Vec::new();
        for (i, (r, logits)) in running.iter_mut().zip(logits).enumerate() {
            self.write_back_if_full(r);
            let sampled = match r.a.sampler.sample(&logits) {
                Ok(s) => s,
                Err(e) => {
                    let _ = r.a.out.send(Err(Status::internal(format!("sampling failed: {e}"))));
                    done.push(i);
                    continue;
                }
            };
            r.a.tokens.push(sampled.token);
            self.stats.generated.fetch_add(1, Ordering::Relaxed);
            let event = Event::Tokens(pb::Tokens { tokens: vec![wire::token_to_pb(&sampled)] });
            if r.a.out.send(Ok(pb::GenerateEvent { event: Some(event) })).is_err() {
                done.push(i);
                continue;
            }
            let generated = r.a.tokens.len() - r.a.prompt_len;
            let finish = if r.a.stop_ids.contains(&sampled.token) {
                Some(FinishReason::Stop)
            } else if generated >= r.a.max_tokens {
                Some(FinishReason::Length)
            } else if r.a.tokens.len() >= ctx {
                Some(FinishReason::ContextFull)
            } else {
                None
            };
            if let Some(reason) = finish {
                let _ = r.a.out.send(Ok(finished_event(&r.a, reason, &self.name)));
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            let r = running.remove(i);
            self.cache.release(r.seq);
        }
    }

    /// Writes the sequence's last block back to the store when this step
    /// filled it.
    fn write_back_if_full(&mut self, r: &mut Running) {
        let bt = self.block_tokens();
        let kv_len = r.seq.len();
        if !kv_len.is_multiple_of(bt) || kv_len / bt <= r.a.keys.len() {
            return;
        }
        r.a.keys = block_keys(self.salt, &r.a.tokens[..kv_len], bt);
        let (Some(store), true) = (self.store.clone(), self.write_back) else { return };
        let Some(key) = r.a.keys.last().copied() else { return };
        let Some(bytes) = r.seq.block_table().last().and_then(|&p| self.cache.page_bytes(p).ok()).map(<[u8]>::to_vec)
        else {
            return;
        };
        let stats = self.stats.clone();
        let counter = r.a.stats.written_back.clone();
        stats.writebacks_in_flight.fetch_add(1, Ordering::Relaxed);
        self.rt.spawn(async move {
            match store.put(&[(key, &bytes)]).await {
                Ok(o) if o.first() == Some(&PutOutcome::Stored) => {
                    stats.written_back.fetch_add(1, Ordering::Relaxed);
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
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
