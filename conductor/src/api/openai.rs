//! OpenAI's request and response shapes (the parts Tandem serves), parsed
//! leniently where clients differ (unknown fields are ignored, `stop` may
//! be a string or a list, content may be a string or text parts) and
//! validated strictly where a wrong value would change the answer.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{json, Value};

/// An error in OpenAI's JSON shape with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: None, retry_after: None }
    }

    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// A message's content: a string or a list of parts (only text parts).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and limits shared by both endpoints.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    /// vLLM's extension: generate `max_tokens` whatever the model says.
    #[serde(default)]
    pub ignore_eos: bool,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub common: Common,
}

/// `prompt` of a completion: text or token ids, alone or in a list of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Alternatives per token (OpenAI allows up to 5).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

/// The validated knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub logprobs: Option<u32>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

/// Most stop strings, and their longest.
const MAX_STOPS: usize = 16;
const MAX_STOP_BYTES: usize = 256;

impl Common {
    /// Checks the shared fields; `max_tokens` defaults to `default_max`
    /// and may not exceed `limit`.
    pub fn knobs(&self, max_tokens: Option<i64>, default_max: u32, limit: u32) -> Result<Knobs, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid("only n = 1 is supported", "n"));
            }
        }
        for (v, name) in [(self.frequency_penalty, "frequency_penalty"), (self.presence_penalty, "presence_penalty")] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    format!("{name} is not supported (use 0)"),
                    if name.starts_with('f') { "frequency_penalty" } else { "presence_penalty" },
                ));
            }
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid("stream_options is only allowed when stream is true", "stream_options"));
        }
        let max_tokens = match max_tokens {
            None => default_max.min(limit),
            Some(m) if m < 1 => return Err(ApiError::invalid("max_tokens must be at least 1", "max_tokens")),
            Some(m) if m > limit as i64 => {
                return Err(ApiError::invalid(
                    format!("max_tokens is {m}; this server allows at most {limit}"),
                    "max_tokens",
                ))
            }
            Some(m) => m as u32,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid("temperature must be between 0 and 2", "temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid("top_p must be in (0, 1]", "top_p"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 && k <= u32::MAX as i64 => k as u32,
            Some(_) => return Err(ApiError::invalid("top_k must be -1 (off) or positive", "top_k")),
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            // Without a seed each request draws differently.
            None => rand_seed(),
        };
        let stop = self.stop.clone().map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes"),
                "stop",
            ));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(Knobs {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed,
            stop,
            logprobs: None,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos,
        })
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

impl ChatRequest {
    pub fn knobs(&self, default_max: u32, limit: u32) -> Result<Knobs, ApiError> {
        let mut k = self.common.knobs(self.max_completion_tokens.or(self.common.max_tokens), default_max, limit)?;
        if self.logprobs {
            let n = self.top_logprobs.unwrap_or(0);
            if !(0..=20).contains(&n) {
                return Err(ApiError::invalid("top_logprobs must be between 0 and 20", "top_logprobs"));
            }
            k.logprobs = Some(n as u32);
        } else if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(ApiError::invalid("top_logprobs needs logprobs = true", "top_logprobs"));
        }
        Ok(k)
    }

    /// The messages as the chat template takes them.
    pub fn messages(&self) -> Result<Vec<tandem_model::chat::ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", "messages"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("message role {other:?} is not supported (system, developer, user, assistant)"),
                        "messages",
                    ))
                }
            };
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(s)) => t.push_str(s),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("content part of type {kind:?} is not supported (text only)"),
                                    "messages",
                                ))
                            }
                        }
                    }
                    t
                }
            };
            out.push(tandem_model::chat::ChatMessage::new(role, text));
        }
        Ok(out)
    }
}

impl CompletionRequest {
    pub fn knobs(&self, limit: u32) -> Result<Knobs, ApiError> {
        if self.echo {
            return Err(ApiError::invalid("echo is not supported", "echo"));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix is not supported", "suffix"));
        }
        // OpenAI's completions default to 16 tokens.
        let mut k = self.common.knobs(self.common.max_tokens, 16, limit)?;
        if let Some(n) = self.logprobs {
            if !(0..=5).contains(&n) {
                return Err(ApiError::invalid("logprobs must be between 0 and 5", "logprobs"));
            }
            k.logprobs = Some(n as u32);
        }
        Ok(k)
    }
}

/// A token's text and its log-probability alternatives, as the API shows
/// them.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Chat's `logprobs.content` entries.
pub fn chat_logprobs(items: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32| json!({ "token": t, "logprob": lp, "bytes": t.as_bytes() });
    let content: Vec<Value> = items
        .iter()
        .map(|i| {
            let mut e = entry(&i.token, i.logprob);
            e["top_logprobs"] = i.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` (tokens, token_logprobs, top_logprobs,
/// text_offset); `start` is the text offset of the first token.
pub fn completion_logprobs(items: &[TokenLogprob], start: usize) -> Value {
    let mut offset = start;
    let mut offsets = Vec::with_capacity(items.len());
    for i in items {
        offsets.push(offset);
        offset += i.token.len();
    }
    let top: Vec<Value> = items
        .iter()
        .map(|i| {
            let m: serde_json::Map<String, Value> = i.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": items.iter().map(|i| i.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": items.iter().map(|i| i.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Knobs, ApiError> {
        let r: ChatRequest = serde_json::from_value(v).map_err(|e| ApiError::invalid(e.to_string(), "body"))?;
        r.messages()?;
        r.knobs(512, 4096)
    }

    #[test]
    fn chat_requests_parse_with_openai_variants_and_bad_values_are_named() {
        let k = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "\n",
                            "seed": 3, "temperature": 0, "max_tokens": 7, "unknown_field": true}))
        .unwrap();
        assert_eq!((k.max_tokens, k.seed, k.temperature, k.stop.clone()), (7, 3, 0.0, vec!["\n".to_string()]));
        let k = chat(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                            "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 2, "ignore_eos": true}))
        .unwrap();
        assert_eq!((k.max_tokens, k.logprobs, k.ignore_eos), (9, Some(2), true));
        let param = |v: Value| chat(v).unwrap_err().param.map(|p| &*p.into_owned().leak());
        let m = json!([{"role": "user", "content": "x"}]);
        assert_eq!(param(json!({"messages": m, "max_tokens": 0})), Some("max_tokens"));
        assert_eq!(param(json!({"messages": m, "max_tokens": 100000})), Some("max_tokens"));
        assert_eq!(param(json!({"messages": m, "temperature": 3})), Some("temperature"));
        assert_eq!(param(json!({"messages": m, "top_p": 0})), Some("top_p"));
        assert_eq!(param(json!({"messages": m, "n": 2})), Some("n"));
        assert_eq!(param(json!({"messages": m, "logprobs": true, "top_logprobs": 21})), Some("top_logprobs"));
        assert_eq!(param(json!({"messages": []})), Some("messages"));
        assert_eq!(param(json!({"messages": [{"role": "tool", "content": "x"}]})), Some("messages"));
        assert_eq!(
            param(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            Some("messages")
        );
        assert_eq!(param(json!({"messages": m, "stop": vec!["x"; 17]})), Some("stop"));
        assert_eq!(param(json!({"messages": m, "presence_penalty": 0.5})), Some("presence_penalty"));
        assert!(chat(json!({"messages": "hi"})).is_err());
        assert_eq!(param(json!({"messages": m, "stream_options": {"include_usage": true}})), Some("stream_options"));
    }

    #[test]
    fn completion_prompts_take_text_or_ids() {
        let r: CompletionRequest = serde_json::from_value(json!({"prompt": [1, 2, 3], "logprobs": 2})).unwrap();
        assert!(matches!(r.prompt, Prompt::Ids(ref v) if v == &[1, 2, 3]));
        let k = r.knobs(100).unwrap();
        assert_eq!((k.max_tokens, k.logprobs), (16, Some(2)));
        let r: CompletionRequest = serde_json::from_value(json!({"prompt": ["a"], "echo": true})).unwrap();
        assert_eq!(r.knobs(100).unwrap_err().param.as_deref(), Some("echo"));
        let r: CompletionRequest = serde_json::from_value(json!({"prompt": "a", "logprobs": 6})).unwrap();
        assert_eq!(r.knobs(100).unwrap_err().param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn logprob_shapes_match_openai() {
        let items = vec![
            TokenLogprob { token: "Hi".into(), logprob: -0.5, top: vec![("Hi".into(), -0.5), ("Yo".into(), -1.0)] },
            TokenLogprob { token: "!".into(), logprob: -0.1, top: vec![] },
        ];
        let c = chat_logprobs(&items);
        assert_eq!(c["content"][0]["token"], "Hi");
        assert_eq!(c["content"][0]["bytes"], json!([72, 105]));
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], "Yo");
        let p = completion_logprobs(&items, 3);
        assert_eq!(p["text_offset"], json!([3, 5]));
        assert_eq!(p["top_logprobs"][0]["Yo"], json!(-1.0));
    }
}
