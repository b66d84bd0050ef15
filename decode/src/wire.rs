//! Conversions between the worker messages and the engine's types, shared
//! by the prefill side (which builds handoffs) and the decode side (which
//! consumes them).

use tandem_model::sampling::{Sampled, SamplingParams};
use tandem_proto::worker as pb;

/// The engine's sampling parameters from a validated request.
pub fn sampling_params(s: &pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        seed: s.seed,
        logprobs: s.logprobs.map(|n| n as usize),
    }
}

/// The wire form of a sampling parameter set.
pub fn sampling_to_pb(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.min(u32::MAX as usize) as u32,
        top_p: s.top_p,
        seed: s.seed,
        logprobs: s.logprobs.map(|n| n as u32),
    }
}

pub fn token_to_pb(t: &Sampled) -> pb::Token {
    pb::Token {
        id: t.token,
        logprob: t.logprob,
        top: t.top_logprobs.iter().map(|&(token, logprob)| pb::TopLogprob { token, logprob }).collect(),
    }
}

pub fn token_from_pb(t: &pb::Token) -> Sampled {
    Sampled { token: t.id, logprob: t.logprob, top_logprobs: t.top.iter().map(|x| (x.token, x.logprob)).collect() }
}

/// Checks the parts of a request that depend on the model: token ids in
/// the vocabulary and room in the context for at least one new token.
pub fn check_against_model(r: &pb::GenerateRequest, vocab_size: usize, context_len: usize) -> Result<(), String> {
    if let Some(&bad) = r.prompt.iter().chain(&r.stop_ids).find(|&&t| t as usize >= vocab_size) {
        return Err(format!("token id {bad} is outside the vocabulary (size {vocab_size})"));
    }
    if r.prompt.len() >= context_len {
        return Err(format!("the prompt has {} tokens; the model's context length is {context_len}", r.prompt.len()));
    }
    Ok(())
}

/// `stop`, `length` or `context_full`, as the wire spells a finish reason.
pub fn finish_reason(r: tandem_model::engine::FinishReason) -> &'static str {
    use tandem_model::engine::FinishReason::*;
    match r {
        Stop => "stop",
        Length => "length",
        ContextFull => "context_full",
    }
}

/// What a worker serves and how its KV is laid out: the model's identity
/// and limits, the block size and dtype, and the page pool that fits its
/// KV memory. Prefill and decode nodes must agree on all of it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub salt: tandem_proto::KeySalt,
    pub fingerprint: String,
    pub kv_dtype: tandem_model::kv_cache::KvDType,
    pub block_tokens: usize,
    pub block_bytes: usize,
    pub num_pages: usize,
    pub vocab: usize,
    pub context: usize,
}

impl Layout {
    pub fn new(
        model: &tandem_model::forward::Model,
        kv_dtype: tandem_model::kv_cache::KvDType,
        block_tokens: usize,
        kv_memory: u64,
    ) -> Layout {
        let block_bytes = model.kv_geometry(block_tokens).page_elems() * kv_dtype.bytes();
        let fingerprint = model.fingerprint();
        Layout {
            salt: tandem_proto::KeySalt::new(&fingerprint, kv_dtype.name(), block_tokens),
            fingerprint,
            kv_dtype,
            block_tokens,
            block_bytes,
            num_pages: (kv_memory as usize / block_bytes.max(1)).max(1),
            vocab: model.config().vocab_size,
            context: model.config().max_position_embeddings,
        }
    }

    /// The node's page pool.
    pub fn cache(&self, model: &tandem_model::forward::Model) -> Result<tandem_model::kv_cache::KvCache, String> {
        tandem_model::kv_cache::KvCache::new(model.kv_geometry(self.block_tokens), self.num_pages, self.kv_dtype)
            .map_err(|e| e.to_string())
    }
}

/// A worker's gRPC server, serving until its stop sender fires or drops.
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `listen` (port 0 picks one) and serves `routes` there with
/// graceful shutdown: on stop, in-flight streams run to their end. With a
/// cluster `token`, calls without it are refused (`UNAUTHENTICATED`).
pub async fn spawn_server(
    what: &str,
    listen: std::net::SocketAddr,
    routes: tonic::service::Routes,
    token: Option<tandem_proto::cluster_token::ClusterToken>,
) -> Result<Server, String> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("{what}: cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Tokens are small writes: without TCP_NODELAY they wait for the
    // client's delayed ACK (40 ms bursts).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let what = what.to_owned();
    let task = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .layer(tandem_proto::cluster_token::require_token(token))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("{what}: server stopped: {e}");
        }
    });
    Ok(Server { addr, stop, task })
}

/// Counts requests a worker has accepted but not yet handed to its engine
/// (reading from the store), so queue limits see them too. The count drops
/// when the guard does, whatever path the request takes.
#[derive(Debug)]
pub struct Pending(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Pending {
    /// Takes a slot unless `queued` (the engine's own count) plus those
    /// already pending reach `limit`.
    pub fn take(counter: &std::sync::Arc<std::sync::atomic::AtomicU64>, queued: u64, limit: usize) -> Option<Pending> {
        use std::sync::atomic::Ordering;
        let before = counter.fetch_add(1, Ordering::AcqRel);
        if (queued + before) as usize >= limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Pending(counter.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn pending_slots_count_against_the_limit_until_dropped() {
        let counter = Arc::new(AtomicU64::new(0));
        let a = Pending::take(&counter, 1, 3).expect("1 queued + 0 pending < 3");
        let b = Pending::take(&counter, 1, 3).expect("1 queued + 1 pending < 3");
        assert!(Pending::take(&counter, 1, 3).is_none(), "limit reached");
        assert_eq!(counter.load(Ordering::Relaxed), 2, "a refused take leaves no trace");
        drop(a);
        let _c = Pending::take(&counter, 1, 3).expect("a slot came back");
        drop(b);
        assert_eq!(counter.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn model_checks_name_the_problem() {
        let r = |prompt: Vec<u32>, stop: Vec<u32>| pb::GenerateRequest {
            request_id: String::new(),
            prompt,
            max_tokens: 1,
            sampling: None,
            stop_ids: stop,
            sampler_step: 0,
            tenant: String::new(),
        };
        assert!(check_against_model(&r(vec![1, 2], vec![3]), 10, 100).is_ok());
        assert!(check_against_model(&r(vec![1, 10], vec![]), 10, 100).unwrap_err().contains("vocabulary"));
        assert!(check_against_model(&r(vec![1], vec![99]), 10, 100).unwrap_err().contains("99"));
        assert!(check_against_model(&r(vec![1; 100], vec![]), 10, 100).unwrap_err().contains("context"));
    }
}
