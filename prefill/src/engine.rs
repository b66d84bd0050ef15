//! The prefill engine thread: owns the model and a KV page pool, packs
//! prompt chunks of several requests into each forward pass (a token
//! budget per step), and streams every new full block to the store one
//! layer at a time while the next layer computes.
//!
//! Store I/O never runs on this thread: cached blocks arrive already read
//! (the service reads them while other prompts compute), and each
//! request's writes go to its own async writer task, which reserves the
//! blocks (`put_begin`), writes the layer pieces as they come and
//! publishes them (`put_commit`) with checksums of the finished blocks.

use crossbeam_channel::Receiver;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_kvstore::checksum::BlockChecksum;
use tandem_kvstore::client::{BlockWrite, PutOutcome, StoreClient};
use tandem_model::forward::{Logits, Model, Step};
use tandem_model::kv_cache::{KvCache, SeqKv};
use tandem_model::sampling::{Sampled, Sampler, SamplingParams};
use tandem_proto::BlockKey;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// One prompt to prefill.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens already sampled (a resumed request's prompt ends with them):
    /// the first token is drawn at this step.
    pub sampler_step: u64,
    /// Keys of the prompt's full blocks.
    pub keys: Vec<BlockKey>,
    /// The prompt's leading blocks as read from the store.
    pub cached: Vec<Vec<u8>>,
    pub enqueued: Instant,
    /// Dropping the receiver cancels the job.
    pub reply: oneshot::Sender<Result<Prefilled, String>>,
}

/// A prefilled prompt, ready to hand off.
#[derive(Debug)]
pub struct Prefilled {
    pub first: Sampled,
    pub sampler_step: u64,
    /// The last partial block (whole-page bytes), empty when none.
    pub partial: Vec<u8>,
    pub partial_tokens: usize,
    pub cached_blocks: usize,
    pub computed_tokens: usize,
    pub queue: Duration,
    /// Its share (by tokens) of the forward passes it rode in.
    pub compute: Duration,
    /// Resolves to the number of blocks published, once the store has them.
    pub stored: Option<JoinHandle<usize>>,
}

/// What the engine reports (read by the status RPC).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued_requests: AtomicU64,
    pub queued_tokens: AtomicU64,
    /// Measured prefill speed (f64 bits), an exponentially weighted mean.
    pub tokens_per_second: AtomicU64,
    pub completed: AtomicU64,
    pub computed_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub stored_blocks: AtomicU64,
    pub free_pages: AtomicU64,
    /// Forward-pass time spent computing (ns), for benchmarks.
    pub compute_ns: AtomicU64,
}

impl EngineStats {
    pub fn tokens_per_second(&self) -> f64 {
        f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed))
    }
}

enum WriterMsg {
    Layer(Vec<(usize, u64, Vec<u8>)>),
    Commit(Vec<BlockChecksum>),
}

/// A request's store writes: reserve, write layer pieces, commit. Dropping
/// the sender without a commit aborts the put (nothing is published).
fn spawn_writer(
    rt: &Handle,
    store: Arc<StoreClient>,
    items: Vec<(BlockKey, u64)>,
) -> (mpsc::UnboundedSender<WriterMsg>, JoinHandle<usize>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<WriterMsg>();
    let task = rt.spawn(async move {
        let mut put = match store.put_begin(&items).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("store reservation failed; blocks not stored: {e}");
                return 0;
            }
        };
        while let Some(msg) = rx.recv().await {
            match msg {
                WriterMsg::Layer(pieces) => {
                    let writes: Vec<BlockWrite<'_>> = pieces
                        .iter()
                        .filter(|(item, _, _)| put.is_writable(*item))
                        .map(|(item, offset, bytes)| BlockWrite { item: *item, offset: *offset, bytes })
                        .collect();
                    if !writes.is_empty() {
                        store.put_write(&mut put, &writes).await;
                    }
                }
                WriterMsg::Commit(sums) => {
                    return match store.put_commit(put, &sums).await {
                        Ok(outcomes) => outcomes.iter().filter(|o| **o == PutOutcome::Stored).count(),
                        Err(e) => {
                            tracing::warn!("store commit failed; blocks not stored: {e}");
                            0
                        }
                    };
                }
            }
        }
        if let Err(e) = store.put_abort(put).await {
            tracing::debug!("abandoned put not revoked (it times out): {e}");
        }
        0
    });
    (tx, task)
}

/// The blocks one step of a forward pass completes, as (put item, page),
/// and the writer they go to.
type Completions = (Option<mpsc::UnboundedSender<WriterMsg>>, Vec<(usize, u32)>);

struct Active {
    job: Job,
    seq: SeqKv,
    /// Prompt tokens in the cache so far.
    done: usize,
    cached_blocks: usize,
    writer: Option<(mpsc::UnboundedSender<WriterMsg>, JoinHandle<usize>)>,
    started: Instant,
    /// Its share of the forward passes it rode in, by tokens.
    busy: Duration,
}

/// The engine: run it on its own thread with [`PrefillEngine::run`].
#[derive(Debug)]
pub struct PrefillEngine {
    pub model: Model,
    pub cache: KvCache,
    pub chunk_tokens: usize,
    /// Where new blocks go (None: compute only).
    pub store: Option<Arc<StoreClient>>,
    pub rt: Handle,
    pub stats: Arc<EngineStats>,
    pub jobs: Receiver<Job>,
}

impl PrefillEngine {
    /// Serves jobs until every sender is dropped and the queue is empty.
    pub fn run(mut self) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        let mut active: Vec<Active> = Vec::new();
        loop {
            if pending.is_empty() && active.is_empty() {
                self.publish(&pending, &active);
                match self.jobs.recv() {
                    Ok(j) => pending.push_back(j),
                    Err(_) => return,
                }
            }
            pending.extend(self.jobs.try_iter());
            pending.retain(|j| !j.reply.is_closed());
            active.retain_mut(|a| {
                if a.job.reply.is_closed() {
                    tracing::debug!(request = %a.job.id, "cancelled mid-prefill");
                    self.cache.release(std::mem::take(&mut a.seq));
                    a.writer = None; // aborts the put
                    false
                } else {
                    true
                }
            });
            while let Some(j) = pending.front() {
                let need = self.cache.pages_for(j.prompt.len());
                if need > self.cache.num_pages() {
                    let j = pending.pop_front().expect("front exists");
                    let msg = format!("the prompt needs {need} KV pages; this node has {}", self.cache.num_pages());
                    let _ = j.reply.send(Err(msg));
                    continue;
                }
                if need > self.cache.free_pages() {
                    break;
                }
                let j = pending.pop_front().expect("front exists");
                active.extend(self.admit(j));
            }
            self.publish(&pending, &active);
            if !active.is_empty() {
                self.step(&mut active);
            }
        }
    }

    fn publish(&self, pending: &VecDeque<Job>, active: &[Active]) {
        let left: usize = pending.iter().map(|j| j.prompt.len() - j.cached.len() * self.block_tokens()).sum::<usize>()
            + active.iter().map(|a| a.job.prompt.len() - a.done).sum::<usize>();
        self.stats.queued_requests.store((pending.len() + active.len()) as u64, Ordering::Relaxed);
        self.stats.queued_tokens.store(left as u64, Ordering::Relaxed);
        self.stats.free_pages.store(self.cache.free_pages() as u64, Ordering::Relaxed);
    }

    fn block_tokens(&self) -> usize {
        self.cache.geometry().page_tokens
    }

    /// Starts a job: cached blocks into pages, the rest reserved, its
    /// writer started. On failure the caller gets the error.
    fn admit(&mut self, job: Job) -> Option<Active> {
        let mut seq = SeqKv::default();
        let views: Vec<&[u8]> = job.cached.iter().map(Vec::as_slice).collect();
        if let Err(e) = self.cache.append_blocks(&mut seq, &views) {
            tracing::warn!(request = %job.id, "cached blocks unusable, computing them: {e}");
        }
        if let Err(e) = self.cache.reserve(&mut seq, job.prompt.len()) {
            self.cache.release(seq);
            let _ = job.reply.send(Err(e.to_string()));
            return None;
        }
        let cached_blocks = seq.len() / self.block_tokens();
        let writer = match &self.store {
            Some(store) if cached_blocks < job.keys.len() => {
                let bytes = self.cache.block_bytes() as u64;
                let items = job.keys[cached_blocks..].iter().map(|&k| (k, bytes)).collect();
                Some(spawn_writer(&self.rt, store.clone(), items))
            }
            _ => None,
        };
        self.stats.cached_tokens.fetch_add(seq.len() as u64, Ordering::Relaxed);
        Some(Active { done: seq.len(), seq, cached_blocks, writer, started: Instant::now(), busy: Duration::ZERO, job })
    }

    /// One forward pass over the next chunks of the active prompts.
    fn step(&mut self, active: &mut Vec<Active>) {
        let bt = self.block_tokens();
        let mut budget = self.chunk_tokens;
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, a) in active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let take = (a.job.prompt.len() - a.done).min(budget);
            if take > 0 {
                plan.push((i, a.done..a.done + take));
                budget -= take;
            }
        }
        // Per planned step: the new blocks this chunk completes, as
        // (put item, page), and the writer they go to.
        let mut completions: Vec<Completions> = Vec::new();
        for (i, range) in &plan {
            let a = &active[*i];
            let blocks = (range.start / bt..range.end / bt)
                .filter(|&b| b >= a.cached_blocks && b < a.job.keys.len() && (b + 1) * bt > range.start)
                .map(|b| (b - a.cached_blocks, a.seq.block_table()[b]))
                .collect();
            completions.push((a.writer.as_ref().map(|w| w.0.clone()), blocks));
        }
        let layer_bytes = self.cache.layer_block_bytes() as u64;
        let mut after_layer = |l: usize, cache: &KvCache| {
            for (tx, blocks) in &completions {
                let Some(tx) = tx else { continue };
                if blocks.is_empty() {
                    continue;
                }
                let pieces = blocks
                    .iter()
                    .filter_map(|&(item, page)| {
                        cache.layer_bytes(page, l).ok().map(|b| (item, l as u64 * layer_bytes, b.to_vec()))
                    })
                    .collect();
                let _ = tx.send(WriterMsg::Layer(pieces));
            }
        };
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(plan.len());
        let mut next = plan.iter().peekable();
        for (i, a) in active.iter_mut().enumerate() {
            if let Some((_, range)) = next.next_if(|(p, _)| *p == i) {
                let last = range.end == a.job.prompt.len();
                steps.push(Step {
                    tokens: &a.job.prompt[range.clone()],
                    seq: &mut a.seq,
                    logits: if last { Logits::Last } else { Logits::None },
                });
            }
        }
        let started = Instant::now();
        let result = self.model.forward_observed(&mut self.cache, &mut steps, &mut after_layer);
        let took = started.elapsed();
        drop(steps);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for (i, _) in plan.iter().rev() {
                    let mut a = active.remove(*i);
                    self.cache.release(std::mem::take(&mut a.seq));
                    let _ = a.job.reply.send(Err(format!("prefill failed: {e}")));
                }
                return;
            }
        };
        let tokens: usize = plan.iter().map(|(_, r)| r.len()).sum();
        self.stats.compute_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.stats.computed_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        let speed = tokens as f64 / took.as_secs_f64().max(1e-9);
        let old = self.stats.tokens_per_second();
        let ewma = if old == 0.0 { speed } else { 0.7 * old + 0.3 * speed };
        self.stats.tokens_per_second.store(ewma.to_bits(), Ordering::Relaxed);

        let mut finished = Vec::new();
        for ((i, range), logits) in plan.iter().zip(logits) {
            active[*i].busy += took.mul_f64(range.len() as f64 / tokens.max(1) as f64);
            active[*i].done = range.end;
            if range.end == active[*i].job.prompt.len() {
                finished.push((*i, logits));
            }
        }
        // Highest index first so each removal leaves the others' indices
        // alone; `remove`, not `swap_remove`: the order of `active` is the
        // order prompts get chunks in (first come, first served), which
        // the conductor's queue-time predictions assume.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, logits) in finished {
            let a = active.remove(i);
            self.finish(a, &logits);
        }
    }

    fn finish(&mut self, mut a: Active, logits: &[f32]) {
        let bt = self.block_tokens();
        let sampled = Sampler::resume(a.job.sampling.clone(), a.job.sampler_step)
            .and_then(|mut s| Ok((s.sample(logits)?, s.step())));
        let (first, sampler_step) = match sampled {
            Ok(x) => x,
            Err(e) => {
                self.cache.release(std::mem::take(&mut a.seq));
                let _ = a.job.reply.send(Err(format!("sampling failed: {e}")));
                return;
            }
        };
        let stored = a.writer.take().map(|(tx, task)| {
            let sums = (a.cached_blocks..a.job.keys.len())
                .map(|b| BlockChecksum::of(self.cache.page_bytes(a.seq.block_table()[b]).unwrap_or_default()))
                .collect();
            let _ = tx.send(WriterMsg::Commit(sums));
            task
        });
        let partial_tokens = a.job.prompt.len() % bt;
        let partial = if partial_tokens > 0 {
            let page = *a.seq.block_table().last().expect("a partial block has a page");
            self.cache.page_bytes(page).map(<[u8]>::to_vec).unwrap_or_default()
        } else {
            Vec::new()
        };
        self.cache.release(std::mem::take(&mut a.seq));
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
        let done = Prefilled {
            first,
            sampler_step,
            partial,
            partial_tokens,
            cached_blocks: a.cached_blocks,
            computed_tokens: a.job.prompt.len() - a.cached_blocks * bt,
            queue: a.started.duration_since(a.job.enqueued),
            compute: a.busy,
            stored,
        };
        let _ = a.job.reply.send(Ok(done));
    }
}
