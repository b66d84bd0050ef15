//! Optional etcd service discovery (`[discovery]` in the cluster file).
//!
//! Static membership from the cluster file stays the default. With
//! `etcd = [...]` set, every node [`register`]s itself as a [`Member`] under
//! a lease that a background task keeps alive, and the conductor [`watch`]es
//! the members: a snapshot, then a stream of [`MembershipEvent`]s.
//!
//! In etcd a member is `{prefix}members/{name}` → the JSON of [`Member`],
//! attached to the member's lease, so a node that dies disappears after
//! `lease_ttl_s`. Everything read back is validated: a malformed entry is
//! logged and skipped.
//!
//! Both background tasks outlive etcd restarts: the keep-alive re-grants
//! and re-puts when its lease is gone, and the watch re-lists and emits the
//! differences, so a consumer's view converges on what etcd holds.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    WatchOptions, WatchStream, Watcher,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tracing::{info, warn, Instrument};

/// Bound on reaching etcd: the TCP connect and the first answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on each unary call once connected.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings notice a dead etcd under an idle watch. etcd answers pings
/// sent more often than every 5 s (`--grpc-keepalive-min-time`) with GOAWAY.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off between the background tasks' reconnection attempts.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
const MAX_NAME_BYTES: usize = 128;
const MAX_ROLE_BYTES: usize = 32;
const MAX_PREFIX_BYTES: usize = 256;
/// A member's JSON is ~100 bytes; anything far larger is not ours.
const MAX_VALUE_BYTES: usize = 4096;
/// Most members read in one listing (more are logged and ignored).
const MAX_MEMBERS: i64 = 4096;
/// Events queued for a slow consumer before the watch task waits for it.
const EVENT_QUEUE: usize = 1024;
/// etcd raises shorter TTLs to its minimum (~2 s with default election
/// timeouts); a member silent for an hour is surely a misconfiguration.
const MIN_LEASE_TTL_S: u64 = 2;
const MAX_LEASE_TTL_S: u64 = 3600;

/// `[discovery]` of the cluster file.
///
/// `Default` is written out (not derived) so that `DiscoveryConfig::default()`
/// and a `[discovery]` table with fields left out agree.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// etcd endpoints (`"http://127.0.0.1:2379"`); empty = static membership
    /// (the default).
    pub etcd: Vec<String>,
    /// Key prefix under which members register.
    pub prefix: String,
    /// Lease TTL in seconds: a member that stops renewing disappears after this.
    pub lease_ttl_s: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { etcd: Vec::new(), prefix: "/tandem/".into(), lease_ttl_s: 5 }
    }
}

impl DiscoveryConfig {
    /// Whether membership comes from etcd rather than the static config.
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        for endpoint in &self.etcd {
            endpoint_authority(endpoint)?;
        }
        if !(self.prefix.starts_with('/') && self.prefix.ends_with('/')) {
            return Err(format!("prefix {:?}: must start and end with '/'", self.prefix));
        }
        if self.prefix.len() > MAX_PREFIX_BYTES {
            return Err(format!("prefix: {} bytes, at most {MAX_PREFIX_BYTES}", self.prefix.len()));
        }
        if !(MIN_LEASE_TTL_S..=MAX_LEASE_TTL_S).contains(&self.lease_ttl_s) {
            return Err(format!(
                "lease_ttl_s = {}: must be in {MIN_LEASE_TTL_S}..={MAX_LEASE_TTL_S}",
                self.lease_ttl_s
            ));
        }
        Ok(())
    }

    /// The key prefix of all members.
    fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }

    /// For error messages: "etcd at http://a:2379, http://b:2379".
    fn at(&self) -> String {
        format!("etcd at {}", self.etcd.join(", "))
    }
}

/// `host:port` of an `http://host:port` endpoint.
fn endpoint_authority(endpoint: &str) -> Result<&str, String> {
    let bad = || format!("etcd endpoint {endpoint:?}: expected http://host:port (TLS is not supported)");
    let rest = endpoint.strip_prefix("http://").ok_or_else(bad)?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let port = authority.rsplit_once(':').filter(|(host, _)| !host.is_empty()).map(|(_, port)| port.parse::<u16>());
    match port {
        Some(Ok(port)) if port != 0 && !authority.contains('/') => Ok(authority),
        _ => Err(bad()),
    }
}

/// A node as it registers itself.
///
/// Unknown JSON fields are ignored when read, so that fields a newer node
/// adds do not hide it from an older conductor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique in the cluster: ASCII letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// `"prefill"`, `"decode"`, `"conductor"`, … (same characters as `name`).
    pub role: String,
    /// Where the member serves.
    pub addr: SocketAddr,
}

impl Member {
    pub fn validate(&self) -> Result<(), String> {
        check_token("name", &self.name, MAX_NAME_BYTES)?;
        check_token("role", &self.role, MAX_ROLE_BYTES)
    }
}

fn check_token(what: &str, s: &str, max_bytes: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max_bytes {
        return Err(format!("{what} {s:?}: must be 1 to {max_bytes} bytes"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(format!("{what} {s:?}: only ASCII letters, digits, '-', '_' and '.' are allowed"));
    }
    Ok(())
}

/// A change after the snapshot [`watch`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member appeared, or changed what it registered (treat as upsert).
    Joined(Member),
    /// A member revoked its registration, its lease expired, or its entry
    /// became unreadable.
    Left { name: String },
}

/// A live registration. [`Registration::revoke`] removes the member at once;
/// dropping it only stops the keep-alive, and the member disappears when its
/// lease expires.
#[derive(Debug)]
pub struct Registration {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Registration {
    /// Stops the keep-alive and revokes the lease, deleting the member's key.
    pub async fn revoke(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            // A send error means the task already ended; its result says why.
            let _ = stop.send(());
        }
        match timeout(2 * RPC_TIMEOUT, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(anyhow!("keep-alive task of member {:?} failed: {e}", self.name)),
            Err(_) => Err(anyhow!("revoking the lease of member {:?} took over {:?}", self.name, 2 * RPC_TIMEOUT)),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers `member` under a fresh lease and keeps the lease alive in a
/// background task until [`Registration::revoke`] (or drop). A member
/// registered under the same name is replaced.
#[tracing::instrument(skip_all, fields(member = %member.name))]
pub async fn register(cfg: &DiscoveryConfig, member: &Member) -> anyhow::Result<Registration> {
    check_enabled(cfg)?;
    member.validate().map_err(|e| anyhow!("member: {e}"))?;
    let key = format!("{}{}", cfg.members_prefix(), member.name);
    let value = serde_json::to_string(member)?;
    let mut client = connect(cfg).await?;
    let lease = establish(cfg, &mut client, &key, &value, None).await?;
    info!(lease = lease.id, %key, "registered in etcd");
    let keep_alive = KeepAlive { cfg: cfg.clone(), key, value, client, lease };
    let (stop, stopped) = oneshot::channel();
    let span = tracing::info_span!("etcd_keep_alive", member = %member.name);
    let task = tokio::spawn(keep_alive.run(stopped).instrument(span));
    Ok(Registration { name: member.name.clone(), stop: Some(stop), task })
}

/// The current members (sorted by name) and a stream of changes after them.
/// The stream starts at the snapshot's revision + 1, so nothing falls between
/// the two. The background task ends when the receiver is dropped.
#[tracing::instrument(skip_all, fields(prefix = %cfg.prefix))]
pub async fn watch(cfg: &DiscoveryConfig) -> anyhow::Result<(Vec<Member>, mpsc::Receiver<MembershipEvent>)> {
    check_enabled(cfg)?;
    let mut client = connect(cfg).await?;
    let (known, revision) = list(cfg, &mut client).await?;
    let stream = open_watch(cfg, &mut client, revision + 1).await?;
    let snapshot = known.values().cloned().collect();
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let task = MemberWatch { cfg: cfg.clone(), known, tx, client, stream };
    let span = tracing::info_span!("etcd_watch", prefix = %cfg.prefix);
    tokio::spawn(task.run().instrument(span));
    Ok((snapshot, rx))
}

fn check_enabled(cfg: &DiscoveryConfig) -> anyhow::Result<()> {
    if !cfg.enabled() {
        bail!("etcd discovery is off: [discovery] etcd lists no endpoints");
    }
    cfg.validate().map_err(|e| anyhow!("[discovery]: {e}"))
}

/// A client that has answered once: `Client::connect` itself is lazy.
async fn connect(cfg: &DiscoveryConfig) -> anyhow::Result<Client> {
    let options =
        ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_keep_alive(PING_INTERVAL, PING_TIMEOUT);
    let mut client = Client::connect(&cfg.etcd, Some(options)).await.map_err(|e| anyhow!("{}: {e}", cfg.at()))?;
    let probe = client.get(cfg.members_prefix(), Some(GetOptions::new().with_count_only()));
    let failure = match timeout(CONNECT_TIMEOUT, probe).await {
        Ok(Ok(_)) => return Ok(client),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    Err(anyhow!("{}", diagnose(cfg, &failure).await))
}

/// Why each endpoint failed, e.g. "etcd at http://…: Connection refused
/// (os error 111)": gRPC's own errors bury that under transport layers.
/// `failure` is what the gRPC call said, for endpoints that TCP reaches.
async fn diagnose(cfg: &DiscoveryConfig, failure: &str) -> String {
    let mut reasons = Vec::with_capacity(cfg.etcd.len());
    for endpoint in &cfg.etcd {
        let reason = match endpoint_authority(endpoint) {
            Err(e) => e,
            Ok(authority) => match timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority)).await {
                Ok(Ok(_)) => failure.to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("TCP connect took over {CONNECT_TIMEOUT:?}"),
            },
        };
        reasons.push(format!("etcd at {endpoint}: {reason}"));
    }
    reasons.join("; ")
}

/// Runs one unary call under [`RPC_TIMEOUT`], naming etcd and `what` on error.
async fn call<T>(
    cfg: &DiscoveryConfig,
    what: &str,
    rpc: impl Future<Output = Result<T, etcd_client::Error>>,
) -> anyhow::Result<T> {
    match timeout(RPC_TIMEOUT, rpc).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{}: {what}: {e}", cfg.at())),
        Err(_) => Err(anyhow!("{}: {what}: no answer within {RPC_TIMEOUT:?}", cfg.at())),
    }
}

/// A lease being kept alive.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// The previous lease was still alive (nothing was re-granted).
    resumed: bool,
}

/// Keeps lease `previous` alive, or grants a new one when there is none or
/// it is gone, then (re-)puts `key` under it.
async fn establish(
    cfg: &DiscoveryConfig,
    client: &mut Client,
    key: &str,
    value: &str,
    previous: Option<i64>,
) -> anyhow::Result<Lease> {
    let mut resumed = None;
    if let Some(id) = previous {
        match timeout(RPC_TIMEOUT, client.lease_keep_alive(id)).await {
            Ok(Ok(kept)) => resumed = Some((id, kept)),
            // etcd-client's way of saying "lease not found": grant another.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => {}
            Ok(Err(e)) => bail!("{}: lease keep-alive: {e}", cfg.at()),
            Err(_) => bail!("{}: lease keep-alive: no answer within {RPC_TIMEOUT:?}", cfg.at()),
        }
    }
    let (id, (keeper, stream), was_resumed) = match resumed {
        Some((id, kept)) => (id, kept, true),
        None => {
            // validate() bounds the TTL well below i64::MAX.
            let id = call(cfg, "lease grant", client.lease_grant(cfg.lease_ttl_s as i64, None)).await?.id();
            (id, call(cfg, "lease keep-alive", client.lease_keep_alive(id)).await?, false)
        }
    };
    // Re-put even on a resumed lease: someone may have deleted the key.
    call(cfg, "put", client.put(key, value, Some(PutOptions::new().with_lease(id)))).await?;
    Ok(Lease { id, keeper, stream, resumed: was_resumed })
}

/// The registration's background task.
struct KeepAlive {
    cfg: DiscoveryConfig,
    key: String,
    value: String,
    client: Client,
    lease: Lease,
}

impl KeepAlive {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> anyhow::Result<()> {
        let ttl = Duration::from_secs(self.cfg.lease_ttl_s);
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut renewed_at = Instant::now();
        loop {
            let lost = tokio::select! {
                stopped = &mut stop => return self.stop(stopped.is_ok()).await,
                _ = tick.tick() => {
                    if renewed_at.elapsed() > ttl {
                        format!("no renewal for {ttl:?}")
                    } else if let Err(e) = self.lease.keeper.keep_alive().await {
                        format!("keep-alive request failed: {e}")
                    } else {
                        continue;
                    }
                }
                renewal = self.lease.stream.message() => match renewal {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        renewed_at = Instant::now();
                        continue;
                    }
                    Ok(Some(_)) => "etcd says the lease expired".to_string(),
                    Ok(None) => "the keep-alive stream ended".to_string(),
                    Err(e) => format!("the keep-alive stream failed: {e}"),
                },
            };
            warn!(lease = self.lease.id, reason = %lost, "etcd lease keep-alive lost; re-registering");
            let mut delay = RETRY_MIN;
            loop {
                tokio::select! {
                    stopped = &mut stop => return self.stop(stopped.is_ok()).await,
                    result = self.reestablish() => match result {
                        Ok(()) => break,
                        Err(e) => warn!(error = %e, retry_in = ?delay, "re-registering in etcd failed"),
                    },
                }
                tokio::select! {
                    stopped = &mut stop => return self.stop(stopped.is_ok()).await,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
            renewed_at = Instant::now();
        }
    }

    /// On a fresh connection, as etcd may have restarted.
    async fn reestablish(&mut self) -> anyhow::Result<()> {
        let mut client = connect(&self.cfg).await?;
        let lease = establish(&self.cfg, &mut client, &self.key, &self.value, Some(self.lease.id)).await?;
        if lease.resumed {
            info!(lease = lease.id, "etcd lease keep-alive resumed");
        } else {
            warn!(old = self.lease.id, new = lease.id, "etcd lease was lost; re-granted and re-registered");
        }
        self.client = client;
        self.lease = lease;
        Ok(())
    }

    /// `revoke` is false when the `Registration` was dropped: then the lease
    /// is left to expire.
    async fn stop(mut self, revoke: bool) -> anyhow::Result<()> {
        if !revoke {
            return Ok(());
        }
        match timeout(RPC_TIMEOUT, self.client.lease_revoke(self.lease.id)).await {
            Ok(Ok(_)) => {
                info!(lease = self.lease.id, key = %self.key, "revoked etcd registration");
                Ok(())
            }
            // Already expired: the key is gone, which is what revoking wants.
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => Ok(()),
            Ok(Err(e)) => Err(anyhow!("{}: lease revoke: {e}", self.cfg.at())),
            Err(_) => Err(anyhow!("{}: lease revoke: no answer within {RPC_TIMEOUT:?}", self.cfg.at())),
        }
    }
}

/// The valid members under the prefix and the revision they were read at.
async fn list(cfg: &DiscoveryConfig, client: &mut Client) -> anyhow::Result<(BTreeMap<String, Member>, i64)> {
    let options = GetOptions::new().with_prefix().with_limit(MAX_MEMBERS);
    let response = call(cfg, "list members", client.get(cfg.members_prefix(), Some(options))).await?;
    if response.more() {
        warn!(limit = MAX_MEMBERS, "more members registered than the limit; the rest are ignored");
    }
    let Some(header) = response.header() else {
        bail!("{}: list members: the response has no header (revision)", cfg.at());
    };
    let mut members = BTreeMap::new();
    for kv in response.kvs() {
        match member_from_kv(cfg, kv) {
            Ok(member) => {
                members.insert(member.name.clone(), member);
            }
            Err(e) => warn!(key = %show_key(kv.key()), error = %e, "skipping a malformed member entry in etcd"),
        }
    }
    Ok((members, header.revision()))
}

async fn open_watch(
    cfg: &DiscoveryConfig,
    client: &mut Client,
    start_revision: i64,
) -> anyhow::Result<(Watcher, WatchStream)> {
    let options = WatchOptions::new().with_prefix().with_start_revision(start_revision);
    call(cfg, "watch members", client.watch(cfg.members_prefix(), Some(options))).await
}

/// The member name in `key`, checked.
fn name_from_key<'k>(cfg: &DiscoveryConfig, key: &'k [u8]) -> Result<&'k str, String> {
    let prefix = cfg.members_prefix();
    let max_key_bytes = prefix.len() + MAX_NAME_BYTES;
    if key.len() > max_key_bytes {
        return Err(format!("key of {} bytes, at most {max_key_bytes}", key.len()));
    }
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
    let name = key.strip_prefix(&prefix).ok_or_else(|| format!("key outside {prefix:?}"))?;
    check_token("name", name, MAX_NAME_BYTES)?;
    Ok(name)
}

/// The member `name`'s stored value, checked.
fn decode_member(name: &str, value: &[u8]) -> Result<Member, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("value of {} bytes, at most {MAX_VALUE_BYTES}", value.len()));
    }
    let member: Member = serde_json::from_slice(value).map_err(|e| format!("value is not a member: {e}"))?;
    member.validate()?;
    if member.name != name {
        return Err(format!("value names member {:?}, the key {name:?}", member.name));
    }
    Ok(member)
}

fn member_from_kv(cfg: &DiscoveryConfig, kv: &KeyValue) -> Result<Member, String> {
    decode_member(name_from_key(cfg, kv.key())?, kv.value())
}

/// A key for a log line: lossy UTF-8, cut short.
fn show_key(key: &[u8]) -> String {
    const SHOWN: usize = 160;
    let mut shown = String::from_utf8_lossy(&key[..key.len().min(SHOWN)]).into_owned();
    if key.len() > SHOWN {
        shown.push('…');
    }
    shown
}

/// The events that turn a consumer's view `old` into `new`.
fn diff(old: &BTreeMap<String, Member>, new: &BTreeMap<String, Member>) -> Vec<MembershipEvent> {
    let left =
        old.keys().filter(|name| !new.contains_key(*name)).map(|name| MembershipEvent::Left { name: name.clone() });
    let joined = new.values().filter(|m| old.get(&m.name) != Some(m)).map(|m| MembershipEvent::Joined(m.clone()));
    left.chain(joined).collect()
}

/// The consumer dropped its receiver.
struct Closed;

/// The watch's background task; `known` is the consumer's view.
struct MemberWatch {
    cfg: DiscoveryConfig,
    known: BTreeMap<String, Member>,
    tx: mpsc::Sender<MembershipEvent>,
    // Kept alive with the stream: dropping the client (or the watcher, the
    // request side) could end it.
    client: Client,
    stream: (Watcher, WatchStream),
}

impl MemberWatch {
    async fn run(mut self) {
        // A second handle, so that waiting for the consumer to go away does
        // not borrow `self` while a resync does.
        let consumer = self.tx.clone();
        loop {
            let lost = tokio::select! {
                _ = consumer.closed() => return,
                message = self.stream.1.message() => match message {
                    Ok(Some(r)) if r.canceled() => format!(
                        "etcd cancelled the watch ({:?}, compacted to revision {})",
                        r.cancel_reason(),
                        r.compact_revision()
                    ),
                    Ok(Some(r)) => match self.apply(r.events()).await {
                        Ok(()) => continue,
                        Err(Closed) => return,
                    },
                    Ok(None) => "the watch stream ended".to_string(),
                    Err(e) => format!("the watch stream failed: {e}"),
                },
            };
            warn!(reason = %lost, "etcd watch lost; re-listing members");
            let mut delay = RETRY_MIN;
            let events = loop {
                tokio::select! {
                    _ = consumer.closed() => return,
                    result = self.resync() => match result {
                        Ok(events) => break events,
                        Err(e) => warn!(error = %e, retry_in = ?delay, "re-listing members from etcd failed"),
                    },
                }
                tokio::select! {
                    _ = consumer.closed() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            };
            for event in events {
                if self.tx.send(event).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn apply(&mut self, events: &[etcd_client::Event]) -> Result<(), Closed> {
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let change = match event.event_type() {
                EventType::Put => self.on_put(kv),
                EventType::Delete => name_from_key(&self.cfg, kv.key())
                    .ok()
                    .and_then(|name| self.known.remove(name))
                    .map(|member| MembershipEvent::Left { name: member.name }),
            };
            if let Some(change) = change {
                self.tx.send(change).await.map_err(|_| Closed)?;
            }
        }
        Ok(())
    }

    fn on_put(&mut self, kv: &KeyValue) -> Option<MembershipEvent> {
        let name = match name_from_key(&self.cfg, kv.key()) {
            Ok(name) => name,
            Err(e) => {
                warn!(key = %show_key(kv.key()), error = %e, "skipping a malformed member entry in etcd");
                return None;
            }
        };
        match decode_member(name, kv.value()) {
            Ok(member) if self.known.get(name) == Some(&member) => None,
            Ok(member) => {
                self.known.insert(member.name.clone(), member.clone());
                Some(MembershipEvent::Joined(member))
            }
            // What a re-list would show: the member is no longer readable.
            Err(e) => {
                warn!(key = %show_key(kv.key()), error = %e, "skipping a malformed member entry in etcd");
                self.known.remove(name).map(|_| MembershipEvent::Left { name: name.to_owned() })
            }
        }
    }

    /// Re-lists on a fresh connection, re-opens the watch after the listing,
    /// and returns the differences from what the consumer saw.
    async fn resync(&mut self) -> anyhow::Result<Vec<MembershipEvent>> {
        let mut client = connect(&self.cfg).await?;
        let (members, revision) = list(&self.cfg, &mut client).await?;
        self.stream = open_watch(&self.cfg, &mut client, revision + 1).await?;
        self.client = client;
        let events = diff(&self.known, &members);
        self.known = members;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ClusterFile {
        #[serde(default)]
        discovery: DiscoveryConfig,
    }

    fn parse(toml_text: &str) -> Result<DiscoveryConfig, String> {
        toml::from_str::<ClusterFile>(toml_text).map(|f| f.discovery).map_err(|e| e.to_string())
    }

    fn member(name: &str) -> Member {
        Member { name: name.into(), role: "decode".into(), addr: "127.0.0.1:9000".parse().unwrap() }
    }

    #[test]
    fn static_membership_is_the_default() {
        let absent = parse("").unwrap();
        let empty = parse("[discovery]\n").unwrap();
        assert_eq!(absent, DiscoveryConfig::default());
        assert_eq!(empty, DiscoveryConfig::default());
        assert!(!empty.enabled());
        assert_eq!(empty.prefix, "/tandem/");
        assert_eq!(empty.lease_ttl_s, 5);
        empty.validate().unwrap();
    }

    #[test]
    fn parses_an_etcd_table() {
        let cfg = parse(
            r#"
            [discovery]
            etcd = ["http://10.0.0.1:2379", "http://[::1]:2379/"]
            prefix = "/prod/tandem/"
            lease_ttl_s = 10
            "#,
        )
        .unwrap();
        assert!(cfg.enabled());
        assert_eq!(cfg.etcd.len(), 2);
        assert_eq!(cfg.prefix, "/prod/tandem/");
        assert_eq!(cfg.lease_ttl_s, 10);
        cfg.validate().unwrap();
        // What is written out reads back the same.
        assert_eq!(toml::from_str::<DiscoveryConfig>(&toml::to_string(&cfg).unwrap()).unwrap(), cfg);
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = parse("[discovery]\netcd_endpoints = [\"http://a:1\"]\n").unwrap_err();
        assert!(err.contains("etcd_endpoints"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let with = |f: fn(&mut DiscoveryConfig)| {
            let mut cfg = DiscoveryConfig { etcd: vec!["http://127.0.0.1:2379".into()], ..Default::default() };
            f(&mut cfg);
            cfg.validate()
        };
        with(|_| {}).unwrap();
        for endpoint in [
            "https://127.0.0.1:2379",
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "http://:2379",
            "http://h:0",
            "http://h:2379/v3",
        ] {
            let cfg = DiscoveryConfig { etcd: vec![endpoint.into()], ..Default::default() };
            let err = cfg.validate().unwrap_err();
            assert!(err.contains(endpoint), "{endpoint}: {err}");
        }
        assert!(with(|c| c.prefix = "tandem/".into()).unwrap_err().contains("prefix"));
        assert!(with(|c| c.prefix = "/tandem".into()).unwrap_err().contains("prefix"));
        assert!(with(|c| c.prefix = format!("/{}/", "x".repeat(MAX_PREFIX_BYTES))).unwrap_err().contains("prefix"));
        assert!(with(|c| c.lease_ttl_s = 1).unwrap_err().contains("lease_ttl_s"));
        assert!(with(|c| c.lease_ttl_s = MAX_LEASE_TTL_S + 1).unwrap_err().contains("lease_ttl_s"));
    }

    #[test]
    fn member_json_round_trips_and_tolerates_new_fields() {
        let m = member("decode-0");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"name":"decode-0","role":"decode","addr":"127.0.0.1:9000"}"#);
        assert_eq!(decode_member("decode-0", json.as_bytes()).unwrap(), m);
        let newer = r#"{"name":"decode-0","role":"decode","addr":"127.0.0.1:9000","gpus":8}"#;
        assert_eq!(decode_member("decode-0", newer.as_bytes()).unwrap(), m);
    }

    #[test]
    fn member_names_and_roles_are_checked() {
        member("prefill_1.a-b").validate().unwrap();
        for name in ["", "a/b", "a b", "é", &"x".repeat(MAX_NAME_BYTES + 1)] {
            assert!(member(name).validate().is_err(), "{name:?}");
        }
        let mut m = member("d");
        m.role = "x".repeat(MAX_ROLE_BYTES + 1);
        assert!(m.validate().is_err());
    }

    #[test]
    fn malformed_entries_are_errors_not_panics() {
        let cfg = DiscoveryConfig::default();
        assert_eq!(name_from_key(&cfg, b"/tandem/members/decode-0"), Ok("decode-0"));
        let long_key = format!("/tandem/members/{}", "x".repeat(100_000));
        for key in [
            b"/other/members/a".as_slice(),
            b"/tandem/members/",
            b"/tandem/members/a/b",
            b"/tandem/members/\xff",
            long_key.as_bytes(),
        ] {
            assert!(name_from_key(&cfg, key).is_err(), "{}", show_key(key));
        }
        let good = serde_json::to_vec(&member("a")).unwrap();
        assert!(decode_member("a", &good).is_ok());
        assert!(decode_member("b", &good).unwrap_err().contains("\"a\""));
        assert!(decode_member("a", b"{not json").is_err());
        assert!(decode_member("a", b"").is_err());
        assert!(decode_member("a", br#"{"name":"a","role":"decode","addr":"nowhere"}"#).is_err());
        assert!(decode_member("a", br#"{"name":"a","role":"","addr":"127.0.0.1:1"}"#).is_err());
        let huge =
            format!(r#"{{"name":"a","role":"decode","addr":"127.0.0.1:1","pad":"{}"}}"#, "x".repeat(MAX_VALUE_BYTES));
        assert!(decode_member("a", huge.as_bytes()).unwrap_err().contains("bytes"));
        assert!(show_key(long_key.as_bytes()).len() < 200);
    }

    #[test]
    fn diff_turns_the_old_view_into_the_new() {
        let view = |members: &[Member]| members.iter().map(|m| (m.name.clone(), m.clone())).collect();
        let (a, b, c) = (member("a"), member("b"), member("c"));
        let mut b_moved = b.clone();
        b_moved.addr = "127.0.0.1:9001".parse().unwrap();
        let old: BTreeMap<_, _> = view(&[a.clone(), b.clone()]);
        let new: BTreeMap<_, _> = view(&[b_moved.clone(), c.clone()]);
        assert_eq!(
            diff(&old, &new),
            vec![
                MembershipEvent::Left { name: "a".into() },
                MembershipEvent::Joined(b_moved),
                MembershipEvent::Joined(c)
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
