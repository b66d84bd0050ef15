//! The servers of the serving bench and the deterministic prompts they are
//! sent. Each server (the store, every worker) runs in this process on a
//! tokio runtime of its own, as it would in a process of its own: a server
//! busy with its work stalls neither the others nor the bench's clients,
//! which time the replies on the caller's runtime. Workers listen on
//! loopback ports the OS picks and load a model of their own.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytesize::ByteSize;
use tandem_decode::engine::EngineStats as DecodeStats;
use tandem_decode::{DecodeConfig, DecodeHandle};
use tandem_kernels::Precision;
use tandem_kvstore::client::StoreClient;
use tandem_kvstore::transport::TransportPreference;
use tandem_model::forward::Model;
use tandem_model::kv_cache::KvDType;
use tandem_prefill::engine::EngineStats as PrefillStats;
use tandem_prefill::service::WorkerModel;
use tandem_prefill::{PrefillConfig, PrefillHandle};
use tandem_proto::handoff::MAX_MESSAGE_BYTES;
use tandem_proto::worker::decode_client::DecodeClient;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_client::PrefillClient;
use tandem_proto::worker::{self as pb};
use tokio::runtime::Runtime;
use tonic::transport::{Channel, Endpoint};

use super::Settings;
use crate::kvstore::cluster::Cluster;
use crate::kvstore::sys::SplitMix64;

/// The KV element type of every node.
pub const KV_DTYPE: KvDType = KvDType::F32;
/// KV pages of a prefill node (one prompt at a time needs a few MiB).
const PREFILL_KV_MEMORY: ByteSize = ByteSize::mib(64);
/// KV pages of the decode node: the running batch of short prompts.
const DECODE_KV_MEMORY: ByteSize = ByteSize::mib(128);
/// Longest wait for a node to stop once asked to.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Tokio workers of each server's runtime.
const SERVER_WORKER_THREADS: usize = 2;

/// A server's own tokio runtime. Dropping it (also on error paths, inside
/// the bench's async code) stops its workers without blocking.
#[derive(Debug)]
struct ServerRuntime {
    name: String,
    rt: Option<Runtime>,
}

impl ServerRuntime {
    fn new(name: &str) -> anyhow::Result<ServerRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_WORKER_THREADS)
            .thread_name(format!("{name}-rt"))
            .enable_all()
            .build()
            .with_context(|| format!("starting the runtime of {name}"))?;
        Ok(ServerRuntime { name: name.to_owned(), rt: Some(rt) })
    }

    fn handle(&self) -> anyhow::Result<&tokio::runtime::Handle> {
        self.rt.as_ref().map(Runtime::handle).with_context(|| format!("the runtime of {} has stopped", self.name))
    }

    /// Runs `fut` on this runtime and waits for it from the caller's.
    async fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> anyhow::Result<T> {
        self.handle()?.spawn(fut).await.with_context(|| format!("a task on the runtime of {} failed", self.name))
    }

    /// A store client whose connections live on this runtime.
    fn store_client(&self, store: &StoreNode) -> anyhow::Result<Arc<StoreClient>> {
        let _entered = self.handle()?.enter();
        store.cluster.client(TransportPreference::Shm)
    }

    /// Stops `fut` (a server's shutdown) on this runtime, then the runtime.
    async fn shut_down(mut self, fut: impl Future<Output = ()> + Send + 'static) {
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.run(fut)).await.is_err() {
            eprintln!("[serving bench] warning: {} did not stop within {SHUTDOWN_TIMEOUT:?}", self.name);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The store: a master and one storage node (see [`Cluster`]) on a
/// runtime of their own.
#[derive(Debug)]
pub struct StoreNode {
    cluster: Cluster,
    rt: ServerRuntime,
}

impl StoreNode {
    pub async fn start(shm_dir: &Path, dram: ByteSize) -> anyhow::Result<StoreNode> {
        let rt = ServerRuntime::new("store")?;
        let dir: PathBuf = shm_dir.to_owned();
        let cluster = rt.run(async move { Cluster::start(&dir, dram).await }).await??;
        Ok(StoreNode { cluster, rt })
    }

    pub async fn shutdown(self) {
        let StoreNode { cluster, rt } = self;
        rt.shut_down(cluster.shutdown()).await;
    }
}

/// Loads the model on the blocking pool (it reads the weights from disk).
async fn load_model(path: &Path) -> anyhow::Result<Model> {
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || tandem_model::engine::load(&owned, Precision::Fast))
        .await
        .context("the model loading task failed")?
        .with_context(|| format!("loading the model {}", path.display()))?;
    Ok(loaded.model)
}

async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .context("a worker address")?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to the worker on {addr}"))
}

/// What the bench needs to know of the model the nodes serve.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub vocab: usize,
    pub context: usize,
    pub block_tokens: usize,
    /// Bytes of one KV block (one page, every layer).
    pub block_bytes: usize,
}

impl ModelShape {
    fn of(model: &Model, block_tokens: usize) -> ModelShape {
        let geometry = model.kv_geometry(block_tokens);
        ModelShape {
            vocab: model.config().vocab_size,
            context: model.config().max_position_embeddings,
            block_tokens,
            block_bytes: geometry.page_elems() * KV_DTYPE.bytes(),
        }
    }
}

/// A running prefill node and a client of it.
#[derive(Debug)]
pub struct PrefillNode {
    handle: PrefillHandle,
    client: PrefillClient<Channel>,
    rt: ServerRuntime,
    pub shape: ModelShape,
    pub name: String,
}

impl PrefillNode {
    /// A node reading cached prefixes from `store`, and writing new blocks
    /// to it when `store_writes` (else compute only).
    pub async fn start(
        name: &str,
        model: &Path,
        settings: &Settings,
        store_writes: bool,
        store: &StoreNode,
    ) -> anyhow::Result<PrefillNode> {
        let rt = ServerRuntime::new(name)?;
        let store = rt.store_client(store)?;
        let model = load_model(model).await?;
        let shape = ModelShape::of(&model, settings.block_tokens);
        let cfg = PrefillConfig {
            name: name.to_owned(),
            listen: ([127, 0, 0, 1], 0).into(),
            kv_memory: PREFILL_KV_MEMORY,
            chunk_tokens: settings.overlap.chunk_tokens,
            store_writes,
            // No scheduler reads it here.
            profile: false,
            ..PrefillConfig::default()
        };
        let wm = WorkerModel { model, kv_dtype: KV_DTYPE, block_tokens: settings.block_tokens };
        let handle = rt
            .run(tandem_prefill::serve(cfg, wm, Some(store)))
            .await?
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("starting prefill node {name}"))?;
        let client = match channel(handle.local_addr()).await {
            Ok(ch) => PrefillClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            Err(e) => {
                rt.shut_down(handle.shutdown()).await;
                return Err(e);
            }
        };
        Ok(PrefillNode { handle, client, rt, shape, name: name.to_owned() })
    }

    pub fn stats(&self) -> &PrefillStats {
        self.handle.stats()
    }

    /// Prefills `prompt` without a decode node (greedy, no stop ids) and
    /// returns its handoff, timed from sending the request until the
    /// handoff arrived.
    pub async fn prefill(&self, id: String, prompt: Vec<u32>, max_tokens: u32) -> anyhow::Result<Prefilled> {
        let request = pb::GenerateRequest {
            request_id: id.clone(),
            prompt,
            max_tokens,
            sampling: Some(pb::SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }),
            stop_ids: Vec::new(),
            sampler_step: 0,
            tenant: String::new(),
        };
        let req = pb::PrefillRequest { request: Some(request), decode_addr: String::new(), cached_blocks: 0 };
        let mut client = self.client.clone();
        let sent = Instant::now();
        let mut stream = client
            .prefill(req)
            .await
            .with_context(|| format!("prefill node {} refused request {id}", self.name))?
            .into_inner();
        let event =
            stream.message().await.with_context(|| format!("prefill node {} failed request {id}", self.name))?;
        let wall = sent.elapsed();
        let Some(pb::GenerateEvent { event: Some(Event::Handoff(handoff)) }) = event else {
            bail!("prefill node {} answered request {id} with {event:?}, not a handoff", self.name);
        };
        let Some(stats) = handoff.prefill.clone() else {
            bail!("prefill node {}'s handoff of request {id} has no prefill stats", self.name);
        };
        Ok(Prefilled { handoff, stats, wall })
    }

    /// Stops the node (its client first, so no connection holds it open).
    pub async fn shutdown(self) {
        let PrefillNode { handle, client, rt, .. } = self;
        drop(client);
        rt.shut_down(handle.shutdown()).await;
    }
}

/// A prefilled prompt.
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub handoff: pb::Handoff,
    pub stats: pb::PrefillStats,
    /// From sending the request until the handoff arrived.
    pub wall: Duration,
}

impl Prefilled {
    /// Checks that the whole prompt was computed (nothing came from the
    /// cache) and, when `stored` is given, that the node stored that many
    /// blocks.
    pub fn expect_fresh(&self, prompt_tokens: usize, stored: Option<usize>) -> anyhow::Result<()> {
        let s = &self.stats;
        let id = self.handoff.request.as_ref().map_or("?", |r| r.request_id.as_str());
        if s.cached_blocks != 0 || s.computed_tokens as usize != prompt_tokens {
            bail!(
                "request {id}: {} blocks came from the cache and {} of {prompt_tokens} tokens were computed; \
                 every prompt must be new to the store",
                s.cached_blocks,
                s.computed_tokens
            );
        }
        if let Some(want) = stored.filter(|&w| w != s.stored_blocks as usize) {
            bail!("request {id}: node {} stored {} blocks, expected {want}", s.node, s.stored_blocks);
        }
        Ok(())
    }
}

/// A running decode node, a client of it and the node's own store client
/// (whose counters are the node's fetches).
#[derive(Debug)]
pub struct DecodeNode {
    handle: DecodeHandle,
    rt: ServerRuntime,
    pub client: DecodeClient<Channel>,
    pub store: Arc<StoreClient>,
    pub name: String,
}

impl DecodeNode {
    pub async fn start(name: &str, model: &Path, settings: &Settings, store: &StoreNode) -> anyhow::Result<DecodeNode> {
        let rt = ServerRuntime::new(name)?;
        let store = rt.store_client(store)?;
        let model = load_model(model).await?;
        let cfg = DecodeConfig {
            name: name.to_owned(),
            listen: ([127, 0, 0, 1], 0).into(),
            kv_memory: DECODE_KV_MEMORY,
            max_batch: settings.tbt.max_batch,
            profile: false,
            ..DecodeConfig::default()
        };
        let block_tokens = settings.block_tokens;
        let handle = rt
            .run(tandem_decode::serve(cfg, model, KV_DTYPE, block_tokens, Some(store.clone())))
            .await?
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("starting decode node {name}"))?;
        let client = match channel(handle.local_addr()).await {
            Ok(ch) => DecodeClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            Err(e) => {
                rt.shut_down(handle.shutdown()).await;
                return Err(e);
            }
        };
        Ok(DecodeNode { handle, rt, client, store, name: name.to_owned() })
    }

    pub fn stats(&self) -> &DecodeStats {
        self.handle.stats()
    }

    /// Stops the node once its streams are gone (the caller drops them).
    pub async fn shutdown(self) {
        let DecodeNode { handle, client, rt, .. } = self;
        drop(client);
        rt.shut_down(handle.shutdown()).await;
    }
}

/// Which prompts a stage sends; with the index it seeds the generator, so
/// every prompt of the bench differs from every other from its first
/// token and none hits a block another one stored.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum PromptSet {
    OverlapWarmup = 1,
    Overlap = 2,
    Long = 3,
    Short = 4,
}

/// The `index`-th prompt of `set`: `len` token ids below `vocab`.
pub fn prompt(set: PromptSet, index: u64, len: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SplitMix64::new(((set as u64) << 32) ^ index);
    (0..len).map(|_| rng.below(vocab) as u32).collect()
}

/// Polls `done` every millisecond until it holds; an error naming `what`
/// after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_deterministic_in_range_and_distinct() {
        let a = prompt(PromptSet::Overlap, 0, 2000, 4096);
        assert_eq!(a, prompt(PromptSet::Overlap, 0, 2000, 4096));
        assert!(a.iter().all(|&t| t < 4096));
        assert_ne!(a[..16], prompt(PromptSet::Overlap, 1, 2000, 4096)[..16]);
        assert_ne!(a[..16], prompt(PromptSet::Long, 0, 2000, 4096)[..16]);
    }
}
