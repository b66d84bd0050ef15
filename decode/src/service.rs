//! The decode gRPC service (`tandem.worker.v1.Decode`): validates a
//! handoff against this node's model and KV layout, streams the first
//! token at once, reads the blocks from the store while the engine keeps
//! decoding, then hands the sequence to the engine's continuous batch. A
//! colocated `Generate` goes to the engine straight away: the engine
//! computes its prompt.

use crate::engine::{
    fetch, finished_event, Admission, DecodeEngine, EngineStats, Origin, Pacer, PromptStats, RequestStats,
};
use crate::local_cache::LocalCache;
use crate::{wire, DecodeConfig};
use futures::Stream;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tandem_kvstore::client::StoreClient;
use tandem_model::engine::FinishReason;
use tandem_model::forward::Model;
use tandem_model::kv_cache::KvDType;
use tandem_model::sampling::Sampler;
use tandem_proto::handoff::{validate_handoff, validate_request, MAX_MESSAGE_BYTES};
use tandem_proto::worker::decode_server::{Decode, DecodeServer};
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::{self as pb};
use tandem_proto::{block_keys, BlockKey};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

struct Inner {
    name: String,
    layout: wire::Layout,
    max_waiting: usize,
    /// Accepted requests not yet with the engine (handoffs fetching their
    /// blocks).
    pending: Arc<std::sync::atomic::AtomicU64>,
    admissions: crossbeam_channel::Sender<Admission>,
    store: Option<Arc<StoreClient>>,
    pacer: Arc<Pacer>,
    stats: Arc<EngineStats>,
    /// Measured once before serving.
    profile: pb::ProfileReply,
}

/// A running decode node.
#[derive(Debug)]
pub struct DecodeHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    draining: Arc<AtomicBool>,
    stats: Arc<EngineStats>,
}

impl DecodeHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Stops accepting handoffs, finishes the running and waiting
    /// sequences, then stops the engine.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self.draining.store(true, Ordering::Relaxed);
        if let Some(engine) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        }
    }
}

/// Starts a decode node on `cfg.listen` (port 0 picks one).
pub async fn serve(
    cfg: DecodeConfig,
    model: Model,
    kv_dtype: KvDType,
    block_tokens: usize,
    store: Option<Arc<StoreClient>>,
) -> Result<DecodeHandle, String> {
    cfg.validate()?;
    let layout = wire::Layout::new(&model, kv_dtype, block_tokens, cfg.kv_memory.as_u64());
    let cache = layout.cache(&model).map_err(|e| format!("decode {}: {e}", cfg.name))?;
    let (salt, num_pages) = (layout.salt, layout.num_pages);
    let stats = Arc::new(EngineStats::default());
    stats.free_pages.store(num_pages as u64, Ordering::Relaxed);
    let draining = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    // Modeled forward passes wait on a clock instead of using the cores, so
    // a fetch competes with nothing and pacing it would only delay joins.
    let duty = if model.is_modeled() { 1.0 } else { cfg.prefetch_duty };
    let pacer = Arc::new(Pacer::new(duty, stats.clone()));
    let mut engine = DecodeEngine {
        name: cfg.name.clone(),
        model,
        cache,
        salt,
        max_batch: cfg.max_batch,
        chunk_tokens: cfg.chunk_tokens,
        store: store.clone(),
        write_back: cfg.write_back,
        rt: tokio::runtime::Handle::current(),
        stats: stats.clone(),
        rx,
        resubmit: tx.clone(),
        draining: draining.clone(),
        pacer: pacer.clone(),
        local: LocalCache::new(cfg.local_cache.as_u64()),
    };
    // The engine thread profiles the node before it takes handoffs;
    // serving starts once the profile is in.
    let (profiled_tx, profiled) = oneshot::channel();
    let profile = cfg.profile;
    let engine = std::thread::Builder::new()
        .name(format!("decode-{}", cfg.name))
        .spawn(move || {
            let points = if profile {
                crate::profile::timed(&engine.name, || {
                    crate::profile::decode(&engine.model, &mut engine.cache, engine.max_batch)
                })
            } else {
                Vec::new()
            };
            let _ = profiled_tx.send(points);
            engine.run()
        })
        .map_err(|e| format!("starting the engine thread: {e}"))?;
    let decode_points = profiled.await.map_err(|_| format!("decode {}: the engine thread died profiling", cfg.name))?;
    let inner = Arc::new(Inner {
        name: cfg.name.clone(),
        layout,
        max_waiting: cfg.max_waiting,
        pending: Arc::default(),
        admissions: tx,
        store,
        pacer,
        stats: stats.clone(),
        profile: pb::ProfileReply { node: cfg.name.clone(), prefill: Vec::new(), decode: decode_points },
    });
    let svc = DecodeServer::new(DecodeService { inner })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(svc);
    let server =
        wire::spawn_server(&format!("decode {}", cfg.name), cfg.listen, routes, cfg.cluster_token.clone()).await?;
    let addr = server.addr;
    tracing::info!(node = %cfg.name, %addr, pages = num_pages, "decode node serving");
    Ok(DecodeHandle {
        addr,
        shutdown: Some(server.stop),
        server: Some(server.task),
        engine: Some(engine),
        draining,
        stats,
    })
}

struct DecodeService {
    inner: Arc<Inner>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Decode for DecodeService {
    type DecodeStream = EventStream;

    async fn decode(&self, req: Request<pb::Handoff>) -> Result<Response<EventStream>, Status> {
        let h = req.into_inner();
        let i = &self.inner;
        validate_handoff(&h).map_err(Status::invalid_argument)?;
        if h.model_fingerprint != i.layout.fingerprint
            || h.kv_dtype != i.layout.kv_dtype.name()
            || h.block_tokens as usize != i.layout.block_tokens
        {
            return Err(Status::failed_precondition(format!(
                "handoff for model {} with {} KV in blocks of {}; decode node {} serves {} with {} KV in blocks of {}",
                h.model_fingerprint,
                h.kv_dtype,
                h.block_tokens,
                i.name,
                i.layout.fingerprint,
                i.layout.kv_dtype.name(),
                i.layout.block_tokens
            )));
        }
        let r = h.request.ok_or_else(|| Status::invalid_argument("the handoff has no request"))?;
        wire::check_against_model(&r, i.layout.vocab, i.layout.context).map_err(Status::invalid_argument)?;
        if h.partial_tokens > 0 && h.partial_block.len() != i.layout.block_bytes {
            return Err(Status::invalid_argument(format!(
                "partial block of {} bytes; blocks here are {} bytes",
                h.partial_block.len(),
                i.layout.block_bytes
            )));
        }
        let salt = i.layout.salt.for_tenant(&r.tenant);
        let keys = block_keys(salt, &r.prompt, i.layout.block_tokens);
        if keys.iter().map(|k| k.0).ne(h.block_keys.iter().copied()) {
            return Err(Status::invalid_argument("the handoff's block keys do not match its prompt"));
        }
        let first = h.first_token.ok_or_else(|| Status::invalid_argument("the handoff has no first token"))?;
        if first.id as usize >= i.layout.vocab {
            return Err(Status::invalid_argument(format!("first token {} is outside the vocabulary", first.id)));
        }
        let pages = (r.prompt.len() + 1).div_ceil(i.layout.block_tokens);
        if pages > i.layout.num_pages {
            return Err(Status::resource_exhausted(format!(
                "the sequence needs {pages} KV pages; decode node {} has {}",
                i.name, i.layout.num_pages
            )));
        }
        let waiting = i.stats.waiting.load(Ordering::Relaxed);
        let Some(pending) = wire::Pending::take(&i.pending, waiting, i.max_waiting) else {
            return Err(Status::resource_exhausted(format!(
                "decode node {} has {} handoffs waiting",
                i.name, i.max_waiting
            )));
        };
        let sampling =
            r.sampling.as_ref().ok_or_else(|| Status::invalid_argument("the request has no sampling parameters"))?;
        let params = wire::sampling_params(sampling);
        let sampler = Sampler::resume(params, h.sampler_step).map_err(|e| Status::invalid_argument(e.to_string()))?;

        let (out, events) = mpsc::unbounded_channel();
        let tokens_event = Event::Tokens(pb::Tokens { tokens: vec![first.clone()] });
        let _ = out.send(Ok(pb::GenerateEvent { event: Some(tokens_event) }));
        let prompt_len = r.prompt.len();
        let mut tokens = r.prompt;
        tokens.push(first.id);
        let mut a = Admission {
            id: r.request_id,
            tokens,
            prompt_len,
            max_tokens: r.max_tokens as usize,
            stop_ids: r.stop_ids,
            sampler,
            keys: keys.into_iter().collect::<Vec<BlockKey>>(),
            salt,
            fetched: Vec::new(),
            partial: h.partial_block,
            partial_tokens: h.partial_tokens as usize,
            origin: Origin::Handoff,
            out,
            stats: RequestStats::default(),
        };
        let finish = if a.stop_ids.contains(&first.id) {
            Some(FinishReason::Stop)
        } else if a.max_tokens <= 1 {
            Some(FinishReason::Length)
        } else if a.tokens.len() >= i.layout.context {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        if let Some(reason) = finish {
            let _ = a.out.send(Ok(finished_event(&a, reason, &i.name)));
            return Ok(Response::new(Box::pin(UnboundedReceiverStream::new(events))));
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            fetch(inner.store.as_deref(), &mut a, inner.layout.block_bytes, &inner.pacer).await;
            if let Err(e) = inner.admissions.send(a) {
                let _ = e.0.out.send(Err(Status::unavailable("the decode engine has stopped")));
            }
            drop(pending);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(events))))
    }

    type GenerateStream = EventStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        let i = &self.inner;
        validate_request(&r).map_err(Status::invalid_argument)?;
        wire::check_against_model(&r, i.layout.vocab, i.layout.context).map_err(Status::invalid_argument)?;
        let pages = r.prompt.len().div_ceil(i.layout.block_tokens);
        if pages > i.layout.num_pages {
            return Err(Status::resource_exhausted(format!(
                "the prompt needs {pages} KV pages; decode node {} has {}",
                i.name, i.layout.num_pages
            )));
        }
        let sampling =
            r.sampling.as_ref().ok_or_else(|| Status::invalid_argument("the request has no sampling parameters"))?;
        let sampler = Sampler::resume(wire::sampling_params(sampling), r.sampler_step)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let waiting = i.stats.waiting.load(Ordering::Relaxed);
        let Some(pending) = wire::Pending::take(&i.pending, waiting, i.max_waiting) else {
            return Err(Status::resource_exhausted(format!(
                "decode node {} has {} requests waiting",
                i.name, i.max_waiting
            )));
        };
        let (out, events) = mpsc::unbounded_channel();
        let salt = i.layout.salt.for_tenant(&r.tenant);
        let a = Admission {
            id: r.request_id,
            keys: block_keys(salt, &r.prompt, i.layout.block_tokens),
            salt,
            prompt_len: r.prompt.len(),
            tokens: r.prompt,
            max_tokens: r.max_tokens as usize,
            stop_ids: r.stop_ids,
            sampler,
            fetched: Vec::new(),
            partial: Vec::new(),
            partial_tokens: 0,
            origin: Origin::Colocated(PromptStats::new()),
            out,
            stats: RequestStats::default(),
        };
        let sent = i.admissions.send(a);
        drop(pending);
        if sent.is_err() {
            return Err(Status::unavailable(format!("decode node {}: the engine has stopped", i.name)));
        }
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(events))))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::DecodeStatus>, Status> {
        let i = &self.inner;
        let s = &i.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(pb::DecodeStatus {
            node: i.name.clone(),
            batch_size: get(&s.batch_size) as u32,
            waiting: get(&s.waiting) as u32,
            kv_pages_total: i.layout.num_pages as u32,
            kv_pages_free: get(&s.free_pages) as u32,
            step_us: get(&s.step_ns) / 1000,
            completed_requests: get(&s.completed),
            generated_tokens: get(&s.generated),
            fetched_blocks: get(&s.fetched_blocks),
            recomputed_tokens: get(&s.recomputed_tokens),
            written_back_blocks: get(&s.written_back),
            preemptions: get(&s.preemptions),
            model_fingerprint: i.layout.fingerprint.clone(),
            block_tokens: i.layout.block_tokens as u32,
            context_tokens: get(&s.context_tokens),
            local_cache_hits: get(&s.local_cache_hits),
            local_cache_blocks: get(&s.local_cache_blocks),
            compute_us: get(&s.compute_ns) / 1000,
            store_put_bytes: i.store.as_ref().map_or(0, |c| get(&c.metrics().put_bytes)),
            store_get_bytes: i.store.as_ref().map_or(0, |c| get(&c.metrics().get_bytes)),
            store_reads: i.store.as_ref().map(|c| c.metrics().read_counters()),
        }))
    }

    async fn profile(&self, _req: Request<pb::ProfileRequest>) -> Result<Response<pb::ProfileReply>, Status> {
        Ok(Response::new(self.inner.profile.clone()))
    }
}
