//! `tandem check-config`: read and validate a cluster file without starting
//! anything, and say what it describes.

use super::cluster::ClusterConfig;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Cluster file (TOML) to validate.
    #[arg(long, short)]
    config: PathBuf,
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let cfg = ClusterConfig::load(&args.config)?;
    let m = &cfg.model;
    println!("{}: valid", args.config.display());
    println!(
        "model     {} ({} KV, blocks of {} tokens, {} precision)",
        m.path, m.kv_dtype, m.block_tokens, m.precision
    );
    if let Some(modeled) = m.modeled()? {
        println!("          {} (tokenizer from {})", modeled.describe(), m.path);
    }
    let c = &cfg.conductor;
    println!(
        "conductor {} on http://{} (admin {}), policy {}, SLO TTFT {} ms / TBT {} ms",
        c.name,
        c.listen,
        c.admin_listen,
        serde_json::to_value(c.policy).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
        c.slo.ttft_ms,
        c.slo.tbt_ms
    );
    let keys = &cfg.conductor.api_keys;
    if keys.is_empty() {
        println!("auth      off (no API keys: the HTTP and admin APIs are open)");
    } else {
        let admin = keys.iter().filter(|k| k.admin).count();
        let tenants: std::collections::BTreeSet<&str> = keys.iter().map(|k| k.tenant.as_str()).collect();
        println!("auth      on: {} API keys ({admin} admin), {} tenants", keys.len(), tenants.len());
    }
    match (&cfg.cluster_token, cfg.auth.cluster_token_env.as_str()) {
        (None, _) => println!("cluster   token off (internal gRPC and the data plane trust their network)"),
        (Some(_), "") => println!(
            "cluster   token on (from {}): internal gRPC and the data plane require it",
            cfg.auth.cluster_token_file
        ),
        (Some(_), var) => println!("cluster   token on (from ${var}): internal gRPC and the data plane require it"),
    }
    if cfg.discovery.enabled() {
        println!("discovery etcd {} (prefix {})", cfg.discovery.etcd.join(", "), cfg.discovery.prefix);
    }
    let master = &cfg.kvstore.master;
    println!("master    {} on {}", master.name, master.listen);
    for s in &cfg.kvstore.storage {
        println!("storage   {} on {} (data {}), DRAM {}, SSD {}", s.name, s.listen, s.data_listen, s.dram, s.ssd);
    }
    for p in &cfg.prefill {
        println!("prefill   {} on {}, KV {}, chunk {} tokens", p.name, p.listen, p.kv_memory, p.chunk_tokens);
    }
    for d in &cfg.decode {
        println!("decode    {} on {}, KV {}, max batch {}", d.name, d.listen, d.kv_memory, d.max_batch);
    }
    if cfg.prefill.is_empty() != cfg.decode.is_empty() {
        println!("warning: the file has prefill nodes or decode nodes but not both");
    }
    Ok(())
}
