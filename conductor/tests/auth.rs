//! API keys and tenant isolation on a real loopback cluster (`tandem up
//! --config`): the HTTP API refuses requests without a configured key
//! (401, OpenAI's error shape) and beyond a key's limit (429), the admin API
//! (`tandem ctl`) needs an admin key, and one tenant's prompts never hit
//! another tenant's cached prefix.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

mod common;
use common::http::{cluster_file, Up};

const ADMIN: &str = "admin-key-0123456789";
const ACME: &str = "acme-key-0123456789";
const GLOBEX: &str = "globex-key-0123456789";
const LIMITED: &str = "limited-key-0123456789";

fn sha256_hex(s: &str) -> String {
    tandem_proto::auth::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.0 request with an optional bearer key.
fn call(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        match line.trim_end().split_once(':') {
            Some((n, v)) => headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string())),
            None => break,
        }
    }
    let mut body = String::new();
    r.read_to_string(&mut body).unwrap();
    Reply { status, headers, body }
}

/// Prompt tokens the cache supplied for a one-token completion.
fn cached_tokens(addr: SocketAddr, key: &str, prompt: &str) -> u64 {
    let body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0}).to_string();
    let r = call(addr, "POST", "/v1/completions", Some(key), &body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens in usage")
}

fn ctl(cfg: &std::path::Path, key: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.arg("ctl").arg("--config").arg(cfg).arg("--json").env_remove("TANDEM_API_KEY").env_remove("TANDEM_ADMIN");
    if let Some(k) = key {
        c.args(["--api-key", k]);
    }
    c.args(args).output().unwrap()
}

#[test]
fn keys_limits_admin_rights_and_tenant_isolation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cluster_file(dir.path(), 1, 1, "");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    for (key, tenant, extra) in [
        (ADMIN, "", "admin = true"),
        (ACME, "acme", ""),
        (GLOBEX, "globex", ""),
        (LIMITED, "", "requests_per_minute = 1"),
    ] {
        text += &format!("[[auth.api_keys]]\nkey_sha256 = \"{}\"\ntenant = \"{tenant}\"\n{extra}\n\n", sha256_hex(key));
    }
    std::fs::write(&cfg, text).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(out.contains("auth      on: 4 API keys (1 admin), 3 tenants"), "{out}");

    let up = Up::start(&cfg, &dir.path().join("logs"));
    let a = up.http;

    // No key or a wrong one: 401 in OpenAI's shape; the right one: 200.
    for key in [None, Some("not-a-configured-key")] {
        let r = call(a, "GET", "/v1/models", key, "");
        assert_eq!(r.status, 401, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key", "{}", r.body);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        let body = json!({"prompt": "Hi", "max_tokens": 1}).to_string();
        assert_eq!(call(a, "POST", "/v1/completions", key, &body).status, 401);
    }
    assert_eq!(call(a, "GET", "/v1/models", Some(ACME), "").status, 200);
    assert_eq!(call(a, "GET", "/health", None, "").status, 200, "/health stays open");

    // requests_per_minute = 1: the second request at once gets 429.
    assert_eq!(call(a, "GET", "/v1/models", Some(LIMITED), "").status, 200);
    let r = call(a, "GET", "/v1/models", Some(LIMITED), "");
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.headers.iter().any(|(n, v)| n == "retry-after" && v.parse::<u64>().is_ok_and(|s| s >= 1)));

    // The admin API: an admin key works; none, or a key without admin
    // rights, is refused.
    let ok = ctl(&cfg, Some(ADMIN), &["nodes"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let none = ctl(&cfg, None, &["nodes"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("API key"), "{}", String::from_utf8_lossy(&none.stderr));
    let user = ctl(&cfg, Some(ACME), &["nodes"]);
    assert!(!user.status.success());
    assert!(String::from_utf8_lossy(&user.stderr).contains("admin"), "{}", String::from_utf8_lossy(&user.stderr));

    // Tenants: acme's second request hits acme's cached prefix; globex,
    // sending the same prompt, finds nothing cached.
    let prompt = "Tandem keeps each tenant's cached prefixes apart. ".repeat(8);
    assert_eq!(cached_tokens(a, ACME, &prompt), 0, "a cold cache");
    assert!(cached_tokens(a, ACME, &prompt) >= 16, "the same tenant hits its own prefix");
    let lookup = |tenant: &str| {
        let out = ctl(&cfg, Some(ADMIN), &["cache", "lookup", "--text", &prompt, "--tenant", tenant]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["cached_blocks"].as_u64().unwrap()
    };
    assert!(lookup("acme") >= 1);
    assert_eq!(lookup("globex"), 0, "another tenant's keys find nothing");
    assert_eq!(lookup(""), 0, "nor do the default tenant's");
    assert_eq!(cached_tokens(a, GLOBEX, &prompt), 0, "a cross-tenant probe gets no hit");
    assert!(cached_tokens(a, GLOBEX, &prompt) >= 16, "globex then hits its own");
}
