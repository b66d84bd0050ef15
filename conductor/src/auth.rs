//! API keys of the HTTP and admin APIs (`[auth]` of the cluster file).
//!
//! A key is never stored in the file: an entry names the environment
//! variable that holds it (`key_env`) or gives its SHA-256 (`key_sha256`),
//! and `api_keys_env` names a variable listing more keys (`KEY[:TENANT]`,
//! comma-separated). Presented keys are hashed and compared with every
//! configured digest in constant time. Each key carries a tenant (mixed
//! into the block-key salt, so tenants never share cached prefixes), an
//! admin flag (the admin API), and limits: requests in flight and requests
//! per minute (beyond them: 429). No keys configured: both APIs are open.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tandem_proto::auth::{digest, digests_equal};
use tandem_proto::cluster_token::ClusterToken;
use tandem_proto::handoff::MAX_TENANT_BYTES;

/// `[auth]` of the cluster file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An environment variable listing keys as `KEY[:TENANT],...` (no
    /// limits, not admin). Empty: none.
    pub api_keys_env: String,
    pub api_keys: Vec<ApiKeyConfig>,
    /// An environment variable holding the cluster token, which every
    /// internal gRPC call and data connection must carry. Empty: none.
    pub cluster_token_env: String,
    /// Or a file holding it (relative to the cluster file; surrounding
    /// whitespace dropped). Empty: none.
    pub cluster_token_file: String,
}

/// One `[[auth.api_keys]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiKeyConfig {
    /// The environment variable holding the key.
    pub key_env: String,
    /// Or the key's SHA-256, hex (`printf %s KEY | sha256sum`).
    pub key_sha256: String,
    /// Whose cache the key's requests use (empty: the default tenant).
    pub tenant: String,
    /// The key may call the admin API (`tandem ctl`).
    pub admin: bool,
    /// Requests of this key in flight at once (0: no limit).
    pub max_in_flight: u32,
    /// Requests of this key per minute (0: no limit).
    pub requests_per_minute: u32,
}

/// A resolved key: its digest and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    pub digest: [u8; 32],
    pub tenant: String,
    pub admin: bool,
    pub max_in_flight: u32,
    pub requests_per_minute: u32,
}

const MIN_KEY_BYTES: usize = 8;

fn check_tenant(t: &str) -> Result<(), String> {
    if t.len() > MAX_TENANT_BYTES {
        return Err(format!("auth: tenant {t:?} is longer than {MAX_TENANT_BYTES} bytes"));
    }
    Ok(())
}

fn key_digest(key: &str, what: &str) -> Result<[u8; 32], String> {
    let key = key.trim();
    if key.len() < MIN_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) || key.contains(',') {
        return Err(format!(
            "auth: {what}: a key must be at least {MIN_KEY_BYTES} printable characters, no spaces or commas"
        ));
    }
    Ok(digest(key.as_bytes()))
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl AuthConfig {
    /// Whether any key is configured (the APIs need one).
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.api_keys_env.is_empty()
    }

    /// The cluster token, read from the variable `cluster_token_env` names
    /// (through `env`) or from `cluster_token_file` (relative to `base`).
    /// `None` when neither is given; a variable that is unset, an unreadable
    /// file or a token too short or malformed is an error, never a silent
    /// fallback to an open cluster.
    pub fn cluster_token(
        &self,
        env: impl Fn(&str) -> Option<String>,
        base: &std::path::Path,
    ) -> Result<Option<ClusterToken>, String> {
        let text = match (self.cluster_token_env.is_empty(), self.cluster_token_file.is_empty()) {
            (true, true) => return Ok(None),
            (false, true) => env(&self.cluster_token_env)
                .ok_or_else(|| format!("auth: cluster_token_env names {}, which is not set", self.cluster_token_env))?,
            (true, false) => {
                let path = base.join(&self.cluster_token_file);
                let meta = std::fs::metadata(&path)
                    .map_err(|e| format!("auth: cluster_token_file {}: {e}", path.display()))?;
                if meta.len() > 4096 {
                    return Err(format!("auth: cluster_token_file {} is larger than 4 KiB", path.display()));
                }
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("auth: cluster_token_file {}: {e}", path.display()))?
            }
            (false, false) => return Err("auth: give one of cluster_token_env and cluster_token_file".to_owned()),
        };
        ClusterToken::new(&text).map(Some).map_err(|e| format!("auth: {e}"))
    }

    /// The keys, with secrets read from the environment through `env`
    /// (a variable named but unset or empty is an error: silently running
    /// without a key would open the API).
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Vec<KeySpec>, String> {
        let mut keys = Vec::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let what = format!("api_keys[{i}]");
            check_tenant(&k.tenant)?;
            let digest = match (k.key_env.is_empty(), k.key_sha256.is_empty()) {
                (false, true) => {
                    let v = env(&k.key_env)
                        .filter(|v| !v.trim().is_empty())
                        .ok_or_else(|| format!("auth: {what}: key_env names {}, which is not set", k.key_env))?;
                    key_digest(&v, &what)?
                }
                (true, false) => parse_hex32(&k.key_sha256)
                    .ok_or_else(|| format!("auth: {what}: key_sha256 must be 64 hex digits"))?,
                _ => return Err(format!("auth: {what}: give exactly one of key_env and key_sha256")),
            };
            keys.push(KeySpec {
                digest,
                tenant: k.tenant.clone(),
                admin: k.admin,
                max_in_flight: k.max_in_flight,
                requests_per_minute: k.requests_per_minute,
            });
        }
        if !self.api_keys_env.is_empty() {
            let list = env(&self.api_keys_env)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("auth: api_keys_env names {}, which is not set", self.api_keys_env))?;
            for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (key, tenant) = item.split_once(':').unwrap_or((item, ""));
                check_tenant(tenant)?;
                let digest = key_digest(key, &self.api_keys_env)?;
                keys.push(KeySpec {
                    digest,
                    tenant: tenant.to_string(),
                    admin: false,
                    max_in_flight: 0,
                    requests_per_minute: 0,
                });
            }
        }
        for (i, a) in keys.iter().enumerate() {
            if keys[..i].iter().any(|b| b.digest == a.digest) {
                return Err("auth: the same key is configured twice".into());
            }
        }
        Ok(keys)
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Denied {
    /// No key, or one that is not configured (401).
    Unauthenticated(&'static str),
    /// The key may not call the admin API (403).
    NotAdmin,
    /// The key's limit is reached (429); retry after this many seconds.
    Limited { message: String, retry_after_s: u64 },
}

/// One key's live state.
#[derive(Debug)]
struct KeyState {
    spec: KeySpec,
    in_flight: Arc<AtomicU32>,
    /// Token bucket for `requests_per_minute`: tokens and when last filled.
    bucket: Mutex<(f64, Instant)>,
}

/// The conductor's keys and their counters.
#[derive(Debug, Default)]
pub struct Keys {
    keys: Vec<KeyState>,
}

/// A request admitted under a key: its tenant; the key's in-flight count
/// drops when this does.
#[derive(Debug)]
pub struct Permit {
    pub tenant: String,
    held: Option<Arc<AtomicU32>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = &self.held {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Keys {
    pub fn new(specs: Vec<KeySpec>) -> Keys {
        let now = Instant::now();
        let keys = specs
            .into_iter()
            .map(|spec| KeyState {
                bucket: Mutex::new((spec.requests_per_minute as f64, now)),
                in_flight: Arc::default(),
                spec,
            })
            .collect();
        Keys { keys }
    }

    /// Whether the APIs need a key.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key behind an `Authorization` header value (`Bearer KEY`):
    /// every configured digest is compared, in constant time each.
    fn find(&self, authorization: Option<&[u8]>) -> Result<&KeyState, Denied> {
        let raw = authorization.ok_or(Denied::Unauthenticated("no API key: send `Authorization: Bearer KEY`"))?;
        let key = std::str::from_utf8(raw)
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(Denied::Unauthenticated("the Authorization header must be `Bearer KEY`"))?;
        let d = digest(key.as_bytes());
        let mut found = None;
        for k in &self.keys {
            if digests_equal(&k.spec.digest, &d) {
                found = Some(k);
            }
        }
        found.ok_or(Denied::Unauthenticated("incorrect API key"))
    }

    /// Checks a call to the admin API.
    pub fn check_admin(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        if !self.enabled() {
            return Ok(());
        }
        if self.find(authorization)?.spec.admin {
            Ok(())
        } else {
            Err(Denied::NotAdmin)
        }
    }

    /// Admits one HTTP API request: the key is known and within its
    /// limits. Without keys every request passes, in the default tenant.
    pub fn admit(&self, authorization: Option<&[u8]>) -> Result<Permit, Denied> {
        if !self.enabled() {
            return Ok(Permit { tenant: String::new(), held: None });
        }
        let k = self.find(authorization)?;
        let s = &k.spec;
        if s.max_in_flight > 0 {
            let before = k.in_flight.fetch_add(1, Ordering::AcqRel);
            if before >= s.max_in_flight {
                k.in_flight.fetch_sub(1, Ordering::AcqRel);
                let message = format!("this API key has {} requests in flight, its limit", s.max_in_flight);
                return Err(Denied::Limited { message, retry_after_s: 1 });
            }
        }
        let permit = Permit { tenant: s.tenant.clone(), held: (s.max_in_flight > 0).then(|| k.in_flight.clone()) };
        if s.requests_per_minute > 0 {
            let rate = s.requests_per_minute as f64 / 60.0;
            let mut b = k.bucket.lock();
            let now = Instant::now();
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(s.requests_per_minute as f64);
            b.1 = now;
            if b.0 < 1.0 {
                let retry_after_s = ((1.0 - b.0) / rate).ceil().max(1.0) as u64;
                let message = format!("this API key is limited to {} requests per minute", s.requests_per_minute);
                return Err(Denied::Limited { message, retry_after_s });
            }
            b.0 -= 1.0;
        }
        Ok(permit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("key-aaaaaaaa".into()),
            "LIST" => Some("key-bbbbbbbb:acme, key-cccccccc".into()),
            _ => None,
        }
    }

    fn bearer(k: &str) -> Vec<u8> {
        format!("Bearer {k}").into_bytes()
    }

    #[test]
    fn the_cluster_token_comes_from_a_variable_or_a_file_and_mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "file-token-0123456789\n").unwrap();
        let cfg = |t: &str| toml::from_str::<AuthConfig>(t).unwrap();
        let token = |t: &str| cfg(t).cluster_token(|n| (n == "T").then(|| "env-token-0123456789".into()), dir.path());
        assert_eq!(token("").unwrap(), None, "none configured: no token");
        let from_env = token("cluster_token_env = \"T\"").unwrap().unwrap();
        assert!(from_env.matches(b"env-token-0123456789"));
        let from_file = token("cluster_token_file = \"t\"").unwrap().unwrap();
        assert!(from_file.matches(b"file-token-0123456789"), "relative to the cluster file, newline dropped");
        assert!(token("cluster_token_env = \"UNSET\"").unwrap_err().contains("UNSET, which is not set"));
        assert!(token("cluster_token_file = \"missing\"").unwrap_err().contains("missing"));
        assert!(token("cluster_token_env = \"T\"\ncluster_token_file = \"t\"").unwrap_err().contains("one of"));
        std::fs::write(dir.path().join("short"), "short").unwrap();
        assert!(token("cluster_token_file = \"short\"").unwrap_err().contains("16"));
        assert!(!cfg("cluster_token_env = \"T\"").enabled(), "a cluster token does not turn on API keys");
    }

    #[test]
    fn keys_resolve_from_env_and_hashes_and_mistakes_are_named() {
        let sha = "key-dddddddd";
        let hex: String = digest(sha.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        let cfg: AuthConfig = toml::from_str(&format!(
            "api_keys_env = \"LIST\"\n[[api_keys]]\nkey_env = \"A\"\nadmin = true\n[[api_keys]]\nkey_sha256 = \"{hex}\"\ntenant = \"t\"\n"
        ))
        .unwrap();
        let specs = cfg.resolve(env).unwrap();
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[2].tenant, "acme");
        let keys = Keys::new(specs);
        assert_eq!(keys.admit(Some(&bearer(sha))).unwrap().tenant, "t");
        assert_eq!(keys.admit(Some(&bearer("key-bbbbbbbb"))).unwrap().tenant, "acme");
        assert!(keys.check_admin(Some(&bearer("key-aaaaaaaa"))).is_ok());
        assert_eq!(keys.check_admin(Some(&bearer("key-cccccccc"))), Err(Denied::NotAdmin));
        assert!(matches!(keys.admit(None), Err(Denied::Unauthenticated(_))));
        assert!(matches!(keys.admit(Some(&bearer("key-wrongwrong"))), Err(Denied::Unauthenticated(_))));
        assert!(matches!(keys.admit(Some(b"key-aaaaaaaa")), Err(Denied::Unauthenticated(_))), "no Bearer");

        let err = |t: &str| toml::from_str::<AuthConfig>(t).unwrap().resolve(env).unwrap_err();
        assert!(err("[[api_keys]]\nkey_env = \"UNSET\"").contains("UNSET"));
        assert!(err("[[api_keys]]\nkey_sha256 = \"xyz\"").contains("64 hex"));
        assert!(err("[[api_keys]]\ntenant = \"t\"").contains("exactly one"));
        assert!(err("[[api_keys]]\nkey_env = \"A\"\n[[api_keys]]\nkey_env = \"A\"").contains("twice"));
        assert!(err(&format!("[[api_keys]]\nkey_env = \"A\"\ntenant = \"{}\"", "t".repeat(65))).contains("tenant"));
        assert!(toml::from_str::<AuthConfig>("[[api_keys]]\nkey = \"inline\"").is_err(), "no inline secrets");
        assert!(Keys::new(vec![]).admit(None).is_ok(), "no keys: open");
    }

    #[test]
    fn limits_refuse_beyond_them_and_in_flight_returns_with_the_permit() {
        let spec = |max_in_flight, requests_per_minute| KeySpec {
            digest: digest(b"key-limited"),
            tenant: String::new(),
            admin: false,
            max_in_flight,
            requests_per_minute,
        };
        let keys = Keys::new(vec![spec(2, 0)]);
        let k = bearer("key-limited");
        let (a, _b) = (keys.admit(Some(&k)).unwrap(), keys.admit(Some(&k)).unwrap());
        assert!(matches!(keys.admit(Some(&k)), Err(Denied::Limited { .. })));
        drop(a);
        assert!(keys.admit(Some(&k)).is_ok(), "a finished request frees its slot");
        let keys = Keys::new(vec![spec(0, 2)]);
        assert!(keys.admit(Some(&k)).is_ok() && keys.admit(Some(&k)).is_ok());
        match keys.admit(Some(&k)) {
            Err(Denied::Limited { retry_after_s, .. }) => assert!((1..=30).contains(&retry_after_s)),
            other => panic!("{other:?}"),
        }
    }
}
