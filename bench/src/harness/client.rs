//! The measuring client: one streaming `/v1/completions` request, timed at
//! the client as vLLM's `benchmark_serving` does. It asks for per-token
//! log-probabilities so every token arrives in its own event (a token whose
//! text is not yet printable still shows), and for the usage object, whose
//! `prompt_tokens_details.cached_tokens` counts the prompt's cache hits.

use futures::StreamExt;
use std::time::{Duration, Instant};

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Completed,
    /// Refused at admission (429).
    Rejected,
    Failed(String),
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub status: Status,
    /// When it was sent, seconds after the run started.
    pub sent_s: f64,
    pub prompt_tokens: u32,
    /// Prompt tokens the cache supplied (from the usage object).
    pub cached_tokens: u32,
    /// Arrival of each token, seconds after sending.
    pub token_s: Vec<f64>,
    /// Until the stream ended.
    pub e2e_s: f64,
}

impl Sample {
    /// A turn never sent because an earlier turn of its conversation failed.
    pub fn unsent(prompt_tokens: u32, at_s: f64) -> Sample {
        Sample {
            status: Status::Failed("not sent: an earlier turn of its conversation failed".into()),
            sent_s: at_s,
            prompt_tokens,
            cached_tokens: 0,
            token_s: Vec::new(),
            e2e_s: 0.0,
        }
    }

    pub fn ttft_s(&self) -> Option<f64> {
        self.token_s.first().copied()
    }

    /// Mean time per output token after the first.
    pub fn tpot_s(&self) -> Option<f64> {
        let n = self.token_s.len();
        (n >= 2).then(|| (self.token_s[n - 1] - self.token_s[0]) / (n - 1) as f64)
    }
}

/// Longest SSE event accepted (an event carries a few tokens).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Sends `prompt` and reads the answer to its end (or `timeout`).
pub async fn complete(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: &[u32],
    max_tokens: u32,
    sent_s: f64,
    timeout: Duration,
) -> Sample {
    let mut sample = Sample {
        status: Status::Failed(String::new()),
        sent_s,
        prompt_tokens: prompt.len() as u32,
        cached_tokens: 0,
        token_s: Vec::new(),
        e2e_s: 0.0,
    };
    let start = Instant::now();
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "temperature": 0, "stream": true, "logprobs": 0, "stream_options": {"include_usage": true},
    });
    let status = match tokio::time::timeout(timeout, read(http, url, &body, start, &mut sample)).await {
        Ok(s) => s,
        Err(_) => Status::Failed(format!("no complete answer within {timeout:?}")),
    };
    sample.status = match status {
        Status::Completed if sample.token_s.len() != max_tokens as usize => Status::Failed(format!(
            "{} tokens came back, {max_tokens} were asked for (ignore_eos)",
            sample.token_s.len()
        )),
        s => s,
    };
    sample.e2e_s = start.elapsed().as_secs_f64();
    sample
}

async fn read(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    start: Instant,
    sample: &mut Sample,
) -> Status {
    let resp = match http.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Status::Failed(format!("sending: {e}")),
    };
    match resp.status().as_u16() {
        200 => {}
        429 => return Status::Rejected,
        code => {
            let text = resp.text().await.unwrap_or_default();
            return Status::Failed(format!("HTTP {code}: {}", text.chars().take(300).collect::<String>()));
        }
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut finished = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Status::Failed(format!("reading the stream: {e}")),
        };
        let now = start.elapsed().as_secs_f64();
        buf.extend_from_slice(&chunk);
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for data in text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim) {
                if data == "[DONE]" {
                    return if finished { Status::Completed } else { Status::Failed("[DONE] before the end".into()) };
                }
                let v: serde_json::Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => return Status::Failed(format!("an event is not JSON ({e}): {data:.200}")),
                };
                if let Some(err) = v.get("error") {
                    return Status::Failed(format!("error event: {err}"));
                }
                if let Some(choice) = v["choices"].get(0) {
                    let n = choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
                    sample.token_s.extend(std::iter::repeat_n(now, n));
                    finished |= !choice["finish_reason"].is_null();
                }
                if let Some(c) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    sample.cached_tokens = c as u32;
                }
            }
        }
        if buf.len() > MAX_EVENT_BYTES {
            return Status::Failed(format!("an event over {MAX_EVENT_BYTES} bytes"));
        }
    }
    Status::Failed("the stream ended without [DONE]".into())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpot_is_the_mean_gap_after_the_first_token() {
        let s = Sample {
            status: Status::Completed,
            sent_s: 0.0,
            prompt_tokens: 10,
            cached_tokens: 0,
            token_s: vec![0.5, 0.6, 0.8, 0.9],
            e2e_s: 1.0,
        };
        assert_eq!(s.ttft_s(), Some(0.5));
        assert!((s.tpot_s().unwrap() - 0.4 / 3.0).abs() < 1e-12);
        let one = Sample { token_s: vec![0.5], ..s };
        assert_eq!(one.tpot_s(), None);
    }
}
