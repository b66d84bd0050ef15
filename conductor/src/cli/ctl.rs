//! `tandem ctl …`: operate a running conductor through its admin gRPC API
//! ([`crate::admin`]): the nodes and their load, drain and undrain, the
//! requests in flight, the KV cache, the scheduling policy and SLOs. Tables
//! for people; `--json` prints one JSON document for scripts.

use super::cluster::ClusterConfig;
use crate::config::ConductorConfig;
use anyhow::{anyhow, bail};
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;
use tandem_proto::admin as pb;
use tandem_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

const EXAMPLES: &str = "\
Examples:
  tandem ctl --config etc/cluster.toml nodes
  tandem ctl --admin 127.0.0.1:8001 --json requests
  tandem ctl drain decode-1        (then `nodes` until its IN FLIGHT is 0)
  tandem ctl undrain decode-1
  tandem ctl cache stats
  tandem ctl cache lookup --chat --text \"What is the capital of France?\"
  tandem ctl cache evict --tokens 1,2,3,4
  tandem ctl policy set least-loaded
  tandem ctl slo set --ttft-ms 2000 --tbt-ms 100";

/// How long connecting may take, and one call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct CtlArgs {
    /// Admin API address (host:port); wins over --config. Default: the
    /// cluster file's `[conductor] admin_listen`, else 127.0.0.1:8001.
    #[arg(long, env = "TANDEM_ADMIN", global = true, value_name = "ADDR")]
    admin: Option<String>,
    /// Cluster file to take the admin address from.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// An admin API key (`[[auth.api_keys]]` with `admin = true`), needed
    /// when the conductor has API keys.
    #[arg(long, env = "TANDEM_API_KEY", global = true, value_name = "KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// List the nodes: role, address, health, load, KV use, work in flight
    /// and how their cost model stands.
    Nodes,
    /// Send no new work to a node; the requests it has run to their end.
    Drain {
        /// The node's name (as `nodes` lists it).
        node: String,
    },
    /// Let a drained node take new work again.
    Undrain {
        /// The node's name (as `nodes` lists it).
        node: String,
    },
    /// List the requests in flight, oldest first, with stage and nodes.
    Requests {
        /// Most requests to list (at most 10000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// The KV cache: the store's usage, one prompt's cached prefix, evicting
    /// a prompt's blocks.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Show or change the scheduling policy (takes effect at the next
    /// request).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show or change the TTFT and TBT objectives the scheduler admits
    /// requests against.
    #[command(subcommand)]
    Slo(SloCommand),
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// The store's usage per node and tier, its counters, and this
    /// conductor's cache hit ratio.
    Stats,
    /// How much of a prompt's KV the store holds (its cached prefix).
    Lookup(PromptArgs),
    /// Remove a prompt's blocks from the store (blocks in use are kept).
    Evict(PromptArgs),
}

/// A prompt as the HTTP API would see it.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("prompt").required(true).args(["text", "tokens"])))]
struct PromptArgs {
    /// The prompt text, tokenized as a completion prompt (up to 1 MiB).
    #[arg(long, allow_hyphen_values = true)]
    text: Option<String>,
    /// Render the text as one user message with the model's chat template
    /// (as /v1/chat/completions does).
    #[arg(long, requires = "text")]
    chat: bool,
    /// The prompt as token ids (comma-separated).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    tokens: Vec<u32>,
    /// Whose cache (an API key's tenant; default: the default tenant).
    #[arg(long, default_value = "")]
    tenant: String,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The policy in use and the ones available.
    Show,
    /// Switch the policy: kv-centric, random, round-robin, least-loaded or
    /// cache-affinity.
    Set {
        /// The policy's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum SloCommand {
    /// The SLOs in use.
    Show,
    /// Change either SLO or both (the one left out is kept).
    #[command(group(ArgGroup::new("slo").required(true).multiple(true).args(["ttft_ms", "tbt_ms"])))]
    Set {
        /// Time to first token, in milliseconds.
        #[arg(long, allow_negative_numbers = true)]
        ttft_ms: Option<f64>,
        /// Time between tokens, in milliseconds.
        #[arg(long, allow_negative_numbers = true)]
        tbt_ms: Option<f64>,
    },
}

pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let addr = admin_addr(&args)?;
    let rt = super::kvstore::runtime()?;
    rt.block_on(async {
        let mut ctl = Ctl { client: connect(&addr, args.api_key.as_deref()).await?, addr, json: args.json };
        match args.command {
            CtlCommand::Nodes => ctl.nodes().await,
            CtlCommand::Drain { node } => ctl.drain(node, true).await,
            CtlCommand::Undrain { node } => ctl.drain(node, false).await,
            CtlCommand::Requests { limit } => ctl.requests(limit).await,
            CtlCommand::Cache(CacheCommand::Stats) => ctl.cache_stats().await,
            CtlCommand::Cache(CacheCommand::Lookup(p)) => ctl.cache_lookup(p).await,
            CtlCommand::Cache(CacheCommand::Evict(p)) => ctl.cache_evict(p).await,
            CtlCommand::Policy(PolicyCommand::Show) => ctl.policy(None).await,
            CtlCommand::Policy(PolicyCommand::Set { name }) => ctl.policy(Some(name)).await,
            CtlCommand::Slo(SloCommand::Show) => ctl.slo(None).await,
            CtlCommand::Slo(SloCommand::Set { ttft_ms, tbt_ms }) => {
                ctl.slo(Some(pb::SetSloRequest { ttft_ms, tbt_ms })).await
            }
        }
    })
}

/// `--admin`, else the cluster file's `admin_listen` (a wildcard address
/// reached on loopback), else the default.
fn admin_addr(args: &CtlArgs) -> anyhow::Result<String> {
    if let Some(a) = &args.admin {
        return Ok(a.trim_start_matches("http://").trim_end_matches('/').to_string());
    }
    let Some(path) = &args.config else {
        return Ok(ConductorConfig::default().admin_listen.to_string());
    };
    let mut addr = ClusterConfig::load(path)?.conductor.admin_listen;
    if addr.port() == 0 {
        bail!(
            "{}: [conductor] admin_listen has port 0 (picked when the conductor starts); \
             pass --admin with the address it printed",
            path.display()
        );
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) });
    }
    Ok(addr.to_string())
}

/// An error and its causes on one line ("transport error: tcp connect
/// error: Connection refused (os error 111)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Adds `authorization: Bearer KEY` to every admin call.
#[derive(Debug, Clone)]
struct BearerKey(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for BearerKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type AdminChannel = tonic::service::interceptor::InterceptedService<Channel, BearerKey>;

async fn connect(addr: &str, api_key: Option<&str>) -> anyhow::Result<AdminClient<AdminChannel>> {
    let bearer = match api_key.map(str::trim).filter(|k| !k.is_empty()) {
        Some(k) => Some(
            format!("Bearer {k}").parse().map_err(|_| anyhow!("the API key must be printable ASCII without spaces"))?,
        ),
        None => None,
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| anyhow!("{addr:?} is not an admin API address (host:port)"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow!("cannot reach the conductor's admin API at {addr}: {}", chain(&e)))?;
    Ok(AdminClient::new(AdminChannel::new(channel, BearerKey(bearer))))
}

/// A connected admin client and how to print.
struct Ctl {
    client: AdminClient<AdminChannel>,
    addr: String,
    json: bool,
}

impl Ctl {
    /// What a failed call tells the user: the conductor's own message
    /// (it names the fix), or what went wrong on the way.
    fn error(&self, s: tonic::Status) -> anyhow::Error {
        use tonic::Code;
        match s.code() {
            Code::Unimplemented => {
                anyhow!("{} does not serve this admin call (not a Tandem conductor, or an older one)", self.addr)
            }
            Code::Unavailable if s.message().is_empty() || s.message().contains("transport") => {
                anyhow!("cannot reach the conductor's admin API at {}: {}", self.addr, chain(&s))
            }
            Code::Cancelled | Code::DeadlineExceeded if s.message().is_empty() => {
                anyhow!("the conductor at {} did not answer within {CALL_TIMEOUT:?}", self.addr)
            }
            Code::Unauthenticated => anyhow!("{} (pass an admin key: --api-key KEY or TANDEM_API_KEY)", s.message()),
            _ if s.message().is_empty() => anyhow!("the admin call failed: {:?}", s.code()),
            _ => anyhow!("{}", s.message()),
        }
    }

    fn print(&self, doc: &Value) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(doc)?);
        Ok(())
    }

    async fn nodes(&mut self) -> anyhow::Result<()> {
        let reply = self.client.nodes(pb::NodesRequest {}).await.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            return self.print(&json!({ "nodes": reply.nodes.iter().map(node_json).collect::<Vec<_>>() }));
        }
        print!("{}", nodes_table(&reply.nodes));
        Ok(())
    }

    async fn drain(&mut self, name: String, drain: bool) -> anyhow::Result<()> {
        let req = pb::NodeRef { name };
        let call = if drain { self.client.drain(req).await } else { self.client.undrain(req).await };
        let node = call.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            return self.print(&node_json(&node));
        }
        if drain {
            let in_flight = match node.in_flight {
                0 => "nothing is in flight there".to_string(),
                n => format!("the {} in flight there will finish", plural(n as u64, "request")),
            };
            println!("{} is draining: no new requests go to it; {in_flight}", node.name);
        } else {
            println!("{} takes new work again", node.name);
            if node.health != "up" {
                println!("note: it is {}; it gets work once it is up", node.health);
            }
        }
        Ok(())
    }

    async fn requests(&mut self, limit: u32) -> anyhow::Result<()> {
        let reply = self.client.requests(pb::RequestsRequest { limit }).await.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            let requests: Vec<Value> = reply.requests.iter().map(request_json).collect();
            return self.print(&json!({ "total": reply.total, "requests": requests }));
        }
        print!("{}", requests_table(&reply));
        Ok(())
    }

    async fn cache_stats(&mut self) -> anyhow::Result<()> {
        let s = self.client.cache_stats(pb::CacheStatsRequest {}).await.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            return self.print(&cache_stats_json(&s));
        }
        print!("{}", cache_stats_text(&s));
        Ok(())
    }

    async fn cache_lookup(&mut self, p: PromptArgs) -> anyhow::Result<()> {
        let req = pb::CacheLookupRequest {
            text: p.text.unwrap_or_default(),
            chat: p.chat,
            token_ids: p.tokens,
            tenant: p.tenant,
        };
        let r = self.client.cache_lookup(req).await.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            return self.print(&json!({
                "tokens": r.tokens, "blocks": r.blocks, "block_tokens": r.block_tokens,
                "cached_blocks": r.cached_blocks, "cached_tokens": r.cached_tokens,
            }));
        }
        let partial = r.tokens - r.blocks * r.block_tokens;
        println!(
            "prompt: {} = {} of {} tokens{}",
            plural(r.tokens as u64, "token"),
            plural(r.blocks as u64, "block"),
            r.block_tokens,
            if partial > 0 { format!(" (+{partial} in a partial block, never cached)") } else { String::new() }
        );
        println!(
            "cached: {} = {} ({} of the prompt)",
            plural(r.cached_blocks as u64, "block"),
            plural(r.cached_tokens as u64, "token"),
            percent(r.cached_tokens as f64 / r.tokens.max(1) as f64)
        );
        Ok(())
    }

    async fn cache_evict(&mut self, p: PromptArgs) -> anyhow::Result<()> {
        let req = pb::CacheEvictRequest {
            text: p.text.unwrap_or_default(),
            chat: p.chat,
            token_ids: p.tokens,
            tenant: p.tenant,
        };
        let r = self.client.cache_evict(req).await.map_err(|e| self.error(e))?.into_inner();
        if self.json {
            return self.print(&json!({ "tokens": r.tokens, "blocks": r.blocks, "removed": r.removed }));
        }
        println!("removed {} of the prompt's {} blocks ({})", r.removed, r.blocks, plural(r.tokens as u64, "token"));
        if r.removed < r.blocks {
            println!("the others were not stored, or are in use");
        }
        Ok(())
    }

    async fn policy(&mut self, set: Option<String>) -> anyhow::Result<()> {
        let reply = match set {
            Some(policy) => self.client.set_policy(pb::SetPolicyRequest { policy }).await,
            None => self.client.get_policy(pb::GetPolicyRequest {}).await,
        }
        .map_err(|e| self.error(e))?
        .into_inner();
        if self.json {
            return self.print(&json!({ "policy": reply.policy, "available": reply.available }));
        }
        println!("policy:    {}", reply.policy);
        println!("available: {}", reply.available.join(", "));
        Ok(())
    }

    async fn slo(&mut self, set: Option<pb::SetSloRequest>) -> anyhow::Result<()> {
        let reply = match set {
            Some(req) => self.client.set_slo(req).await,
            None => self.client.get_slo(pb::GetSloRequest {}).await,
        }
        .map_err(|e| self.error(e))?
        .into_inner();
        if self.json {
            return self.print(&json!({ "ttft_ms": reply.ttft_ms, "tbt_ms": reply.tbt_ms }));
        }
        println!("TTFT (time to first token):  {}", millis(reply.ttft_ms));
        println!("TBT (time between tokens):   {}", millis(reply.tbt_ms));
        Ok(())
    }
}

fn plural(n: u64, what: &str) -> String {
    format!("{} {what}{}", count(n), if n == 1 { "" } else { "s" })
}

/// A count with a k/M suffix past four digits ("980", "12.3k", "4.56M").
fn count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// Milliseconds as a person reads them ("0.42 ms", "12.3 ms", "2.50 s").
fn millis(ms: f64) -> String {
    if !ms.is_finite() {
        "-".into()
    } else if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{:.1} min", ms / 60_000.0)
    }
}

/// A ratio as a percentage ("45%", "0.5%").
fn percent(ratio: f64) -> String {
    let p = 100.0 * ratio;
    if p > 0.0 && p < 1.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).to_string()
}

/// Rows under their headers, each column as wide as its widest cell;
/// headers marked `true` are right-aligned (numbers). No trailing spaces.
fn table(headers: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if headers[i].1 {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn kv_used(n: &pb::NodeInfo) -> Option<f64> {
    (n.kv_pages_total > 0).then(|| 1.0 - n.kv_pages_free as f64 / n.kv_pages_total as f64)
}

fn load_text(n: &pb::NodeInfo) -> String {
    use pb::node_info::Load;
    match &n.load {
        None => "-".into(),
        Some(Load::Prefill(l)) => {
            format!("{} queued, {} tok, {}", l.queued_requests, count(l.queued_tokens), millis(l.predicted_work_ms))
        }
        Some(Load::Decode(l)) => format!(
            "batch {}/{}, {} waiting, {} step, {} ctx",
            l.batch_size,
            l.max_batch,
            l.waiting,
            millis(l.step_ms),
            count(l.context_tokens)
        ),
    }
}

fn nodes_table(nodes: &[pb::NodeInfo]) -> String {
    if nodes.is_empty() {
        return "no nodes (none in the cluster file, none discovered yet)\n".into();
    }
    let headers = [
        ("NODE", false),
        ("ROLE", false),
        ("ADDRESS", false),
        ("HEALTH", false),
        ("DRAINING", false),
        ("LOAD", false),
        ("KV USED", true),
        ("IN FLIGHT", true),
        ("COST MODEL", false),
    ];
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                if n.discovered { format!("{} (etcd)", n.role) } else { n.role.clone() },
                n.address.clone(),
                n.health.split(':').next().unwrap_or_default().to_string(),
                if n.draining { "yes".into() } else { "no".into() },
                load_text(n),
                kv_used(n).map_or("-".into(), percent),
                n.in_flight.to_string(),
                format!("{} ×{:.2}", if n.profiled { "fitted" } else { "prior" }, n.cost_correction),
            ]
        })
        .collect();
    let mut out = table(&headers, &rows);
    for n in nodes.iter().filter(|n| n.health.starts_with("down:")) {
        out.push_str(&format!("{} is {}\n", n.name, n.health));
    }
    out
}

fn node_json(n: &pb::NodeInfo) -> Value {
    use pb::node_info::Load;
    let load = match &n.load {
        None => Value::Null,
        Some(Load::Prefill(l)) => json!({
            "queued_requests": l.queued_requests, "queued_tokens": l.queued_tokens,
            "predicted_work_ms": l.predicted_work_ms,
        }),
        Some(Load::Decode(l)) => json!({
            "batch_size": l.batch_size, "max_batch": l.max_batch, "waiting": l.waiting,
            "step_ms": l.step_ms, "context_tokens": l.context_tokens,
        }),
    };
    json!({
        "name": n.name, "role": n.role, "address": n.address, "health": n.health,
        "draining": n.draining, "profiled": n.profiled, "discovered": n.discovered, "load": load,
        "kv_pages_total": n.kv_pages_total, "kv_pages_free": n.kv_pages_free, "kv_used_ratio": kv_used(n),
        "in_flight": n.in_flight, "cost_correction": n.cost_correction, "last_ok_ms_ago": n.last_ok_ms_ago,
    })
}

fn request_json(r: &pb::RequestInfo) -> Value {
    json!({
        "id": r.id, "request_id": r.request_id, "stage": r.stage, "prefill_node": r.prefill_node,
        "decode_node": r.decode_node, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
        "generated": r.generated, "attempts": r.attempts, "age_ms": r.age_ms,
    })
}

fn requests_table(reply: &pb::RequestsReply) -> String {
    if reply.total == 0 {
        return "no requests in flight\n".into();
    }
    let headers = [
        ("ID", true),
        ("REQUEST", false),
        ("STAGE", false),
        ("PREFILL", false),
        ("DECODE", false),
        ("PROMPT", true),
        ("CACHED", true),
        ("GENERATED", true),
        ("ATTEMPTS", true),
        ("AGE", true),
    ];
    let rows: Vec<Vec<String>> = reply
        .requests
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.request_id.clone(),
                r.stage.clone(),
                r.prefill_node.clone(),
                r.decode_node.clone(),
                r.prompt_tokens.to_string(),
                r.cached_tokens.to_string(),
                r.generated.to_string(),
                r.attempts.to_string(),
                millis(r.age_ms as f64),
            ]
        })
        .collect();
    let mut out = table(&headers, &rows);
    let shown = reply.requests.len() as u64;
    if shown < reply.total {
        out.push_str(&format!("{} in flight; the oldest {shown} shown (--limit)\n", reply.total));
    } else {
        out.push_str(&format!("{} in flight\n", plural(reply.total, "request")));
    }
    out
}

fn cache_stats_json(s: &pb::CacheStatsReply) -> Value {
    let nodes: Vec<Value> = s
        .nodes
        .iter()
        .map(|n| {
            let tiers: Vec<Value> = n
                .tiers
                .iter()
                .map(|t| {
                    json!({"tier": t.tier, "capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes,
                    "blocks": t.blocks})
                })
                .collect();
            json!({"name": n.name, "tiers": tiers, "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago})
        })
        .collect();
    json!({
        "nodes": nodes, "objects": s.objects, "pending_puts": s.pending_puts, "active_leases": s.active_leases,
        "pinned": s.pinned, "policy": s.policy, "counters": s.counters,
        "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens, "cache_hit_ratio": s.cache_hit_ratio,
    })
}

fn cache_stats_text(s: &pb::CacheStatsReply) -> String {
    let headers =
        [("NODE", false), ("TIER", false), ("USED", true), ("CAPACITY", true), ("USE", true), ("BLOCKS", true)];
    let rows: Vec<Vec<String>> = s
        .nodes
        .iter()
        .flat_map(|n| n.tiers.iter().filter(|t| t.capacity_bytes > 0).map(move |t| (n, t)))
        .map(|(n, t)| {
            vec![
                n.name.clone(),
                t.tier.clone(),
                bytes(t.used_bytes),
                bytes(t.capacity_bytes),
                percent(t.used_bytes as f64 / t.capacity_bytes as f64),
                t.blocks.to_string(),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() { "no storage nodes\n".to_string() } else { table(&headers, &rows) };
    out.push_str(&format!(
        "\nstore: {} objects, {} pending puts, {} leases, {} pinned, eviction policy {}\n",
        s.objects, s.pending_puts, s.active_leases, s.pinned, s.policy
    ));
    out.push_str(&format!(
        "conductor: cache hit ratio {} ({} of {} prompt tokens found in the store)\n",
        percent(s.cache_hit_ratio),
        count(s.cached_tokens),
        count(s.prompt_tokens)
    ));
    let mut counters: Vec<_> = s.counters.iter().collect();
    counters.sort();
    if !counters.is_empty() {
        out.push_str("store counters:\n");
        let width = counters.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in counters {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_numbers_read_as_units() {
        let t =
            table(&[("NAME", false), ("N", true)], &[vec!["a".into(), "1234".into()], vec!["bbb".into(), "5".into()]]);
        assert_eq!(t, "NAME     N\na     1234\nbbb      5\n");
        assert_eq!(millis(0.5), "0.50 ms");
        assert_eq!(millis(12.34), "12.3 ms");
        assert_eq!(millis(2500.0), "2.50 s");
        assert_eq!(millis(90_000.0), "1.5 min");
        assert_eq!(percent(0.45), "45%");
        assert_eq!(percent(0.004), "0.4%");
        assert_eq!(count(980), "980");
        assert_eq!(count(12_345), "12.3k");
        assert_eq!(plural(1, "block"), "1 block");
    }

    #[test]
    fn nodes_table_shows_load_and_why_a_node_is_down() {
        let up = pb::NodeInfo {
            name: "decode-0".into(),
            role: "decode".into(),
            address: "127.0.0.1:9201".into(),
            health: "up".into(),
            load: Some(pb::node_info::Load::Decode(pb::DecodeLoad {
                batch_size: 4,
                waiting: 1,
                step_ms: 12.34,
                context_tokens: 2048,
                max_batch: 8,
            })),
            kv_pages_total: 100,
            kv_pages_free: 50,
            in_flight: 5,
            cost_correction: 1.05,
            profiled: true,
            ..Default::default()
        };
        let down = pb::NodeInfo {
            name: "prefill-0".into(),
            role: "prefill".into(),
            address: "127.0.0.1:9101".into(),
            health: "down: no status within 2s".into(),
            draining: true,
            cost_correction: 1.0,
            ..Default::default()
        };
        let out = nodes_table(&[up.clone(), down]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{out}");
        assert!(lines[1].contains("batch 4/8, 1 waiting, 12.3 ms step") && lines[1].contains("50%"), "{out}");
        assert!(lines[1].contains("fitted ×1.05"), "{out}");
        assert!(lines[2].contains(" down ") && lines[2].contains(" yes "), "{out}");
        assert_eq!(lines[3], "prefill-0 is down: no status within 2s");
        assert_eq!(lines[1].find("127.0.0.1"), lines[2].find("127.0.0.1"), "columns align:\n{out}");
        let doc = node_json(&up);
        assert_eq!(doc["load"]["batch_size"], 4);
        assert_eq!(doc["kv_used_ratio"], 0.5);
    }
}
