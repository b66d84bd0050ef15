//! `tandem conductor`: run the conductor of a cluster file — the
//! OpenAI-compatible HTTP API, the scheduler over the file's workers (and
//! any that join through etcd), and the admin API `tandem ctl` talks to.

use super::cluster::ClusterConfig;
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Args)]
pub struct ConductorArgs {
    /// Cluster file (TOML): its `[conductor]`, `[model]`, `[kvstore]`,
    /// `[[prefill]]`, `[[decode]]` and `[discovery]` sections are used.
    #[arg(long, short)]
    config: PathBuf,
    /// The conductor's name in the file (`[conductor] name`).
    #[arg(long, default_value = "conductor")]
    node: String,
    /// Do not ask the KV store for cached prefixes (placement then ignores
    /// the cache).
    #[arg(long)]
    no_store: bool,
}

pub fn run(args: ConductorArgs) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(&args.config)?;
    cfg.conductor_node(&args.node)?;
    let rt = super::kvstore::runtime()?;
    rt.block_on(async {
        let conductor = start(&cfg, args.no_store).await?;
        let http = tokio::net::TcpListener::bind(cfg.conductor.listen)
            .await
            .with_context(|| format!("binding the HTTP API to {}", cfg.conductor.listen))?;
        let admin = crate::admin::spawn(conductor.clone(), cfg.conductor.admin_listen).await?;
        let admin_addr = admin.local_addr();
        eprintln!("conductor {}: admin API on {admin_addr} (tandem ctl --admin {admin_addr} nodes)", args.node);
        eprintln!(
            "conductor {}: OpenAI API on http://{} (model {})",
            args.node,
            http.local_addr()?,
            conductor.model.name,
        );
        let header_timeout = std::time::Duration::from_millis(cfg.conductor.header_timeout_ms);
        let router = crate::api::router(conductor);
        let served = crate::api::server::serve(http, router, header_timeout, super::kvstore::shutdown_signal())
            .await
            .context("serving HTTP");
        admin.shutdown().await;
        served
    })
}

/// Builds the conductor of a cluster file and starts polling its workers
/// (and, with `[discovery]`, watching etcd for more).
pub async fn start(cfg: &ClusterConfig, no_store: bool) -> anyhow::Result<Arc<crate::service::Conductor>> {
    // The configuration the workers serve: under `compute = "modeled"` the
    // modeled one (its context length, its scaled KV blocks), which the
    // conductor bounds requests by and schedules with.
    let (tokenizer, model_cfg) = cfg.model.load_tokenizer(true).context("loading the tokenizer")?;
    let info = crate::service::ModelInfo::new(
        cfg.conductor.model_name(&cfg.model.path),
        tokenizer,
        &model_cfg,
        cfg.model.kv_dtype()?,
        cfg.model.block_tokens as u32,
    )?;
    let store = super::worker::store_client(cfg, no_store).await?;
    // With discovery, the workers are the ones registered in etcd (the file
    // still holds each node's own settings); otherwise the file's.
    let workers = if cfg.discovery.enabled() { crate::service::Workers::default() } else { cfg.workers() };
    let conductor = crate::service::Conductor::new(cfg.conductor.clone(), info, &workers, store)?;
    conductor.spawn_pollers();
    if cfg.discovery.enabled() {
        let (members, mut events) = crate::discovery::watch(&cfg.discovery).await.context("watching etcd")?;
        // A decode node's batch limit comes from the file when it is there.
        let max_batch = {
            let decode = cfg.decode.clone();
            move |name: &str| decode.iter().find(|d| d.name == name).map_or(64, |d| d.max_batch as u32)
        };
        eprintln!("etcd: {} members registered", members.len());
        for m in members {
            conductor.add_worker(&m.name, &m.role, m.addr, max_batch(&m.name))?;
        }
        let c = conductor.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    crate::discovery::MembershipEvent::Joined(m) => {
                        tracing::info!(node = %m.name, role = %m.role, addr = %m.addr, "member joined");
                        if let Err(e) = c.add_worker(&m.name, &m.role, m.addr, max_batch(&m.name)) {
                            tracing::warn!("member {}: {e:#}", m.name);
                        }
                    }
                    // Its poller marks it down when it stops answering.
                    crate::discovery::MembershipEvent::Left { name } => tracing::info!(node = %name, "member left"),
                }
            }
        });
    }
    Ok(conductor)
}
