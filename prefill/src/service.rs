//! The prefill gRPC service (`tandem.worker.v1.Prefill`): validation, the
//! cached-prefix read, the engine queue, and the handoff to a decode node
//! whose token stream it relays (dropping the stream cancels everything
//! downstream).

use crate::engine::{EngineStats, Job, PrefillEngine, Prefilled};
use crate::PrefillConfig;
use futures::Stream;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_decode::wire;
use tandem_kvstore::client::StoreClient;
use tandem_model::forward::Model;
use tandem_model::kv_cache::KvDType;
use tandem_proto::cluster_token::{authed, AuthChannel, ClusterToken};
use tandem_proto::handoff::{validate_request, MAX_MESSAGE_BYTES};
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_server::{Prefill, PrefillServer};
use tandem_proto::worker::{self as pb};
use tandem_proto::{block_keys, BlockKey};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The model and KV layout a worker serves (the cluster file's `[model]`).
#[derive(Debug)]
pub struct WorkerModel {
    pub model: Model,
    pub kv_dtype: KvDType,
    pub block_tokens: usize,
}

struct Inner {
    name: String,
    layout: wire::Layout,
    max_queue: usize,
    /// Accepted requests still reading their cached prefix.
    pending: Arc<std::sync::atomic::AtomicU64>,
    jobs: crossbeam_channel::Sender<Job>,
    store: Option<Arc<StoreClient>>,
    stats: Arc<EngineStats>,
    prefix_reads: bool,
    decoders: Mutex<HashMap<String, DecodeClient<AuthChannel>>>,
    /// Sent to decode nodes.
    token: Option<ClusterToken>,
    /// Measured once before serving.
    profile: pb::ProfileReply,
}

/// A running prefill node.
#[derive(Debug)]
pub struct PrefillHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    stats: Arc<EngineStats>,
}

impl PrefillHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Stops accepting requests, lets the running ones finish, then stops
    /// the engine.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        if let Some(engine) = self.engine.take() {
            let _ = tokio::task::spawn_blocking(move || engine.join()).await;
        }
    }
}

/// Starts a prefill node: binds `cfg.listen` (port 0 picks one), starts the
/// engine thread and serves until [`PrefillHandle::shutdown`]. With a
/// `store`, cached prefixes are read from it and new blocks written to it.
pub async fn serve(
    cfg: PrefillConfig,
    wm: WorkerModel,
    store: Option<Arc<StoreClient>>,
) -> Result<PrefillHandle, String> {
    cfg.validate()?;
    let layout = wire::Layout::new(&wm.model, wm.kv_dtype, wm.block_tokens, cfg.kv_memory.as_u64());
    let cache = layout.cache(&wm.model).map_err(|e| format!("prefill {}: {e}", cfg.name))?;
    let num_pages = layout.num_pages;
    let stats = Arc::new(EngineStats::default());
    stats.free_pages.store(num_pages as u64, Ordering::Relaxed);
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
    let mut engine = PrefillEngine {
        model: wm.model,
        cache,
        chunk_tokens: cfg.chunk_tokens,
        store: if cfg.store_writes { store.clone() } else { None },
        rt: tokio::runtime::Handle::current(),
        stats: stats.clone(),
        jobs: jobs_rx,
    };
    // The engine thread profiles the node before it takes jobs; serving
    // starts once the profile is in.
    let (profiled_tx, profiled) = oneshot::channel();
    let (name, profile) = (cfg.name.clone(), cfg.profile);
    let engine = std::thread::Builder::new()
        .name(format!("prefill-{}", cfg.name))
        .spawn(move || {
            let points = if profile {
                tandem_decode::profile::timed(&name, || {
                    crate::profile::prefill(&engine.model, &mut engine.cache, engine.chunk_tokens)
                })
            } else {
                Vec::new()
            };
            let _ = profiled_tx.send(points);
            engine.run()
        })
        .map_err(|e| format!("starting the engine thread: {e}"))?;
    let prefill_points =
        profiled.await.map_err(|_| format!("prefill {}: the engine thread died profiling", cfg.name))?;

    let inner = Arc::new(Inner {
        name: cfg.name.clone(),
        layout,
        max_queue: cfg.max_queue,
        pending: Arc::default(),
        jobs: jobs_tx,
        store,
        stats: stats.clone(),
        prefix_reads: cfg.prefix_reads,
        decoders: Mutex::new(HashMap::new()),
        token: cfg.cluster_token.clone(),
        profile: pb::ProfileReply { node: cfg.name.clone(), prefill: prefill_points, decode: Vec::new() },
    });
    let svc = PrefillServer::new(PrefillService { inner })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = tonic::service::Routes::new(svc);
    let server =
        wire::spawn_server(&format!("prefill {}", cfg.name), cfg.listen, routes, cfg.cluster_token.clone()).await?;
    let addr = server.addr;
    tracing::info!(node = %cfg.name, %addr, pages = num_pages, "prefill node serving");
    Ok(PrefillHandle { addr, shutdown: Some(server.stop), server: Some(server.task), engine: Some(engine), stats })
}

struct PrefillService {
    inner: Arc<Inner>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Prefill for PrefillService {
    type PrefillStream = EventStream;

    async fn prefill(&self, req: Request<pb::PrefillRequest>) -> Result<Response<EventStream>, Status> {
        let req = req.into_inner();
        let r = req.request.ok_or_else(|| Status::invalid_argument("the prefill request has no request"))?;
        validate_request(&r).map_err(Status::invalid_argument)?;
        let inner = &self.inner;
        wire::check_against_model(&r, inner.layout.vocab, inner.layout.context).map_err(Status::invalid_argument)?;
        if req.decode_addr.len() > 256 {
            return Err(Status::invalid_argument("decode_addr is longer than 256 bytes"));
        }
        let pages = r.prompt.len().div_ceil(inner.layout.block_tokens);
        if pages > inner.layout.num_pages {
            return Err(Status::resource_exhausted(format!(
                "the prompt needs {pages} KV pages; prefill node {} has {}",
                inner.name, inner.layout.num_pages
            )));
        }
        let queued = inner.stats.queued_requests.load(Ordering::Relaxed);
        let Some(pending) = wire::Pending::take(&inner.pending, queued, inner.max_queue) else {
            return Err(Status::resource_exhausted(format!(
                "prefill node {} has {} requests queued (max_queue)",
                inner.name, inner.max_queue
            )));
        };
        let (tx, rx) = mpsc::channel(64);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let work = inner.run(r, req.decode_addr, req.cached_blocks, &tx, pending);
            tokio::select! {
                result = work => if let Err(status) = result {
                    let _ = tx.send(Err(status)).await;
                },
                // The caller went away: dropping `work` cancels the job and
                // the decode stream.
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::PrefillStatus>, Status> {
        let i = &self.inner;
        let s = &i.stats;
        let queued_tokens = s.queued_tokens.load(Ordering::Relaxed);
        let tps = s.tokens_per_second();
        Ok(Response::new(pb::PrefillStatus {
            node: i.name.clone(),
            queued_requests: s.queued_requests.load(Ordering::Relaxed) as u32,
            queued_tokens,
            predicted_work_us: if tps > 0.0 { (queued_tokens as f64 / tps * 1e6) as u64 } else { 0 },
            tokens_per_second: tps,
            completed_requests: s.completed.load(Ordering::Relaxed),
            computed_tokens: s.computed_tokens.load(Ordering::Relaxed),
            cached_tokens: s.cached_tokens.load(Ordering::Relaxed),
            stored_blocks: s.stored_blocks.load(Ordering::Relaxed),
            model_fingerprint: i.layout.fingerprint.clone(),
            block_tokens: i.layout.block_tokens as u32,
            kv_pages_total: i.layout.num_pages as u32,
            kv_pages_free: s.free_pages.load(Ordering::Relaxed) as u32,
            compute_us: s.compute_ns.load(Ordering::Relaxed) / 1000,
            store_put_bytes: i.store.as_ref().map_or(0, |c| c.metrics().put_bytes.load(Ordering::Relaxed)),
            store_get_bytes: i.store.as_ref().map_or(0, |c| c.metrics().get_bytes.load(Ordering::Relaxed)),
            store_reads: i.store.as_ref().map(|c| c.metrics().read_counters()),
        }))
    }

    async fn profile(&self, _req: Request<pb::ProfileRequest>) -> Result<Response<pb::ProfileReply>, Status> {
        Ok(Response::new(self.inner.profile.clone()))
    }
}

impl Inner {
    async fn run(
        &self,
        r: pb::GenerateRequest,
        decode_addr: String,
        cached_hint: u32,
        tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
        pending: wire::Pending,
    ) -> Result<(), Status> {
        let enqueued = Instant::now();
        let keys = block_keys(self.layout.salt.for_tenant(&r.tenant), &r.prompt, self.layout.block_tokens);
        // At least the prompt's last token is computed: its logits give the
        // first token.
        let usable = ((r.prompt.len() - 1) / self.layout.block_tokens).min(keys.len());
        let cached = self.read_prefix(&keys[..usable]).await;
        if cached_hint as usize != cached.len() {
            tracing::debug!(request = %r.request_id, hint = cached_hint, read = cached.len(), "cached prefix differs from the scheduler's view");
        }
        let sampling = r.sampling.as_ref().map(wire::sampling_params).unwrap_or_default();
        let (reply_tx, reply_rx) = oneshot::channel();
        let job = Job {
            id: r.request_id.clone(),
            prompt: r.prompt.clone(),
            sampling,
            sampler_step: r.sampler_step,
            keys: keys.clone(),
            cached,
            enqueued,
            reply: reply_tx,
        };
        self.jobs.send(job).map_err(|_| Status::unavailable("the prefill engine has stopped"))?;
        // The engine counts it from here (it may take a moment to notice).
        tokio::task::yield_now().await;
        drop(pending);
        let done: Prefilled = reply_rx
            .await
            .map_err(|_| Status::internal("the prefill engine dropped the request"))?
            .map_err(Status::resource_exhausted)?;
        let stored = match done.stored {
            Some(task) => task.await.unwrap_or(0),
            None => 0,
        };
        self.stats.stored_blocks.fetch_add(stored as u64, Ordering::Relaxed);
        let stats = pb::PrefillStats {
            cached_blocks: done.cached_blocks as u32,
            computed_tokens: done.computed_tokens as u32,
            stored_blocks: stored as u32,
            queue_us: done.queue.as_micros() as u64,
            prefill_us: done.compute.as_micros() as u64,
            node: self.name.clone(),
        };
        let handoff = pb::Handoff {
            request: Some(r),
            model_fingerprint: self.layout.fingerprint.clone(),
            kv_dtype: self.layout.kv_dtype.name().into(),
            block_tokens: self.layout.block_tokens as u32,
            block_keys: keys.iter().map(|k| k.0).collect(),
            partial_block: done.partial,
            partial_tokens: done.partial_tokens as u32,
            first_token: Some(wire::token_to_pb(&done.first)),
            sampler_step: done.sampler_step,
            prefill: Some(stats.clone()),
        };
        if decode_addr.is_empty() {
            let _ = tx.send(Ok(pb::GenerateEvent { event: Some(Event::Handoff(handoff)) })).await;
            return Ok(());
        }
        if tx.send(Ok(pb::GenerateEvent { event: Some(Event::Prefilled(stats)) })).await.is_err() {
            return Ok(());
        }
        let mut decoder = self.decoder(&decode_addr)?;
        let mut stream =
            decoder.decode(handoff).await.map_err(|e| relabel(&decode_addr, "refused the handoff", e))?.into_inner();
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    if tx.send(Ok(ev)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(relabel(&decode_addr, "failed mid-stream", e)),
            }
        }
    }

    /// The longest run of leading blocks the store holds, read into memory
    /// (any store failure is a miss: the blocks are computed instead).
    async fn read_prefix(&self, keys: &[BlockKey]) -> Vec<Vec<u8>> {
        let Some(store) = &self.store else { return Vec::new() };
        if keys.is_empty() || !self.prefix_reads {
            return Vec::new();
        }
        let n = match store.longest_prefix(keys).await {
            Ok(n) => n.min(keys.len()),
            Err(e) => {
                tracing::warn!("store lookup failed; computing the whole prompt: {e}");
                return Vec::new();
            }
        };
        if n == 0 {
            return Vec::new();
        }
        match store.get(&keys[..n], self.layout.block_bytes).await {
            Ok(blocks) => blocks.into_iter().map_while(|b| b.filter(|b| b.len() == self.layout.block_bytes)).collect(),
            Err(e) => {
                tracing::warn!("store read failed; computing the whole prompt: {e}");
                Vec::new()
            }
        }
    }

    fn decoder(&self, addr: &str) -> Result<DecodeClient<AuthChannel>, Status> {
        let mut map = self.decoders.lock();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("decode_addr {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        let client = DecodeClient::new(authed(endpoint.connect_lazy(), self.token.as_ref()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        map.insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}

/// A decode node's error, said from the prefill node's side. Unreachable
/// or dead decode nodes are `unavailable` (the caller may retry elsewhere).
fn relabel(addr: &str, what: &str, e: Status) -> Status {
    let msg = format!("decode node {addr} {what}: {}", e.message());
    match e.code() {
        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted | tonic::Code::FailedPrecondition => {
            Status::new(e.code(), msg)
        }
        _ => Status::unavailable(msg),
    }
}
