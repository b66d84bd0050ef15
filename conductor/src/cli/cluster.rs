//! The cluster file (DESIGN.md §7): one TOML describing every node. Each
//! process reads the whole file, validates all of it and runs the part its
//! `--node` names.

use crate::auth::AuthConfig;
use crate::config::ConductorConfig;
use crate::discovery::DiscoveryConfig;
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use tandem_decode::DecodeConfig;
use tandem_kvstore::config::KvstoreConfig;
use tandem_model::deploy::ModelSection;
use tandem_prefill::PrefillConfig;
use tandem_proto::cluster_token::ClusterToken;

/// Largest cluster file read.
const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub model: ModelSection,
    pub kvstore: KvstoreConfig,
    pub prefill: Vec<PrefillConfig>,
    pub decode: Vec<DecodeConfig>,
    pub conductor: ConductorConfig,
    pub discovery: DiscoveryConfig,
    /// API keys and the cluster token (secrets come from the environment
    /// or a file).
    pub auth: AuthConfig,
    /// The resolved cluster token (`[auth]`), already handed to every
    /// node's section by [`ClusterConfig::load`].
    #[serde(skip)]
    pub cluster_token: Option<ClusterToken>,
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
        cfg.conductor.api_keys = cfg
            .auth
            .resolve(|name| std::env::var(name).ok())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let token = cfg
            .auth
            .cluster_token(|name| std::env::var(name).ok(), base)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg.set_cluster_token(token);
        Ok(cfg)
    }

    /// Gives every node of the file the cluster token (`None`: no check).
    pub fn set_cluster_token(&mut self, token: Option<ClusterToken>) {
        self.kvstore = std::mem::take(&mut self.kvstore).with_cluster_token(token.clone());
        for p in &mut self.prefill {
            p.cluster_token = token.clone();
        }
        for d in &mut self.decode {
            d.cluster_token = token.clone();
        }
        self.conductor.cluster_token = token.clone();
        self.cluster_token = token;
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
        self.conductor.validate()?;
        self.discovery.validate()?;
        names.insert(&self.conductor.name);
        for a in [self.conductor.listen, self.conductor.admin_listen] {
            if a.port() != 0 && !addrs.insert(a) {
                return Err(format!("address {a} is used twice (conductor)"));
            }
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

    /// The conductor's section, checked against `--node`.
    pub fn conductor_node(&self, name: &str) -> anyhow::Result<&ConductorConfig> {
        if self.conductor.name != name {
            bail!("the cluster file's conductor is named {:?}, not {name:?}", self.conductor.name);
        }
        Ok(&self.conductor)
    }

    /// The workers the conductor starts with (more may join through
    /// discovery).
    pub fn workers(&self) -> crate::service::Workers {
        crate::service::Workers {
            prefill: self.prefill.iter().map(|p| (p.name.clone(), p.listen)).collect(),
            decode: self.decode.iter().map(|d| (d.name.clone(), d.listen, d.max_batch as u32)).collect(),
        }
    }

    pub fn decode_node(&self, name: &str) -> anyhow::Result<&DecodeConfig> {
        let known: Vec<&str> = self.decode.iter().map(|p| p.name.as_str()).collect();
        self.decode.iter().find(|p| p.name == name).with_context(|| {
            format!("no decode node {name:?} in the cluster file (decode nodes: {})", known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<ClusterConfig> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text)?;
        ClusterConfig::load(&path)
    }

    #[test]
    fn workers_are_read_with_defaults_and_mistakes_are_named() {
        let cfg = load("[[prefill]]\nname = \"p\"\n[[decode]]\nname = \"d\"\nmax_batch = 8\n").unwrap();
        assert_eq!(cfg.prefill[0].chunk_tokens, 512);
        assert_eq!(cfg.decode[0].max_batch, 8);
        assert!(cfg.prefill_node("p").is_ok());
        assert!(format!("{:#}", cfg.decode_node("x").unwrap_err()).contains("decode nodes: d"));
        let err = |t: &str| format!("{:#}", load(t).unwrap_err());
        assert!(err("[[prefill]]\nname = \"p\"\nchunk = 5\n").contains("chunk"), "unknown field named");
        assert!(err("[[prefill]]\nname = \"a\"\n[[decode]]\nname = \"a\"\n").contains("used twice"));
        assert!(err("[[decode]]\nname = \"d\"\nmax_batch = 0\n").contains("max_batch"));
        assert!(err("[model]\nkv_dtype = \"f8\"\n").contains("kv_dtype"));
        assert!(
            err("[[prefill]]\nlisten = \"127.0.0.1:9\"\n[[decode]]\nlisten = \"127.0.0.1:9\"\n").contains("used twice")
        );
        assert!(err("[[prefill]]\nkv_memory = \"lots\"\n").contains("kv_memory"));
    }

    #[test]
    fn the_example_documents_the_conductor_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/cluster.toml");
        let cfg = ClusterConfig::load(&path).unwrap();
        assert_eq!(cfg.conductor, ConductorConfig::default(), "etc/cluster.toml's [conductor] shows the defaults");
        assert!(!cfg.discovery.enabled(), "static membership is the default");
        let two = ClusterConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/two-hosts.toml")).unwrap();
        assert_eq!((two.prefill.len(), two.decode.len(), two.kvstore.storage.len()), (2, 2, 2));
    }
}
