//! `tandem prefill` and `tandem decode`: run one worker node of a cluster
//! file until Ctrl-C or SIGTERM, then drain its in-flight requests.

use super::cluster::ClusterConfig;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use tandem_kvstore::client::StoreClient;
use tandem_prefill::service::WorkerModel;

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Cluster file (TOML): its `[model]`, `[kvstore]` and this node's
    /// `[[prefill]]` or `[[decode]]` entry are used.
    #[arg(long, short)]
    config: PathBuf,
    /// Which node of the file to run.
    #[arg(long)]
    node: String,
    /// Run without the KV store: nothing is read from or written to it
    /// (every prompt is computed in full; decode recomputes the prompt).
    #[arg(long)]
    no_store: bool,
}

/// The store client of a worker, checked against the master once: a master
/// that is down is a warning, not a failure (requests are computed without
/// the cache until it is back).
pub(crate) async fn store_client(cfg: &ClusterConfig, off: bool) -> anyhow::Result<Option<Arc<StoreClient>>> {
    if off {
        return Ok(None);
    }
    let master = &cfg.kvstore.client.master;
    let client = StoreClient::new(cfg.kvstore.client.clone()).context("connecting to the store master")?;
    match client.stats().await {
        Ok(s) => eprintln!("store master {master}: {} storage nodes, policy {}", s.nodes.len(), s.policy),
        Err(e) => eprintln!(
            "warning: store master {master} is unreachable ({e}); computing without the cache until it is back"
        ),
    }
    Ok(Some(Arc::new(client)))
}

pub fn run_prefill(args: WorkerArgs) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(&args.config)?;
    let node = cfg.prefill_node(&args.node)?.clone();
    super::set_threads(node.threads)?;
    let loaded = load_model(&cfg, "prefill", &args.node)?;
    let wm = WorkerModel { model: loaded.model, kv_dtype: cfg.model.kv_dtype()?, block_tokens: cfg.model.block_tokens };
    let rt = super::kvstore::runtime()?;
    rt.block_on(async {
        let store = store_client(&cfg, args.no_store).await?;
        let handle = tandem_prefill::serve(node, wm, store).await.map_err(anyhow::Error::msg)?;
        eprintln!("prefill node {} listening on {}", args.node, handle.local_addr());
        let registration = register(&cfg, &args.node, "prefill", handle.local_addr()).await?;
        super::kvstore::shutdown_signal().await;
        deregister(registration).await;
        handle.shutdown().await;
        Ok(())
    })
}

pub fn run_decode(args: WorkerArgs) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(&args.config)?;
    let node = cfg.decode_node(&args.node)?.clone();
    super::set_threads(node.threads)?;
    let loaded = load_model(&cfg, "decode", &args.node)?;
    let (kv_dtype, block_tokens) = (cfg.model.kv_dtype()?, cfg.model.block_tokens);
    let rt = super::kvstore::runtime()?;
    rt.block_on(async {
        let store = store_client(&cfg, args.no_store).await?;
        let handle = tandem_decode::serve(node, loaded.model, kv_dtype, block_tokens, store)
            .await
            .map_err(anyhow::Error::msg)?;
        eprintln!("decode node {} listening on {}", args.node, handle.local_addr());
        let registration = register(&cfg, &args.node, "decode", handle.local_addr()).await?;
        super::kvstore::shutdown_signal().await;
        deregister(registration).await;
        handle.shutdown().await;
        Ok(())
    })
}

/// Loads the model a worker serves, saying so when its compute is modeled
/// (`[model] compute = "modeled"`): such a node never runs the real
/// forward pass, and its operator must know.
fn load_model(cfg: &ClusterConfig, role: &str, node: &str) -> anyhow::Result<tandem_model::engine::LoadedModel> {
    let loaded = cfg.model.load(true).context("loading the model")?;
    if let Some(m) = loaded.model.modeled_backend() {
        eprintln!("{role} node {node}: {}", m.describe());
        tracing::info!(node, profile = m.profile().name, kv_scale = m.kv_scale(), "modeled compute");
    }
    Ok(loaded)
}

/// With `[discovery]`, registers the node in etcd under a lease (the
/// conductor adds it); `None` with static membership.
async fn register(
    cfg: &ClusterConfig,
    name: &str,
    role: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Option<crate::discovery::Registration>> {
    if !cfg.discovery.enabled() {
        return Ok(None);
    }
    let member = crate::discovery::Member { name: name.to_string(), role: role.to_string(), addr };
    let r = crate::discovery::register(&cfg.discovery, &member).await.context("registering in etcd")?;
    eprintln!("registered {role} node {name} ({addr}) in etcd");
    Ok(Some(r))
}

/// Leaves etcd at once on a clean shutdown (rather than when the lease
/// expires).
async fn deregister(r: Option<crate::discovery::Registration>) {
    if let Some(r) = r {
        if let Err(e) = r.revoke().await {
            tracing::warn!("leaving etcd: {e:#}");
        }
    }
}
