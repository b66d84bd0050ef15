//! The `[model]` section of the cluster file: which model every worker
//! serves and the KV layout they share. Prefill and decode nodes must agree
//! on all of it, or their blocks are not interchangeable (the block keys'
//! salt covers it, so a mismatch is a cache miss, never wrong output).
//!
//! ```toml
//! [model]
//! path = "smollm2"        # a known name, a .gguf file or a HF directory
//! kv_dtype = "f32"        # or "bf16"
//! block_tokens = 16       # tokens per KV block (= store block)
//! precision = "fast"      # or "exact" (f32 weights and products)
//! ```

use crate::engine::{self, LoadedModel};
use crate::error::{ModelError, Result};
use crate::kv_cache::KvDType;
use serde::{Deserialize, Serialize};
use std::path::Path;
use tandem_kernels::Precision;

/// Largest block accepted in a deployment (tokens).
pub const MAX_BLOCK_TOKENS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A known model name (fetched on first use), a .gguf file or a Hugging
    /// Face directory. Relative paths are relative to the cluster file.
    pub path: String,
    pub kv_dtype: String,
    pub block_tokens: usize,
    pub precision: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path: "smollm2".into(), kv_dtype: "f32".into(), block_tokens: 16, precision: "fast".into() }
    }
}

impl ModelSection {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.path.is_empty() {
            return Err("model.path is empty".into());
        }
        self.kv_dtype().map_err(|e| format!("model.kv_dtype: {e}"))?;
        self.precision().map_err(|e| format!("model.precision: {e}"))?;
        if self.block_tokens == 0 || self.block_tokens > MAX_BLOCK_TOKENS {
            return Err(format!("model.block_tokens must be in 1..={MAX_BLOCK_TOKENS}, got {}", self.block_tokens));
        }
        Ok(())
    }

    pub fn kv_dtype(&self) -> Result<KvDType> {
        self.kv_dtype.parse()
    }

    pub fn precision(&self) -> Result<Precision> {
        match self.precision.as_str() {
            "fast" => Ok(Precision::Fast),
            "exact" => Ok(Precision::Exact),
            other => Err(ModelError::Request(format!("unknown precision '{other}' (use fast or exact)"))),
        }
    }

    /// Resolves relative paths against `base` (the cluster file's folder).
    pub fn relative_to(mut self, base: &Path) -> Self {
        let p = Path::new(&self.path);
        if p.is_relative() && crate::fetch::known_model(&self.path).is_none() {
            self.path = base.join(p).display().to_string();
        }
        self
    }

    /// Loads the model (fetching a known one on first use).
    pub fn load(&self, progress: bool) -> Result<LoadedModel> {
        self.validate().map_err(ModelError::Request)?;
        let path = crate::fetch::resolve(&self.path, progress)?;
        engine::load(&path, self.precision()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_typos_are_refused() {
        ModelSection::default().validate().unwrap();
        let bad = |f: fn(&mut ModelSection)| {
            let mut m = ModelSection::default();
            f(&mut m);
            m.validate().unwrap_err()
        };
        assert!(bad(|m| m.kv_dtype = "f16".into()).contains("kv_dtype"));
        assert!(bad(|m| m.precision = "quick".into()).contains("precision"));
        assert!(bad(|m| m.block_tokens = 0).contains("block_tokens"));
        assert!(bad(|m| m.path.clear()).contains("path"));
        assert!(toml::from_str::<ModelSection>("pathh = 'x'").is_err());
    }
}
