//! A request's way through the cluster: placed by the scheduler (or
//! refused at arrival), sent to its prefill node with the chosen decode
//! node, its tokens relayed to the caller; when a node dies mid-request it
//! is placed again with the tokens generated so far appended to its prompt
//! (the re-prefill reads the blocks already in the store, and the sampler
//! resumes where it was), so the caller sees one uninterrupted answer or a
//! clear error.

use crate::metrics::{Metrics, Outcome};
use crate::nodes::Placed;
use crate::schedule::{Placement, RequestInfo, SeqLoad, Verdict};
use crate::service::{Conductor, Stage, Tracked};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_proto::worker as pb;
use tandem_proto::worker::generate_event::Event as WorkerEvent;
use tokio::sync::mpsc;
use tonic::Code;

/// A request in token ids, validated by the API layer.
#[derive(Debug, Clone)]
pub struct Submission {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: pb::SamplingParams,
    pub stop_ids: Vec<u32>,
    /// Whose cache it uses (its API key's tenant; empty: the default).
    pub tenant: String,
}

/// What the caller receives.
#[derive(Debug)]
pub enum Event {
    /// The prompt is prefilled; this many of its tokens came from the
    /// cache (the store, or a colocated node's local cache).
    Cached {
        tokens: usize,
    },
    Token(pb::Token),
    /// The last event of an answer: "stop", "length" or "context_full".
    Finished {
        reason: String,
    },
    /// The last event of a request that could not be completed.
    Failed {
        message: String,
    },
}

/// Why a request was refused before any work.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// 429 (overload: retry later) or 503 (no node can serve it).
    pub status: u16,
    pub message: String,
    pub retry_after_s: u64,
}

/// An admitted request: its place in the cluster's books. Dropping it
/// (finished, failed or cancelled) removes it from them.
#[derive(Debug)]
pub struct Ticket {
    conductor: Arc<Conductor>,
    pub id: u64,
    pub sub: Submission,
    pub placement: Placement,
    pub cached_blocks: u32,
    pub arrived: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let c = &self.conductor;
        let mut st = c.state.lock();
        for p in &mut st.prefill {
            p.outstanding.remove(&self.id);
        }
        for d in &mut st.decode {
            d.seqs.remove(&self.id);
        }
        st.requests.remove(&self.id);
        c.metrics.in_flight.set(st.requests.len() as i64);
    }
}

/// How one attempt ended.
enum Attempt {
    Finished(String),
    /// The caller went away.
    Cancelled,
    /// A node failed: `decode` says which side (by the error), `retry`
    /// whether placing it again can help.
    Failed {
        decode: bool,
        retry: bool,
        message: String,
    },
}

impl Conductor {
    /// Places a request or refuses it (early rejection: the predicted TTFT
    /// or TBT, at the decode load predicted for when its prefill ends,
    /// misses the SLO).
    pub async fn admit(self: &Arc<Self>, sub: Submission) -> Result<Ticket, Rejection> {
        let reject = |status: u16, message: String, retry_after_s: u64| {
            self.metrics.outcome(Outcome::Rejected);
            Rejection { status, message, retry_after_s }
        };
        let cached_blocks = self.cached_prefix(&sub.prompt, &sub.tenant).await;
        let id = self.next_id();
        let now = self.now_ms();
        let mut st = self.state.lock();
        if st.requests.len() >= self.cfg.max_in_flight as usize {
            let n = st.requests.len();
            return Err(reject(429, format!("{n} requests are in flight, the most this conductor takes"), 1));
        }
        let colocated = self.colocated();
        if (!colocated && !st.prefill.iter().any(|n| n.base.up())) || !st.decode.iter().any(|n| n.base.up()) {
            return Err(reject(503, "no prefill or no decode node is up".into(), 2));
        }
        let info = self.request_info(&sub, cached_blocks, st.prefill.len());
        let pv: Vec<_> = st.prefill.iter().map(|n| n.view(self.read_bytes_per_ms())).collect();
        let dv: Vec<_> = st.decode.iter().map(|n| n.view()).collect();
        let verdict = if colocated {
            st.scheduler.schedule_colocated(now, &info, &dv)
        } else {
            st.scheduler.schedule(now, &info, &pv, &dv)
        };
        let placement = match verdict {
            Verdict::Accept(p) => p,
            Verdict::Reject { reason, retry_after_ms } => {
                return Err(reject(429, format!("overloaded: {reason}"), retry_after_ms.div_ceil(1000).max(1)));
            }
        };
        let queued = if colocated { 0.0 } else { pv[placement.prefill].queued_ms };
        self.book(&mut st, id, &sub, &placement, queued, now, cached_blocks);
        drop(st);
        self.prompt_total.fetch_add(sub.prompt.len() as u64, Ordering::Relaxed);
        self.metrics.prompt_tokens.inc_by(sub.prompt.len() as u64);
        Ok(Ticket { conductor: self.clone(), id, sub, placement, cached_blocks, arrived: Instant::now() })
    }

    fn request_info(&self, sub: &Submission, cached_blocks: u32, prefill_nodes: usize) -> RequestInfo {
        RequestInfo {
            prompt_tokens: sub.prompt.len() as u32,
            max_tokens: sub.max_tokens,
            block_tokens: self.model.block_tokens,
            block_bytes: self.model.block_bytes,
            // One pooled store: every prefill node reads the same prefix.
            cached_blocks: vec![cached_blocks; prefill_nodes],
        }
    }

    /// Records a placement in the books the scheduler reads.
    #[allow(clippy::too_many_arguments)]
    fn book(
        &self,
        st: &mut crate::service::State,
        id: u64,
        sub: &Submission,
        p: &Placement,
        queued_ms: f64,
        now: u64,
        cached_blocks: u32,
    ) {
        let colocated = self.colocated();
        if !colocated {
            let prefill_ms = (p.predicted_ttft_ms - queued_ms).max(0.0);
            st.prefill[p.prefill].outstanding.insert(id, prefill_ms);
        }
        let seq = SeqLoad {
            context: sub.prompt.len() as u32,
            remaining: sub.max_tokens,
            joins_at_ms: now + p.predicted_ttft_ms as u64,
        };
        st.decode[p.decode].seqs.insert(id, Placed { seq, prefilled: false });
        let t = st.requests.entry(id).or_insert_with(|| Tracked {
            request_id: sub.request_id.clone(),
            stage: Stage::Prefilling,
            prefill: String::new(),
            decode: String::new(),
            prompt_tokens: sub.prompt.len() as u32,
            cached_tokens: cached_blocks * self.model.block_tokens,
            generated: 0,
            attempts: 0,
            arrived: Instant::now(),
        });
        t.stage = Stage::Prefilling;
        t.prefill =
            if colocated { st.decode[p.decode].base.name.clone() } else { st.prefill[p.prefill].base.name.clone() };
        t.decode = st.decode[p.decode].base.name.clone();
        t.attempts += 1;
        self.metrics.in_flight.set(st.requests.len() as i64);
    }

    /// Blocks of the prompt's longest prefix in the store (0 without a
    /// store, before any node reported its model, or when the store is
    /// slow to answer: the hint only steers placement).
    async fn cached_prefix(&self, prompt: &[u32], tenant: &str) -> u32 {
        let Some(store) = &self.store else { return 0 };
        let Some(fingerprint) = self.state.lock().fingerprint.clone() else { return 0 };
        let bt = self.model.block_tokens as usize;
        let salt = tandem_proto::KeySalt::new(&fingerprint, &self.model.kv_dtype, bt).for_tenant(tenant);
        let keys = tandem_proto::block_keys(salt, prompt, bt);
        if keys.is_empty() {
            return 0;
        }
        match tokio::time::timeout(Duration::from_millis(200), store.longest_prefix(&keys)).await {
            Ok(Ok(n)) => n as u32,
            _ => 0,
        }
    }

    /// Runs an admitted request to its end, sending its tokens to `tx`.
    /// Returns when it finished, failed (after retries) or `tx` closed
    /// (the caller went away: the request is cancelled down the line).
    pub async fn run(self: Arc<Self>, mut ticket: Ticket, tx: mpsc::Sender<Event>) {
        let mut generated: Vec<u32> = Vec::new();
        let mut timing = Timing { arrived: ticket.arrived, first: None, last: None };
        let mut placement = ticket.placement;
        let mut attempts = 0u32;
        let outcome = loop {
            attempts += 1;
            match self.attempt(&ticket, placement, &mut generated, &tx, &mut timing).await {
                Attempt::Finished(reason) => {
                    let _ = tx.send(Event::Finished { reason }).await;
                    break Outcome::Completed;
                }
                Attempt::Cancelled => break Outcome::Cancelled,
                Attempt::Failed { decode, retry, message } => {
                    let (node, i) = if decode { ("decode", placement.decode) } else { ("prefill", placement.prefill) };
                    tracing::warn!(request = %ticket.sub.request_id, "{node} side failed: {message}");
                    if retry {
                        self.probe(decode, i).await;
                    }
                    if !retry || attempts > self.cfg.retries {
                        let message = if retry {
                            format!("the request failed {attempts} times; last: {message}")
                        } else {
                            message
                        };
                        let _ = tx.send(Event::Failed { message }).await;
                        break Outcome::Failed;
                    }
                    if generated.len() as u32 >= ticket.sub.max_tokens {
                        let _ = tx.send(Event::Finished { reason: "length".into() }).await;
                        break Outcome::Completed;
                    }
                    match self.replace(&mut ticket, &generated) {
                        Ok(p) => {
                            self.metrics.retries.inc();
                            placement = p;
                        }
                        Err(e) => {
                            let _ = tx.send(Event::Failed { message: format!("{message}; {e}") }).await;
                            break Outcome::Failed;
                        }
                    }
                }
            }
        };
        self.metrics.outcome(outcome);
        if outcome == Outcome::Completed {
            let decode = self.state.lock().decode[placement.decode].base.name.clone();
            self.metrics.e2e.get_or_create(&Metrics::node(&decode)).observe(ticket.arrived.elapsed().as_secs_f64());
        }
    }

    /// Places a request again after a failure: with the SLO checks off
    /// (it was accepted; it should finish) and only on nodes that are up.
    fn replace(&self, ticket: &mut Ticket, generated: &[u32]) -> Result<Placement, String> {
        let mut sub = ticket.sub.clone();
        sub.prompt.extend_from_slice(generated);
        sub.max_tokens -= generated.len() as u32;
        let now = self.now_ms();
        let mut st = self.state.lock();
        for p in &mut st.prefill {
            p.outstanding.remove(&ticket.id);
        }
        for d in &mut st.decode {
            d.seqs.remove(&ticket.id);
        }
        let info = self.request_info(&sub, 0, st.prefill.len());
        let pv: Vec<_> = st.prefill.iter().map(|n| n.view(self.read_bytes_per_ms())).collect();
        let dv: Vec<_> = st.decode.iter().map(|n| n.view()).collect();
        let verdict = if self.colocated() {
            st.scheduler.schedule_colocated(now, &info, &dv)
        } else {
            st.scheduler.place(now, &info, &pv, &dv)
        };
        match verdict {
            Verdict::Accept(p) => {
                let queued = pv.get(p.prefill).map_or(0.0, |v| v.queued_ms);
                self.book(&mut st, ticket.id, &sub, &p, queued, now, 0);
                if let Some(t) = st.requests.get_mut(&ticket.id) {
                    t.stage = Stage::Retrying;
                }
                ticket.placement = p;
                Ok(p)
            }
            Verdict::Reject { reason, .. } => Err(format!("it cannot be placed again: {reason}")),
        }
    }

    async fn attempt(
        &self,
        ticket: &Ticket,
        p: Placement,
        generated: &mut Vec<u32>,
        tx: &mpsc::Sender<Event>,
        timing: &mut Timing,
    ) -> Attempt {
        let sub = &ticket.sub;
        let colocated = self.colocated();
        let (prefill_client, decode_client, decode_addr, prefill_name, decode_name) = {
            let st = self.state.lock();
            let dn = &st.decode[p.decode];
            if colocated {
                (None, dn.client(), String::new(), dn.base.name.clone(), dn.base.name.clone())
            } else {
                let pn = &st.prefill[p.prefill];
                (Some(pn.client()), dn.client(), dn.base.addr.to_string(), pn.base.name.clone(), dn.base.name.clone())
            }
        };
        let mut prompt = sub.prompt.clone();
        prompt.extend_from_slice(generated);
        let request = pb::GenerateRequest {
            request_id: sub.request_id.clone(),
            prompt,
            max_tokens: sub.max_tokens - generated.len() as u32,
            sampling: Some(sub.sampling),
            stop_ids: sub.stop_ids.clone(),
            sampler_step: generated.len() as u64,
            tenant: sub.tenant.clone(),
        };
        let cached_blocks = if generated.is_empty() { ticket.cached_blocks } else { 0 };
        let stall = Duration::from_millis(self.cfg.stall_timeout_ms);
        let call = async {
            match prefill_client {
                Some(mut c) => {
                    c.prefill(pb::PrefillRequest { request: Some(request), decode_addr, cached_blocks }).await
                }
                // Colocated: the decode node prefills too.
                None => decode_client.clone().generate(request).await,
            }
        };
        let call = tokio::select! {
            _ = tx.closed() => return Attempt::Cancelled,
            r = tokio::time::timeout(stall, call) => r,
        };
        let mut stream = match call {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(status)) => return failed(status, colocated),
            Err(_) => {
                return Attempt::Failed {
                    decode: colocated,
                    retry: true,
                    message: format!("{prefill_name} did not answer in {stall:?}"),
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return Attempt::Cancelled,
                r = tokio::time::timeout(stall, stream.message()) => r,
            };
            let ev = match next {
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => {
                    return Attempt::Failed {
                        decode: colocated,
                        retry: true,
                        message: "the stream ended before the answer".into(),
                    }
                }
                Ok(Err(status)) => return failed(status, colocated),
                Err(_) => {
                    return Attempt::Failed {
                        decode: true,
                        retry: true,
                        message: format!("no token for {stall:?} from {decode_name}"),
                    }
                }
            };
            match ev.event {
                Some(WorkerEvent::Prefilled(s)) => {
                    self.prefilled(ticket, &p, &s);
                    let tokens = (s.cached_blocks * self.model.block_tokens) as usize;
                    // A retry's prompt carries generated tokens: report the
                    // first attempt's hits only.
                    if generated.is_empty() && tx.send(Event::Cached { tokens }).await.is_err() {
                        return Attempt::Cancelled;
                    }
                }
                Some(WorkerEvent::Tokens(t)) => {
                    let now = Instant::now();
                    if timing.first.is_none() {
                        timing.first = Some(now);
                        let ttft = now.duration_since(timing.arrived).as_secs_f64();
                        self.metrics.ttft.get_or_create(&Metrics::node(&prefill_name)).observe(ttft);
                        // How far the admission-time prediction was off.
                        if ticket.placement.predicted_ttft_ms > 0.0 {
                            self.metrics.ttft_prediction.observe(ttft * 1000.0 / ticket.placement.predicted_ttft_ms);
                        }
                    } else if let Some(last) = timing.last {
                        let per = now.duration_since(last).as_secs_f64() / t.tokens.len().max(1) as f64;
                        self.metrics.tbt.get_or_create(&Metrics::node(&decode_name)).observe(per);
                    }
                    timing.last = Some(now);
                    let n = t.tokens.len() as u64;
                    for tok in t.tokens {
                        generated.push(tok.id);
                        if tx.send(Event::Token(tok)).await.is_err() {
                            return Attempt::Cancelled;
                        }
                    }
                    self.generated_total.fetch_add(n, Ordering::Relaxed);
                    self.metrics.generated_tokens.get_or_create(&Metrics::node(&decode_name)).inc_by(n);
                    let mut st = self.state.lock();
                    if let Some(placed) = st.decode[p.decode].seqs.get_mut(&ticket.id) {
                        placed.seq.context += n as u32;
                        placed.seq.remaining = placed.seq.remaining.saturating_sub(n as u32);
                    }
                    if let Some(t) = st.requests.get_mut(&ticket.id) {
                        t.generated = generated.len() as u32;
                    }
                }
                Some(WorkerEvent::Finished(f)) => return Attempt::Finished(f.reason),
                Some(WorkerEvent::Handoff(_)) | None => {}
            }
        }
    }

    /// The prefill ended: its measured time corrects the node's cost
    /// model, and the sequence is on its decode node now.
    fn prefilled(&self, ticket: &Ticket, p: &Placement, s: &pb::PrefillStats) {
        let cached = s.cached_blocks * self.model.block_tokens;
        self.cached_total.fetch_add(cached as u64, Ordering::Relaxed);
        self.metrics.cached_prompt_tokens.inc_by(cached as u64);
        let now = self.now_ms();
        let mut st = self.state.lock();
        if !self.colocated() {
            let node = &mut st.prefill[p.prefill];
            node.outstanding.remove(&ticket.id);
            if s.computed_tokens > 0 && s.prefill_us > 0 {
                node.cost.observe(s.computed_tokens, cached, s.prefill_us as f64 / 1000.0);
            }
        }
        if let Some(placed) = st.decode[p.decode].seqs.get_mut(&ticket.id) {
            placed.prefilled = true;
            placed.seq.joins_at_ms = now;
        }
        if let Some(t) = st.requests.get_mut(&ticket.id) {
            t.stage = Stage::Decoding;
            t.cached_tokens = cached;
        }
    }
}

/// When the tokens came, for TTFT and TBT.
struct Timing {
    arrived: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// A node's error status: which side (always the decode node when
/// colocated), and whether another node could do better (a request the
/// node found invalid would fail anywhere).
fn failed(status: tonic::Status, colocated: bool) -> Attempt {
    let message = status.message().to_string();
    let decode = colocated || message.starts_with("decode node");
    let retry = !matches!(status.code(), Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange);
    Attempt::Failed { decode, retry, message }
}
