//! The cluster file (DESIGN.md §7): one TOML describing every node. Each
//! process reads the whole file, validates all of it and runs the part its
//! `--node` names.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use tandem_decode::DecodeConfig;
use tandem_kvstore::config::KvstoreConfig;
use tandem_model::deploy::ModelSection;
use tandem_prefill::PrefillConfig;

/// Largest cluster file read.
const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub model: ModelSection,
    pub kvstore: KvstoreConfig,
    pub prefill: Vec<PrefillConfig>,
    pub decode: Vec<DecodeConfig>,
}

impl ClusterConfig {
    /// Reads, resolves and validates a cluster file.
    pub fn load(path: &Path) -> anyhow::Result<ClusterConfig> {
        let meta = std::fs::metadata(path).with_context(|| format!("reading cluster file {}", path.display()))?;
        if meta.len() > MAX_FILE_BYTES {
            bail!("cluster file {} is {} bytes; the limit is 4 MiB", path.display(), meta.len());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading cluster file {}", path.display()))?;
        let mut cfg: ClusterConfig =
            toml::from_str(&text).with_context(|| format!("parsing cluster file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.model = cfg.model.relative_to(base);
        cfg.kvstore = cfg.kvstore.resolve().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.model.validate()?;
        let mut names: HashSet<&str> = HashSet::new();
        let mut addrs: HashSet<SocketAddr> = HashSet::new();
        names.insert(&self.kvstore.master.name);
        addrs.insert(self.kvstore.master.listen);
        for s in &self.kvstore.storage {
            names.insert(&s.name);
            addrs.extend([s.listen, s.data_listen]);
        }
        let workers = self.prefill.iter().map(|p| (p.name.as_str(), p.listen, p.validate()));
        let workers = workers.chain(self.decode.iter().map(|d| (d.name.as_str(), d.listen, d.validate())));
        for (name, listen, valid) in workers {
            valid?;
            if !names.insert(name) {
                return Err(format!("node name {name:?} is used twice"));
            }
            if listen.port() != 0 && !addrs.insert(listen) {
                return Err(format!("address {listen} is used twice (node {name:?})"));
            }
        }
        Ok(())
    }

    pub fn prefill_node(&self, name: &str) -> anyhow::Result<&PrefillConfig> {
        let known: Vec<&str> = self.prefill.iter().map(|p| p.name.as_str()).collect();
        self.prefill.iter().find(|p| p.name == name).with_context(|| {
            format!("no prefill node {name:?} in the cluster file (prefill nodes: {})", known.join(", "))
        })
    }

    pub fn decode_node(&self, name: &str) -> anyhow::Result<&DecodeConfig> {
        let known: Vec<&str> = self.decode.iter().map(|p| p.name.as_str()).collect();
        self.decode.iter().find(|p| p.name == name).with_context(|| {
            format!("no decode node {name:?} in the cluster file (decode nodes: {})", known.join(", "))
        })
    }
}
