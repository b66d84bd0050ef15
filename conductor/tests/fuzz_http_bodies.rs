//! Fuzz targets `chat_body` and `completion_body`: request bodies sent to
//! the conductor's real HTTP router ([`tandem_conductor::api::router`]),
//! in process, with the tiny fixture's tokenizer and no workers. A body
//! goes through exactly what the handlers run before a node is involved:
//! reading, JSON parsing, the knobs' validation, messages, the chat template
//! and the tokenizer, the prompt limits, and admission — which, with no
//! workers, answers 503. So:
//!
//! - generated valid requests (OpenAI's variants) reach admission (503);
//! - the same requests with one field made invalid get a 400 naming it;
//! - byte-mutated bodies and the corpus get a 4xx or 503 with an OpenAI
//!   error body, never a 500, a panic or a hang.
//!
//! See `fuzz/README.md`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use serde_json::{json, Value};
use tandem_conductor::config::ConductorConfig;
use tandem_conductor::service::{Conductor, ModelInfo, Workers};
use tandem_model::config::ModelConfig;
use tandem_model::kv_cache::KvDType;
use tandem_model::tokenizer::Tokenizer;
use tower::ServiceExt;

const MODEL: &str = "tiny";

struct Api {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

impl Api {
    fn new() -> Api {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tiny-llama-bf16");
        let tokenizer = Tokenizer::from_hf_dir(&dir).unwrap();
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let model = ModelInfo::new(MODEL.into(), tokenizer, &config, KvDType::F32, 16).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let router = rt.block_on(async {
            let c = Conductor::new(ConductorConfig::default(), model, &Workers::default(), None).unwrap();
            tandem_conductor::api::router(c)
        });
        Api { rt, router }
    }

    /// POSTs `body`; the status and the parsed JSON answer.
    fn post(&self, path: &str, body: &[u8]) -> Result<(u16, Value), String> {
        let req = Request::post(path).header("content-type", "application/json").body(Body::from(body.to_vec()));
        let router = self.router.clone();
        self.rt.block_on(async move {
            let resp = router.oneshot(req.unwrap()).await.map_err(|e| format!("router failed: {e}"))?;
            let status = resp.status().as_u16();
            let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| format!("status {status}: body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))?;
            Ok((status, v))
        })
    }
}

/// Statuses a request may get from a conductor with no workers.
const ALLOWED: [u16; 6] = [400, 404, 408, 413, 429, 503];

/// Checks the answer is an OpenAI error with an allowed status.
fn error_shape(status: u16, v: &Value) -> Result<(), String> {
    if !ALLOWED.contains(&status) {
        return Err(format!("status {status}: {v}"));
    }
    if !v["error"]["message"].is_string() || !v["error"]["type"].is_string() {
        return Err(format!("status {status} without an OpenAI error body: {v}"));
    }
    Ok(())
}

// ------------------------------------------------------------- generators

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex("[A-Za-z ,.!?\n]{0,40}").unwrap(),
        proptest::string::string_regex("\\PC{0,12}").unwrap(),
    ]
}

/// Sampling fields, each valid, each present or not.
fn knobs() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    let opt = |s: BoxedStrategy<Value>| proptest::option::of(s);
    (
        opt((0.0f64..=2.0).prop_map(|t| json!(t)).boxed()),
        opt((0.01f64..=1.0).prop_map(|p| json!(p)).boxed()),
        opt(prop_oneof![Just(json!(-1)), (0i64..100).prop_map(|k| json!(k))].boxed()),
        opt(any::<i64>().prop_map(|s| json!(s)).boxed()),
        opt(prop_oneof![
            text().prop_map(Value::String),
            proptest::collection::vec(proptest::string::string_regex(".{0,8}").unwrap(), 0..4).prop_map(|v| json!(v)),
        ]
        .boxed()),
        opt((1i64..32).prop_map(|m| json!(m)).boxed()),
        opt(Just(json!(1)).boxed()),
        opt(prop_oneof![Just(json!(MODEL)), Just(json!(""))].boxed()),
        any::<bool>(),
        opt(Just(json!(0.0)).boxed()),
    )
        .prop_map(|(temperature, top_p, top_k, seed, stop, max_tokens, n, model, stream, presence)| {
            let mut m = serde_json::Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            };
            put("temperature", temperature);
            put("top_p", top_p);
            put("top_k", top_k);
            put("seed", seed);
            put("stop", stop);
            put("max_tokens", max_tokens);
            put("n", n);
            put("model", model);
            put("presence_penalty", presence);
            if stream {
                m.insert("stream".into(), json!(true));
                m.insert("stream_options".into(), json!({"include_usage": true}));
            }
            m.insert("user".into(), json!("fuzz"));
            m
        })
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![Just("system"), Just("developer"), Just("user"), Just("assistant")];
    let content = prop_oneof![
        text().prop_map(Value::String),
        proptest::collection::vec(text().prop_map(|t| json!({"type": "text", "text": t})), 1..3).prop_map(Value::Array),
    ];
    (role, content).prop_map(|(role, content)| json!({"role": role, "content": content}))
}

fn valid_chat() -> impl Strategy<Value = Value> {
    (proptest::collection::vec(message(), 1..4), knobs(), any::<bool>()).prop_map(|(messages, mut m, logprobs)| {
        m.insert("messages".into(), Value::Array(messages));
        // At least one token of prompt: the template adds role markers.
        if logprobs {
            m.insert("logprobs".into(), json!(true));
            m.insert("top_logprobs".into(), json!(3));
        }
        Value::Object(m)
    })
}

fn valid_completion() -> impl Strategy<Value = Value> {
    let prompt = prop_oneof![
        proptest::string::string_regex("[A-Za-z ]{1,40}").unwrap().prop_map(Value::String),
        proptest::collection::vec(0u32..100, 1..16).prop_map(|ids| json!(ids)),
        proptest::string::string_regex("[a-z]{1,20}").unwrap().prop_map(|t| json!([t])),
        proptest::collection::vec(0u32..100, 1..8).prop_map(|ids| json!([ids])),
    ];
    (prompt, knobs(), proptest::option::of(0i64..=5)).prop_map(|(prompt, mut m, logprobs)| {
        m.insert("prompt".into(), prompt);
        if let Some(n) = logprobs {
            m.insert("logprobs".into(), json!(n));
        }
        Value::Object(m)
    })
}

/// One field made invalid, and the `param` the 400 must name.
fn breakage(chat: bool) -> impl Strategy<Value = (&'static str, Value, &'static str)> {
    let mut cases: Vec<(&'static str, Value, &'static str)> = vec![
        ("max_tokens", json!(0), "max_tokens"),
        ("max_tokens", json!(1_000_000), "max_tokens"),
        ("temperature", json!(2.5), "temperature"),
        ("temperature", json!(-0.1), "temperature"),
        ("top_p", json!(0), "top_p"),
        ("top_p", json!(1.5), "top_p"),
        ("top_k", json!(-2), "top_k"),
        ("n", json!(2), "n"),
        ("presence_penalty", json!(0.5), "presence_penalty"),
        ("frequency_penalty", json!(-1), "frequency_penalty"),
        ("stop", json!(vec!["x"; 17]), "stop"),
        ("stop", json!(["y".repeat(300)]), "stop"),
        ("temperature", json!("hot"), "temperature"),
        ("max_tokens", json!(1.5), "max_tokens"),
    ];
    if chat {
        cases.extend([
            ("messages", json!([]), "messages"),
            ("messages", json!([{"role": "tool", "content": "x"}]), "messages"),
            ("messages", json!([{"role": "user", "content": [{"type": "image_url"}]}]), "messages"),
            ("messages", json!("hi"), "messages"),
            ("top_logprobs", json!(21), "top_logprobs"),
        ]);
    } else {
        cases.extend([
            ("echo", json!(true), "echo"),
            ("suffix", json!("tail"), "suffix"),
            ("logprobs", json!(6), "logprobs"),
            ("prompt", json!(["a", "b"]), "prompt"),
            ("prompt", json!([]), "prompt"),
            ("prompt", json!([[1], [2]]), "prompt"),
            ("prompt", json!([1_000_000]), "prompt"),
            ("prompt", json!({"text": "x"}), "prompt"),
        ]);
    }
    proptest::sample::select(cases)
}

fn to_bytes(v: Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

// ------------------------------------------------------------------ tests

fn run_valid(api: &Api, path: &str, valid: BoxedStrategy<Value>) {
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: harness::cases(256),
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&valid, |body| {
            let (status, v) = api.post(path, &to_bytes(body.clone())).map_err(TestCaseError::fail)?;
            // With a valid body the only refusal left is "no workers".
            prop_assert_eq!(status, 503, "{} -> {}", body, v);
            prop_assert!(
                v["error"]["message"].as_str().is_some_and(|m| m.contains("no prefill or no decode")),
                "{}",
                v
            );
            Ok(())
        })
        .unwrap();
}

fn run_broken(api: &Api, path: &str, chat: bool, valid: BoxedStrategy<Value>) {
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: harness::cases(256),
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&(valid, breakage(chat)), |(mut body, (field, bad, param))| {
            // Every other field is valid, so the named one is the only fault.
            body[field] = bad;
            let (status, v) = api.post(path, &to_bytes(body.clone())).map_err(TestCaseError::fail)?;
            prop_assert_eq!(status, 400, "{} -> {}", body, v);
            let got = v["error"]["param"].as_str().unwrap_or_default();
            prop_assert_eq!(got, param, "{} -> {}", body, v);
            Ok(())
        })
        .unwrap();
}

#[test]
fn valid_chat_requests_reach_admission() {
    let api = Api::new();
    run_valid(&api, "/v1/chat/completions", valid_chat().boxed());
}

#[test]
fn valid_completion_requests_reach_admission() {
    let api = Api::new();
    run_valid(&api, "/v1/completions", valid_completion().boxed());
}

#[test]
fn one_bad_field_is_a_400_naming_it() {
    let api = Api::new();
    run_broken(&api, "/v1/chat/completions", true, valid_chat().boxed());
    run_broken(&api, "/v1/completions", false, valid_completion().boxed());
}

#[test]
fn mutated_chat_bodies_get_openai_errors() {
    let api = Api::new();
    let seeds: Vec<Vec<u8>> = harness::corpus("chat_body").into_iter().map(|(_, b)| b).collect();
    let valid = valid_chat().prop_map(to_bytes).boxed();
    let strategy = prop_oneof![harness::mutated_from(valid, seeds.clone()), harness::mutated(seeds)];
    harness::fuzz("chat_body", 512, strategy.boxed(), |b| {
        let (status, v) = api.post("/v1/chat/completions", b)?;
        error_shape(status, &v)
    });
}

#[test]
fn mutated_completion_bodies_get_openai_errors() {
    let api = Api::new();
    let seeds: Vec<Vec<u8>> = harness::corpus("completion_body").into_iter().map(|(_, b)| b).collect();
    let valid = valid_completion().prop_map(to_bytes).boxed();
    let strategy = prop_oneof![harness::mutated_from(valid, seeds.clone()), harness::mutated(seeds)];
    harness::fuzz("completion_body", 512, strategy.boxed(), |b| {
        let (status, v) = api.post("/v1/completions", b)?;
        error_shape(status, &v)
    });
}

#[test]
fn deeply_nested_and_oversized_bodies_are_refused() {
    let api = Api::new();
    let nested = format!("{{\"messages\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, v) = api.post("/v1/chat/completions", nested.as_bytes()).unwrap();
    assert_eq!(status, 400, "{v}");
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let (status, v) = api.post("/v1/completions", big.as_bytes()).unwrap();
    assert_eq!(status, 413, "{v}");
}
