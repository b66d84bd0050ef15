//! The `[kvstore]` section of the cluster file (DESIGN.md §7):
//!
//! ```toml
//! [kvstore.master]
//! listen = "127.0.0.1:7100"
//! metadata_dir = "/var/lib/tandem/master"
//!
//! [[kvstore.storage]]
//! name = "store-a"
//! listen = "127.0.0.1:7201"
//! data_listen = "127.0.0.1:7202"
//! dram = "4GiB"
//! ssd_dir = "/var/lib/tandem/store-a"
//! ssd = "64GiB"
//! ```
//!
//! Every field has a default; unknown fields are errors (a typo must not
//! silently fall back to a default).

use serde::{Deserialize, Serialize};
use tandem_proto::cluster_token::ClusterToken;

use crate::client::ClientConfig;
use crate::master::MasterConfig;
use crate::node::StorageConfig;

/// The store's part of the cluster file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvstoreConfig {
    pub master: MasterConfig,
    pub storage: Vec<StorageConfig>,
    /// Defaults for clients (prefill, decode, conductor, the CLI).
    pub client: ClientConfig,
}

impl KvstoreConfig {
    /// Fills addresses left empty from the master's, then validates all.
    pub fn resolve(mut self) -> Result<KvstoreConfig, String> {
        let master_addr = self.master.listen.to_string();
        for s in &mut self.storage {
            if s.master.is_empty() {
                s.master = master_addr.clone();
            }
        }
        if self.client.master.is_empty() || self.client.master == ClientConfig::default().master {
            self.client.master = master_addr;
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.master.validate()?;
        let mut names = std::collections::HashSet::new();
        names.insert(self.master.name.as_str());
        let mut addrs = std::collections::HashSet::new();
        addrs.insert(self.master.listen);
        for s in &self.storage {
            s.validate()?;
            if !names.insert(s.name.as_str()) {
                return Err(format!("kvstore: node name {:?} is used twice", s.name));
            }
            for a in [s.listen, s.data_listen] {
                if a.port() != 0 && !addrs.insert(a) {
                    return Err(format!("kvstore: address {a} is used twice (node {:?})", s.name));
                }
            }
        }
        Ok(())
    }

    /// Gives every part of the store the cluster token (`[auth]`): the
    /// master, each storage node and the clients' defaults.
    pub fn with_cluster_token(mut self, token: Option<ClusterToken>) -> KvstoreConfig {
        self.master.cluster_token = token.clone();
        for s in &mut self.storage {
            s.cluster_token = token.clone();
        }
        self.client.cluster_token = token;
        self
    }

    /// The storage node called `name`, with a list of known names otherwise.
    pub fn storage_node(&self, name: &str) -> Result<&StorageConfig, String> {
        self.storage.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.storage.iter().map(|s| s.name.as_str()).collect();
            format!("no storage node {name:?} in the cluster file (storage nodes: {})", known.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_nodes_inherit_the_master_address_and_typos_are_errors() {
        let text = r#"
            [master]
            listen = "127.0.0.1:9100"
            [[storage]]
            name = "a"
            dram = "64MiB"
            listen = "127.0.0.1:9201"
            data_listen = "127.0.0.1:9202"
        "#;
        let cfg: KvstoreConfig = toml::from_str(text).unwrap();
        let cfg = cfg.resolve().unwrap();
        assert_eq!(cfg.storage[0].master, "127.0.0.1:9100");
        assert_eq!(cfg.storage[0].dram.as_u64(), 64 << 20);
        assert_eq!(cfg.client.master, "127.0.0.1:9100");
        let err = toml::from_str::<KvstoreConfig>("[master]\nlisten_addr = \"x\"").unwrap_err().to_string();
        assert!(err.contains("listen_addr"), "{err}");
    }

    #[test]
    fn duplicate_names_and_bad_values_are_rejected() {
        let dup = r#"
            [[storage]]
            name = "a"
            [[storage]]
            name = "a"
            listen = "127.0.0.1:1"
            data_listen = "127.0.0.1:2"
        "#;
        let err = toml::from_str::<KvstoreConfig>(dup).unwrap().resolve().unwrap_err();
        assert!(err.contains("used twice"), "{err}");
        let bad = "[master]\ndram_low_watermark = 0.95\n";
        let err = toml::from_str::<KvstoreConfig>(bad).unwrap().resolve().unwrap_err();
        assert!(err.contains("watermark"), "{err}");
        let small = "[[storage]]\nname = \"a\"\ndram = \"1KiB\"\n";
        let err = toml::from_str::<KvstoreConfig>(small).unwrap().resolve().unwrap_err();
        assert!(err.contains("minimum"), "{err}");
    }
}
