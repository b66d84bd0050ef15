//! The HTTP API (axum): OpenAI-compatible `/v1/chat/completions`,
//! `/v1/completions` (streaming as server-sent events ending in
//! `data: [DONE]`, or whole) and `/v1/models`; Prometheus `/metrics`;
//! `/health` (the process answers) and `/ready` (a prefill and a decode
//! node accept work). Errors use OpenAI's JSON shape and status codes;
//! bodies, prompts and `max_tokens` are bounded; a client that disconnects
//! cancels its request on every node.

pub mod keys;
pub mod openai;
pub mod server;

use crate::dispatch::{Event, Submission};
use crate::service::Conductor;
use crate::text::{find_stop, held_back};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use keys::Tenant;
use openai::{ApiError, ChatRequest, CompletionRequest, Knobs, Prompt, TokenLogprob};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_proto::worker as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// The router of the conductor's HTTP API.
pub fn router(c: Arc<Conductor>) -> Router {
    let limit = c.cfg.max_body.as_u64() as usize;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(axum::middleware::from_fn_with_state(c.clone(), keys::require_key))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .fallback(|| async { ApiError::new(404, "not_found_error", "no such endpoint") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(c)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads and parses a JSON request body: at most `max_body` bytes, all of
/// it within `body_timeout_ms` (a client trickling its body gets 408
/// instead of holding the request open), and a parse error names the
/// field that failed.
async fn read_json<T: serde::de::DeserializeOwned>(c: &Conductor, body: Body) -> Result<T, ApiError> {
    let limit = c.cfg.max_body.as_u64() as usize;
    let read = async {
        let mut data = body.into_data_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}"), "body"))?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::new(413, "invalid_request_error", "the request body is too large"));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf)
    };
    let wait = Duration::from_millis(c.cfg.body_timeout_ms);
    let bytes = tokio::time::timeout(wait, read).await.map_err(|_| {
        let message = format!("the request body did not arrive within {} ms", c.cfg.body_timeout_ms);
        ApiError::new(408, "invalid_request_error", message)
    })??;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), "body"))?;
    serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        if path != "." {
            let field = path.split(['.', '[']).next().unwrap_or("body").to_owned();
            return ApiError::invalid(format!("invalid value at `{path}`: {}", e.inner()), field);
        }
        match blame_field::<T>(&value) {
            Some(field) => ApiError::invalid(format!("invalid value for `{field}`: {}", e.inner()), field),
            None => ApiError::invalid(format!("invalid JSON body: {}", e.inner()), "body"),
        }
    })
}

/// Finds the top-level field a failed parse is about: serde loses the
/// path inside `#[serde(flatten)]`, so drop one field at a time and see which
/// one's absence changes the error. Bounded: bodies with many fields get
/// the generic message.
fn blame_field<T: serde::de::DeserializeOwned>(value: &Value) -> Option<String> {
    let object = value.as_object().filter(|o| o.len() <= 64)?;
    let first = T::deserialize(value).err()?.to_string();
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        match T::deserialize(Value::Object(without)) {
            Ok(_) => Some(key.clone()),
            Err(e) => {
                let e = e.to_string();
                (e != first && !e.starts_with(&format!("missing field `{key}`"))).then(|| key.clone())
            }
        }
    })
}

fn check_model(c: &Conductor, model: &Option<String>) -> Result<(), ApiError> {
    match model.as_deref() {
        None | Some("") => Ok(()),
        Some(m) if m == c.model.name => Ok(()),
        Some(m) => Err(ApiError {
            code: Some("model_not_found"),
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                format!("the model `{m}` does not exist (this server serves `{}`)", c.model.name),
            )
        }),
    }
}

async fn models(State(c): State<Arc<Conductor>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_card(&c)] }))
}

async fn model(State(c): State<Arc<Conductor>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(&c, &Some(id))?;
    Ok(Json(model_card(&c)))
}

fn model_card(c: &Conductor) -> Value {
    json!({ "id": c.model.name, "object": "model", "created": unix_now(), "owned_by": "tandem",
            "max_model_len": c.model.context_len })
}

async fn metrics(State(c): State<Arc<Conductor>>) -> Response {
    let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, ct)], c.metrics.encode()).into_response()
}

async fn ready(State(c): State<Arc<Conductor>>) -> Response {
    match c.ready() {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not ready", "reason": why }))).into_response()
        }
    }
}

/// Which endpoint, for the response shapes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(c): State<Arc<Conductor>>, t: Extension<Tenant>, body: Body) -> Result<Response, ApiError> {
    let req: ChatRequest = read_json(&c, body).await?;
    check_model(&c, &req.common.model)?;
    let knobs = req.knobs(c.cfg.default_max_tokens, c.cfg.max_tokens_limit)?;
    let messages = req.messages()?;
    let prompt = crate::text::render_chat(&c.model.tokenizer, &c.model.template, &messages)
        .map_err(|e| ApiError::invalid(format!("the chat template failed: {e:#}"), "messages"))?;
    generate(c, Kind::Chat, prompt, knobs, t.0 .0).await
}

async fn completions(State(c): State<Arc<Conductor>>, t: Extension<Tenant>, body: Body) -> Result<Response, ApiError> {
    let req: CompletionRequest = read_json(&c, body).await?;
    check_model(&c, &req.common.model)?;
    let knobs = req.knobs(c.cfg.max_tokens_limit)?;
    let one = |n: usize| {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid("only one prompt per request is supported", "prompt"))
        }
    };
    let prompt = match req.prompt {
        Prompt::Ids(ids) => ids,
        Prompt::IdLists(mut l) => {
            one(l.len())?;
            l.remove(0)
        }
        Prompt::Text(t) => encode(&c, &t)?,
        Prompt::Texts(l) => {
            one(l.len())?;
            encode(&c, &l[0])?
        }
    };
    generate(c, Kind::Completion, prompt, knobs, t.0 .0).await
}

fn encode(c: &Conductor, text: &str) -> Result<Vec<u32>, ApiError> {
    c.model
        .tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), "prompt"))
}

/// Checks the prompt against the model and the limits, admits the request
/// (or refuses it: 429 with `Retry-After`) and answers whole or streaming.
async fn generate(
    c: Arc<Conductor>,
    kind: Kind,
    prompt: Vec<u32>,
    knobs: Knobs,
    tenant: String,
) -> Result<Response, ApiError> {
    let param = if kind == Kind::Chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty", param));
    }
    let vocab = c.model.tokenizer.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(format!("token id {bad} is outside the vocabulary ({vocab} tokens)"), param));
    }
    let ctx = c.model.context_len as usize;
    let max_prompt = if c.cfg.max_prompt_tokens > 0 { (c.cfg.max_prompt_tokens as usize).min(ctx) } else { ctx };
    if prompt.len() > max_prompt || prompt.len() + knobs.max_tokens as usize > ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "the prompt has {} tokens and asks for {} more; this model's context is {ctx} tokens (prompts at most {max_prompt})",
                    prompt.len(),
                    knobs.max_tokens
                ),
                param,
            )
        });
    }
    let sampling = pb::SamplingParams {
        temperature: knobs.temperature,
        top_k: knobs.top_k,
        top_p: knobs.top_p,
        seed: knobs.seed,
        logprobs: knobs.logprobs,
    };
    let stop_ids = if knobs.ignore_eos { Vec::new() } else { c.model.tokenizer.stop_ids().to_vec() };
    let id = c.next_id();
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let sub = Submission {
        request_id: format!("{prefix}-{id:x}-{:x}", unix_now()),
        prompt,
        max_tokens: knobs.max_tokens,
        sampling,
        stop_ids,
        tenant,
    };
    let ticket = c.admit(sub).await.map_err(|r| ApiError {
        retry_after: Some(r.retry_after_s),
        ..ApiError::new(
            r.status,
            if r.status == 429 { "rate_limit_exceeded" } else { "service_unavailable" },
            r.message,
        )
    })?;
    let head = Head {
        id: ticket.sub.request_id.clone(),
        created: unix_now(),
        model: c.model.name.clone(),
        kind,
        prompt_tokens: ticket.sub.prompt.len(),
    };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(c.clone().run(ticket, tx));
    if knobs.stream {
        Ok(stream(c, head, knobs, rx))
    } else {
        whole(c, head, knobs, rx).await
    }
}

/// What every response of one request repeats.
#[derive(Debug, Clone)]
struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Head {
    /// OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts
    /// the prompt tokens read from the KV cache instead of computed.
    fn usage(&self, completion: usize, cached: usize) -> Value {
        json!({ "prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": { "cached_tokens": cached } })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({ "id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model,
                "choices": choices })
    }

    /// One choice with text `text` (a delta when streaming).
    fn choice(&self, chunk: bool, text: &str, logprobs: &[TokenLogprob], offset: usize, finish: Option<&str>) -> Value {
        let lp = if logprobs.is_empty() {
            Value::Null
        } else if self.kind == Kind::Chat {
            openai::chat_logprobs(logprobs)
        } else {
            openai::completion_logprobs(logprobs, offset)
        };
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({ "index": 0, "message": { "role": "assistant", "content": text },
                                           "logprobs": lp, "finish_reason": finish }),
            (Kind::Chat, true) => {
                let delta = if finish.is_some() && text.is_empty() { json!({}) } else { json!({ "content": text }) };
                json!({ "index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish })
            }
            (Kind::Completion, _) => json!({ "index": 0, "text": text, "logprobs": lp, "finish_reason": finish }),
        }
    }
}

/// What the text assembler hands on.
enum Out {
    /// New text (with the tokens' log-probabilities, when asked).
    Text(String, Vec<TokenLogprob>),
    /// The end: OpenAI's finish reason.
    Done(&'static str),
    Failed(String),
}

/// Turns token events into text: incremental detokenization, stop strings
/// (text is released only once it cannot be the start of one; a stop
/// string ends the answer before it), log-probabilities.
struct Assembler<'a> {
    c: &'a Conductor,
    decoder: tandem_model::tokenizer::DecodeStream<'a>,
    stops: Vec<String>,
    logprobs: bool,
    text: String,
    /// `text[..sent]` has been handed on.
    sent: usize,
    tokens: usize,
    /// Prompt tokens the cache supplied.
    cached: usize,
    pending_lp: Vec<TokenLogprob>,
    /// The end, once the text before it is out.
    done: Option<&'static str>,
}

impl<'a> Assembler<'a> {
    fn new(c: &'a Conductor, knobs: &Knobs) -> Assembler<'a> {
        Assembler {
            c,
            decoder: c.model.tokenizer.decode_stream(true),
            stops: knobs.stop.clone(),
            logprobs: knobs.logprobs.is_some(),
            text: String::new(),
            sent: 0,
            tokens: 0,
            cached: 0,
            pending_lp: Vec::new(),
            done: None,
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.c.model.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// The next output. After `Done` or `Failed` there is nothing more.
    async fn next(&mut self, rx: &mut mpsc::Receiver<Event>) -> Out {
        if let Some(reason) = self.done.take() {
            return Out::Done(reason);
        }
        loop {
            let Some(ev) = rx.recv().await else { return Out::Failed("the request ended without an answer".into()) };
            match ev {
                Event::Cached { tokens } => self.cached = tokens,
                Event::Token(t) => {
                    self.tokens += 1;
                    if self.logprobs {
                        let top = t.top.iter().map(|a| (self.token_text(a.token), a.logprob)).collect();
                        let lp = TokenLogprob { token: self.token_text(t.id), logprob: t.logprob.unwrap_or(0.0), top };
                        self.pending_lp.push(lp);
                    }
                    if let Ok(Some(piece)) = self.decoder.step(t.id) {
                        self.text.push_str(&piece);
                    }
                    if let Some(at) = find_stop(&self.text[self.sent..], &self.stops) {
                        self.text.truncate(self.sent + at);
                        self.done = Some("stop");
                        return self.release(self.text.len());
                    }
                    let safe = held_back(&self.text, &self.stops).max(self.sent);
                    if safe > self.sent || !self.pending_lp.is_empty() {
                        return self.release(safe);
                    }
                }
                Event::Finished { reason } => {
                    if let Ok(Some(tail)) = self.decoder.flush() {
                        self.text.push_str(&tail);
                    }
                    let stopped = match find_stop(&self.text[self.sent..], &self.stops) {
                        Some(at) => {
                            self.text.truncate(self.sent + at);
                            true
                        }
                        None => false,
                    };
                    self.done = Some(if stopped || reason == "stop" { "stop" } else { "length" });
                    return self.release(self.text.len());
                }
                Event::Failed { message } => return Out::Failed(message),
            }
        }
    }

    fn release(&mut self, upto: usize) -> Out {
        let piece = self.text[self.sent..upto].to_string();
        self.sent = upto;
        Out::Text(piece, std::mem::take(&mut self.pending_lp))
    }
}

/// Collects the whole answer.
async fn whole(
    c: Arc<Conductor>,
    head: Head,
    knobs: Knobs,
    mut rx: mpsc::Receiver<Event>,
) -> Result<Response, ApiError> {
    let mut asm = Assembler::new(&c, &knobs);
    let mut logprobs = Vec::new();
    let finish = loop {
        match asm.next(&mut rx).await {
            Out::Text(_, lp) => logprobs.extend(lp),
            Out::Done(reason) => break reason,
            Out::Failed(message) => return Err(ApiError::new(503, "service_unavailable", message)),
        }
    };
    let choice = head.choice(false, &asm.text, &logprobs, 0, Some(finish));
    let mut body = head.envelope(false, json!([choice]));
    body["usage"] = head.usage(asm.tokens, asm.cached);
    Ok(Json(body).into_response())
}

/// Streams the answer as server-sent events. The events are produced by a
/// task; when the client goes away the response body is dropped, the task's
/// sends fail, it drops the token channel and the request is cancelled.
fn stream(c: Arc<Conductor>, head: Head, knobs: Knobs, mut rx: mpsc::Receiver<Event>) -> Response {
    let (etx, erx) = mpsc::channel::<Result<axum::response::sse::Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let etx = etx.clone();
            async move { etx.send(Ok(axum::response::sse::Event::default().data(v.to_string()))).await.is_ok() }
        };
        let mut asm = Assembler::new(&c, &knobs);
        if head.kind == Kind::Chat {
            let first = json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null,
                                 "finish_reason": null }]);
            if !send(head.envelope(true, first)).await {
                return;
            }
        }
        let mut offset = 0;
        loop {
            match asm.next(&mut rx).await {
                Out::Text(text, lp) => {
                    if text.is_empty() && lp.is_empty() {
                        continue;
                    }
                    let choice = head.choice(true, &text, &lp, offset, None);
                    offset += text.len();
                    if !send(head.envelope(true, json!([choice]))).await {
                        return;
                    }
                }
                Out::Done(reason) => {
                    let choice = head.choice(true, "", &[], offset, Some(reason));
                    if !send(head.envelope(true, json!([choice]))).await {
                        return;
                    }
                    if knobs.include_usage {
                        let mut u = head.envelope(true, json!([]));
                        u["usage"] = head.usage(asm.tokens, asm.cached);
                        if !send(u).await {
                            return;
                        }
                    }
                    break;
                }
                Out::Failed(message) => {
                    if !send(ApiError::new(503, "service_unavailable", message).body()).await {
                        return;
                    }
                    break;
                }
            }
        }
        drop(rx);
        let _ = etx.send(Ok(axum::response::sse::Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(erx)).keep_alive(KeepAlive::default()).into_response()
}
