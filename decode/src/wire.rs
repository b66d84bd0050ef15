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

/// A worker's gRPC server, serving until its stop sender fires or drops.
#[derive(Debug)]
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `listen` (port 0 picks one) and serves `routes` there with
/// graceful shutdown: on stop, in-flight streams run to their end.
pub async fn spawn_server(
    what: &str,
    listen: std::net::SocketAddr,
    routes: tonic::service::Routes,
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
