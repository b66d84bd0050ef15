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
//! compute = "real"        # or "modeled": a cost model replaces the forward pass
//! modeled = ""            # the modeled profile (required when modeled)
//! kv_scale = 256          # modeled KV bytes per token are divided by this
//! ```
//!
//! With `compute = "modeled"` ([`crate::modeled`]) workers load no weights:
//! the tokenizer, vocabulary and special tokens still come from `path`, the
//! layers, context length and (scaled) KV geometry from the profile.
//! Modeled runs should use `kv_dtype = "bf16"`: the scaled geometry
//! assumes BF16 KV, as the modeled deployments store it (f32 doubles the
//! bytes).

use crate::config::ModelConfig;
use crate::engine::{self, LoadedModel};
use crate::error::{ModelError, Result};
use crate::forward::Model;
use crate::kv_cache::KvDType;
use crate::modeled::Modeled;
use crate::tokenizer::Tokenizer;
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
    /// `"real"` (the forward pass) or `"modeled"` (a cost model of
    /// `modeled`; never chosen otherwise).
    pub compute: String,
    /// The modeled profile ([`crate::modeled::PROFILES`]); only with
    /// `compute = "modeled"`.
    pub modeled: String,
    /// Modeled KV bytes per token are the profile's divided by this (a
    /// power of two), so long prompts fit in RAM.
    pub kv_scale: u32,
}

/// Default `kv_scale`: Llama-3-8B's 128 KiB of KV per token become 512 B.
pub const DEFAULT_KV_SCALE: u32 = 256;

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: "smollm2".into(),
            kv_dtype: "f32".into(),
            block_tokens: 16,
            precision: "fast".into(),
            compute: "real".into(),
            modeled: String::new(),
            kv_scale: DEFAULT_KV_SCALE,
        }
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
        if self.kv_scale == 0 || !self.kv_scale.is_power_of_two() {
            return Err(format!("model.kv_scale must be a power of two, got {}", self.kv_scale));
        }
        match self.compute.as_str() {
            "real" if !self.modeled.is_empty() => Err(format!(
                "model.modeled = {:?} is set but model.compute is \"real\" (set compute = \"modeled\" to use it)",
                self.modeled
            )),
            "real" => Ok(()),
            "modeled" if self.modeled.is_empty() => {
                let known: Vec<&str> = crate::modeled::PROFILES.iter().map(|p| p.name).collect();
                Err(format!("model.compute = \"modeled\" needs model.modeled (one of: {})", known.join(", ")))
            }
            "modeled" => Modeled::new(&self.modeled, self.kv_scale).map(drop).map_err(|e| format!("model: {e}")),
            other => Err(format!("model.compute must be \"real\" or \"modeled\", got {other:?}")),
        }
    }

    /// The modeled backend when `compute = "modeled"`, `None` for the real
    /// forward pass.
    pub fn modeled(&self) -> Result<Option<Modeled>> {
        self.validate().map_err(ModelError::Config)?;
        match self.compute.as_str() {
            "modeled" => Modeled::new(&self.modeled, self.kv_scale).map(Some),
            _ => Ok(None),
        }
    }

    /// The configuration workers serve, given the configuration of the
    /// model `path` names: that one, or the modeled one derived from it.
    pub fn serving_config(&self, real: &ModelConfig) -> Result<ModelConfig> {
        match self.modeled()? {
            Some(m) => m.config(real),
            None => Ok(real.clone()),
        }
    }

    /// The tokenizer and the configuration workers serve (the modeled one
    /// under `compute = "modeled"`), without loading weights: what a
    /// conductor needs to tokenize, bound and schedule requests.
    pub fn load_tokenizer(&self, progress: bool) -> Result<(Tokenizer, ModelConfig)> {
        self.validate().map_err(ModelError::Config)?;
        let path = crate::fetch::resolve(&self.path, progress)?;
        let (tokenizer, real) = engine::load_tokenizer(&path)?;
        Ok((tokenizer, self.serving_config(&real)?))
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

    /// Loads the model (fetching a known one on first use). Under
    /// `compute = "modeled"` only the tokenizer and configuration of
    /// `path` are read, and the model is the modeled one.
    pub fn load(&self, progress: bool) -> Result<LoadedModel> {
        self.validate().map_err(ModelError::Request)?;
        let path = crate::fetch::resolve(&self.path, progress)?;
        let Some(modeled) = self.modeled()? else {
            return engine::load(&path, self.precision()?);
        };
        if self.kv_dtype()? != KvDType::BF16 {
            tracing::warn!(
                kv_dtype = %self.kv_dtype,
                "modeled compute assumes bf16 KV; with {} the stored KV is {}× the scaled size",
                self.kv_dtype,
                self.kv_dtype()?.bytes() / KvDType::BF16.bytes()
            );
        }
        let (tokenizer, real) = engine::load_tokenizer(&path)?;
        let model = Model::modeled(modeled, &real, &tokenizer.special_ids())?;
        Ok(LoadedModel { model, tokenizer, path })
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
        assert!(bad(|m| m.kv_scale = 100).contains("kv_scale"));
        assert!(bad(|m| m.compute = "simulated".into()).contains("compute"));
        assert!(bad(|m| m.modeled = "h100-llama3-8b".into()).contains("compute is \"real\""));
        let e = bad(|m| m.compute = "modeled".into());
        assert!(e.contains("needs model.modeled") && e.contains("h100-llama3-8b"), "{e}");
        let e = bad(|m| (m.compute, m.modeled) = ("modeled".into(), "a100-gpt4".into()));
        assert!(e.contains("unknown modeled profile"), "{e}");
        let e = bad(|m| (m.compute, m.modeled, m.kv_scale) = ("modeled".into(), "h100-llama3-8b".into(), 1024));
        assert!(e.contains("kv_scale") && e.contains("1 to 512"), "{e}");
    }

    #[test]
    fn modeled_sections_serve_the_profile_with_the_served_vocabulary() {
        let m: ModelSection =
            toml::from_str("compute = 'modeled'\nmodeled = '8xh100-llama3-70b'\nkv_dtype = 'bf16'\nkv_scale = 64\n")
                .unwrap();
        m.validate().unwrap();
        assert_eq!((m.path.as_str(), m.block_tokens), ("smollm2", 16), "the rest keeps its defaults");
        let served = crate::config::ModelConfig::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
                "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}"#,
        )
        .unwrap();
        let c = m.serving_config(&served).unwrap();
        assert_eq!((c.num_layers, c.max_position_embeddings, c.vocab_size), (80, 131072, 1000));
        assert_eq!((c.num_kv_heads, c.head_dim), (1, 16), "1024 KV elements / 64");
        assert_eq!(2 * c.num_layers * c.kv_dim() * 2, 320 * 1024 / 64, "bf16 bytes per token, scaled");
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
        assert_eq!(ModelSection::default().serving_config(&served).unwrap(), served, "real serves the real one");
    }
}
