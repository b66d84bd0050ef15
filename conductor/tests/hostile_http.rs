//! Hostile and malformed HTTP input against a real `tandem up` cluster
//! (SmolLM2, one prefill and one decode node): deeply nested JSON, invalid
//! UTF-8, absurd `max_tokens` and sampling values, slow clients that
//! trickle their headers or body, and many concurrent streams. Each gets
//! the right 4xx or a bounded wait, and the server keeps answering.

mod common;

use common::http::{cluster_file, dump_logs, post, request, Sse, Up};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Sends raw bytes as a request body; the status and body of the answer.
fn raw(addr: SocketAddr, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before it has read a large body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}

/// The `error.param` (or the message when there is none) of an OpenAI error.
fn param(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not an OpenAI error ({e}): {body}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    v["error"]["param"].as_str().map_or_else(|| v["error"]["message"].as_str().unwrap().to_owned(), str::to_owned)
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The server still answers a normal request correctly.
fn still_serves(a: SocketAddr) {
    let r =
        post(a, "/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4, "{}", r.body);
}

#[test]
fn hostile_bodies_get_4xx_slow_clients_are_cut_off_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let cfg = cluster_file(dir.path(), 1, 1, "max_body = \"1MiB\"\nmax_tokens_limit = 4096\nbody_timeout_ms = 2000");
    let up = Up::start(&cfg, &logs);
    let a = up.http;

    // Deeply nested JSON: refused by the parser's depth limit, not a stack overflow.
    let nested = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let (status, body) = raw(a, "/v1/completions", format!("{{\"prompt\": {nested}}}").as_bytes());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid JSON"), "{body}");
    // Invalid UTF-8 inside a string.
    let mut bad_utf8 = b"{\"prompt\": \"caf".to_vec();
    bad_utf8.extend_from_slice(&[0xC3, 0x28, 0xFF]);
    bad_utf8.extend_from_slice(b"\", \"max_tokens\": 4}");
    let (status, body) = raw(a, "/v1/completions", &bad_utf8);
    assert_eq!(status, 400, "{body}");
    // A body that is not an object, and an empty body.
    assert_eq!(raw(a, "/v1/chat/completions", b"[1,2,3]").0, 400);
    assert_eq!(raw(a, "/v1/chat/completions", b"").0, 400);

    // Absurd max_tokens: each refused, naming the parameter.
    for m in [json!(-1), json!(0), json!(1e20), json!(u64::MAX), json!(4097), json!("8"), json!(2.5)] {
        let (status, body) =
            raw(a, "/v1/chat/completions", chat(json!({"max_tokens": m.clone()})).to_string().as_bytes());
        assert_eq!(status, 400, "max_tokens {m}: {body}");
        let p = param(&body);
        assert!(p.contains("max_tokens"), "max_tokens {m}: {body}");
    }
    // Negative, out-of-range, non-finite or mistyped sampling values.
    let cases = [
        ("temperature", json!(-0.5)),
        ("temperature", json!("hot")),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_p", json!(-1)),
        ("logprobs", json!("yes")),
    ];
    for (name, v) in cases {
        let (status, body) = raw(a, "/v1/chat/completions", chat(json!({name: v.clone()})).to_string().as_bytes());
        assert_eq!(status, 400, "{name} = {v}: {body}");
        let p = param(&body);
        assert!(p.contains(name) || p.contains("invalid JSON"), "{name} = {v}: {body}");
    }
    // JSON has no NaN or infinity; the spellings clients send anyway.
    for text in ["NaN", "Infinity", "-Infinity", "1e999"] {
        let body = format!("{{\"prompt\": \"x\", \"temperature\": {text}}}");
        let (status, body) = raw(a, "/v1/completions", body.as_bytes());
        assert_eq!(status, 400, "temperature {text}: {body}");
    }
    still_serves(a);

    // Slow clients. One trickling its headers and one stalling mid-body are
    // both cut off within a bounded time, while the server answers others.
    let started = Instant::now();
    let mut headers = TcpStream::connect(a).unwrap();
    headers.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut body = TcpStream::connect(a).unwrap();
    body.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":").unwrap();
    still_serves(a);
    for (what, mut s) in [("a slow body", body), ("slow headers", headers)] {
        s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let waited = started.elapsed();
        let text = String::from_utf8_lossy(&out);
        assert!(waited < Duration::from_secs(60), "{what} held its connection for {waited:?}: {text}");
        if what == "a slow body" {
            assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text}");
        }
        eprintln!("{what}: cut off after {waited:?}");
    }

    // Many concurrent streams: each ends with its whole answer or a clear
    // 429 (with Retry-After); none hangs, and the server answers afterwards.
    let streams: Vec<_> = (0..48)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("Story number {i}:"), "max_tokens": 16, "ignore_eos": true,
                                  "stream": true, "temperature": 0});
                let mut sse = Sse::open(a, "/v1/completions", &body);
                if sse.status != 200 {
                    return (sse.status, 0, false);
                }
                let (mut chunks, mut done, mut finished) = (0, false, false);
                while let Some(d) = sse.next_data() {
                    if d == "[DONE]" {
                        done = true;
                        break;
                    }
                    let v: Value = serde_json::from_str(&d).unwrap();
                    assert!(v.get("error").is_none(), "stream {i} failed: {d}");
                    chunks += 1;
                    // Chunks may carry more than one token (text is held
                    // back until it is valid UTF-8), so the sign that the
                    // whole answer came is the `length` finish.
                    if v["choices"][0]["finish_reason"] == "length" {
                        finished = true;
                    }
                }
                (200, chunks, done && finished)
            })
        })
        .collect();
    let outcomes: Vec<(u16, usize, bool)> = streams.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = outcomes.iter().filter(|o| o.0 == 200).count();
    assert!(ok > 0, "{outcomes:?}");
    for o in &outcomes {
        assert!(o.0 == 429 || (o.0 == 200 && o.2 && o.1 >= 1), "a stream neither finished nor was refused: {o:?}");
    }
    eprintln!("48 concurrent streams: {ok} finished, {} refused with 429", outcomes.len() - ok);
    still_serves(a);
    assert_eq!(request(a, "GET", "/health", "").status, 200, "{}", dump_logs(&logs));
}
