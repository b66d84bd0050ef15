//! `tandem kvstore …`: run a store master or storage node from the cluster
//! file, and inspect a running store (usage, nodes, keys), put and get blocks.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tandem_kvstore::client::{ClientConfig, PutOutcome, StoreClient};
use tandem_kvstore::config::KvstoreConfig;
use tandem_proto::kvstore as pb;
use tandem_proto::BlockKey;

/// Commands of the KV block store.
#[derive(Debug, Subcommand)]
pub enum KvstoreCommand {
    /// Run the store master (metadata service) of a cluster file.
    ///
    /// Example: tandem kvstore master --config etc/cluster.toml
    Master(ServeArgs),
    /// Run one storage node of a cluster file (contributes DRAM and SSD).
    ///
    /// Example: tandem kvstore storage --config etc/cluster.toml --node store-a
    Storage(ServeArgs),
    /// Show capacity and use per node and tier, and the master's counters.
    Stats(AdminArgs),
    /// List live storage nodes and how to reach them.
    Nodes(AdminArgs),
    /// List stored keys with their replicas.
    Keys(KeysArgs),
    /// Store a file's bytes under a key.
    Put(PutArgs),
    /// Fetch a key's bytes into a file (or stdout).
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Cluster file (TOML); its `[kvstore]` section is used.
    #[arg(long, short)]
    config: PathBuf,
    /// Which node of the file to run (storage: required; master: checked against its name).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Master address (host:port). Default: from --config, else 127.0.0.1:7100.
    #[arg(long, env = "TANDEM_KVSTORE_MASTER")]
    master: Option<String>,
    /// Cluster file to take the master address from.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Most keys to list.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// List keys after this one (hex), for paging.
    #[arg(long, value_parser = parse_key, default_value = "0")]
    after: BlockKey,
}

#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Key (hex, up to 16 digits).
    #[arg(long, value_parser = parse_key)]
    key: BlockKey,
    /// File whose bytes to store.
    #[arg(long)]
    file: PathBuf,
    /// Copies on distinct nodes (0 = the master's default).
    #[arg(long, default_value_t = 0)]
    replicas: u32,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Key (hex, up to 16 digits).
    #[arg(long, value_parser = parse_key)]
    key: BlockKey,
    /// Where to write the bytes ("-" = stdout).
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// Largest block to accept.
    #[arg(long, default_value_t = 256 << 20)]
    max_bytes: usize,
}

fn parse_key(s: &str) -> Result<BlockKey, String> {
    let hex = s.trim_start_matches("0x");
    u64::from_str_radix(hex, 16).map(BlockKey).map_err(|_| format!("{s:?} is not a hex key of up to 16 digits"))
}

/// Reads and validates a cluster file and returns its `[kvstore]` section.
pub fn load_config(path: &Path) -> anyhow::Result<KvstoreConfig> {
    Ok(super::cluster::ClusterConfig::load(path)?.kvstore)
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Resolves when the process gets Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutting down");
}

fn client_for(args: &AdminArgs) -> anyhow::Result<StoreClient> {
    let mut cfg = match &args.config {
        Some(path) => load_config(path)?.client,
        None => ClientConfig::default(),
    };
    if let Some(m) = &args.master {
        cfg.master = m.clone();
    }
    StoreClient::new(cfg).map_err(Into::into)
}

pub fn run(cmd: KvstoreCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        KvstoreCommand::Master(args) => {
            let cfg = load_config(&args.config)?;
            if let Some(node) = &args.node {
                if node != &cfg.master.name {
                    bail!("the cluster file's master is named {:?}, not {node:?}", cfg.master.name);
                }
            }
            rt.block_on(async {
                let handle = tandem_kvstore::master::serve(cfg.master).await.map_err(anyhow::Error::msg)?;
                eprintln!("kvstore master listening on {}", handle.local_addr());
                shutdown_signal().await;
                handle.shutdown().await;
                anyhow::Ok(())
            })
        }
        KvstoreCommand::Storage(args) => {
            let cfg = load_config(&args.config)?;
            let Some(name) = &args.node else {
                bail!("--node NAME is required: which storage node of the file to run")
            };
            let node = cfg.storage_node(name).map_err(anyhow::Error::msg)?.clone();
            rt.block_on(async {
                let handle = tandem_kvstore::node::start(node).await?;
                eprintln!(
                    "kvstore storage node {} listening: control {}, data {}",
                    handle.peer.name, handle.control_addr, handle.peer.data_addr
                );
                shutdown_signal().await;
                handle.shutdown().await;
                anyhow::Ok(())
            })
        }
        KvstoreCommand::Stats(args) => rt.block_on(stats(&args)),
        KvstoreCommand::Nodes(args) => rt.block_on(nodes(&args)),
        KvstoreCommand::Keys(args) => rt.block_on(keys(&args)),
        KvstoreCommand::Put(args) => rt.block_on(put(&args)),
        KvstoreCommand::Get(args) => rt.block_on(get(&args)),
    }
}

fn tier_name(t: i32) -> &'static str {
    match pb::Tier::try_from(t) {
        Ok(pb::Tier::Dram) => "dram",
        Ok(pb::Tier::Ssd) => "ssd",
        _ => "?",
    }
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).to_string()
}

async fn stats(args: &AdminArgs) -> anyhow::Result<()> {
    let client = client_for(args)?;
    let s = client.stats().await?;
    if args.json {
        let nodes: Vec<serde_json::Value> = s
            .nodes
            .iter()
            .map(|n| {
                let name = n.endpoint.as_ref().map(|e| e.name.clone()).unwrap_or_default();
                let tiers: Vec<serde_json::Value> = n
                    .tiers
                    .iter()
                    .map(|t| {
                        serde_json::json!({"tier": tier_name(t.tier), "capacity": t.capacity, "used": t.used, "blocks": t.blocks})
                    })
                    .collect();
                serde_json::json!({"name": name, "tiers": tiers, "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago})
            })
            .collect();
        let out = serde_json::json!({
            "nodes": nodes, "objects": s.objects, "pending_puts": s.pending_puts,
            "active_leases": s.active_leases, "pinned": s.pinned, "policy": s.policy,
            "counters": s.counters,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{:<16} {:<5} {:>12} {:>12} {:>7} {:>9}", "NODE", "TIER", "USED", "CAPACITY", "USE%", "BLOCKS");
    for n in &s.nodes {
        let name = n.endpoint.as_ref().map_or("?", |e| e.name.as_str());
        for t in &n.tiers {
            if t.capacity == 0 {
                continue;
            }
            let pct = 100.0 * t.used as f64 / t.capacity as f64;
            println!(
                "{name:<16} {:<5} {:>12} {:>12} {pct:>6.1}% {:>9}",
                tier_name(t.tier),
                human(t.used),
                human(t.capacity),
                t.blocks
            );
        }
    }
    println!(
        "\nobjects {}  pending puts {}  leases {}  pinned {}  policy {}",
        s.objects, s.pending_puts, s.active_leases, s.pinned, s.policy
    );
    let mut counters: Vec<_> = s.counters.iter().collect();
    counters.sort();
    for (k, v) in counters {
        println!("  {k:<22} {v}");
    }
    Ok(())
}

async fn nodes(args: &AdminArgs) -> anyhow::Result<()> {
    let client = client_for(args)?;
    let nodes = client.master().list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
    if args.json {
        let v: Vec<serde_json::Value> = nodes
            .iter()
            .map(|n| {
                serde_json::json!({"name": n.name, "incarnation": n.incarnation, "control": n.control_addr,
                "data": n.data_addr, "host_id": n.host_id, "segments": n.segments.len(), "ssd_dir": n.ssd_dir})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<16} {:<22} {:<22} {:>8} SSD", "NODE", "CONTROL", "DATA", "SEGMENTS");
    for n in nodes {
        println!("{:<16} {:<22} {:<22} {:>8} {}", n.name, n.control_addr, n.data_addr, n.segments.len(), n.ssd_dir);
    }
    Ok(())
}

async fn keys(args: &KeysArgs) -> anyhow::Result<()> {
    let client = client_for(&args.admin)?;
    let req = pb::ListKeysRequest { after: args.after.0, limit: args.limit };
    let keys = client.master().list_keys(req).await?.into_inner().keys;
    if args.admin.json {
        let v: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| {
                let replicas: Vec<String> =
                    k.replicas.iter().map(|r| format!("{}:{}", r.node, tier_name(r.tier))).collect();
                serde_json::json!({"key": format!("{:016x}", k.key), "len": k.len, "checksum": format!("{:016x}", k.checksum),
                    "replicas": replicas, "pinned": k.pinned, "leases": k.leases})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:<18} {:>12} {:<6} REPLICAS", "KEY", "BYTES", "PINNED");
    for k in &keys {
        let replicas: Vec<String> = k.replicas.iter().map(|r| format!("{}:{}", r.node, tier_name(r.tier))).collect();
        println!("{:016x}   {:>12} {:<6} {}", k.key, k.len, if k.pinned { "yes" } else { "" }, replicas.join(" "));
    }
    Ok(())
}

async fn put(args: &PutArgs) -> anyhow::Result<()> {
    let mut client_args = ClientConfig::default();
    if let Some(path) = &args.admin.config {
        client_args = load_config(path)?.client;
    }
    if let Some(m) = &args.admin.master {
        client_args.master = m.clone();
    }
    client_args.replicas = args.replicas;
    let client = StoreClient::new(client_args)?;
    let bytes = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let outcome = client.put(&[(args.key, &bytes)]).await?;
    match &outcome[0] {
        PutOutcome::Stored => eprintln!("stored {:016x} ({} bytes)", args.key.0, bytes.len()),
        PutOutcome::Existed => eprintln!("{:016x} was already stored", args.key.0),
        PutOutcome::InProgress => bail!("{:016x} is being written by another client", args.key.0),
        PutOutcome::Failed(why) => bail!("{:016x} not stored: {why}", args.key.0),
    }
    Ok(())
}

async fn get(args: &GetArgs) -> anyhow::Result<()> {
    let client = client_for(&args.admin)?;
    let found = client.get(&[args.key], args.max_bytes).await?;
    let Some(bytes) = found.into_iter().next().flatten() else {
        bail!("{:016x} is not in the store (or no replica could be read intact)", args.key.0)
    };
    if args.out.as_os_str() == "-" {
        use std::io::Write;
        std::io::stdout().write_all(&bytes)?;
    } else {
        std::fs::write(&args.out, &bytes).with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!("wrote {} bytes to {}", bytes.len(), args.out.display());
    }
    Ok(())
}
