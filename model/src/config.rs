//! The model's shape and hyper-parameters, parsed from a Hugging Face
//! `config.json` (both the classic `rope_theta`/`rope_scaling`/`torch_dtype`
//! spelling and the transformers-5 `rope_parameters`/`dtype` one) or built
//! from GGUF metadata, and validated once.

use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// Model families with a Llama-shaped decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Llama plus biases on the q/k/v projections.
    Qwen2,
}

/// Llama-3 style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    pub llama3_scaling: Option<Llama3RopeScaling>,
}

/// Everything the forward pass needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Upper bounds that reject absurd configs before any allocation.
const MAX_DIM: usize = 1 << 17;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;
const MAX_POSITIONS: usize = 1 << 24;

impl ModelConfig {
    /// Parses a `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_hf_json(&text).map_err(|e| match e {
            ModelError::Config(reason) => ModelError::format(path, reason),
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        raw.into_config()
    }

    /// Checks that the shapes are consistent and within sane bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        for (name, v, max) in [
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("intermediate_size", self.intermediate_size, MAX_DIM * 4),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_DIM),
            ("num_key_value_heads", self.num_kv_heads, MAX_DIM),
            ("head_dim", self.head_dim, MAX_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is out of range 1..={max}"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!("rms_norm_eps = {} is not in (0, 1)", self.rms_norm_eps));
        }
        if !(self.rope.theta.is_finite() && self.rope.theta > 1.0) {
            return bad(format!("rope_theta = {} must be a finite number > 1", self.rope.theta));
        }
        if let Some(s) = self.rope.llama3_scaling {
            let ok = s.factor.is_finite()
                && s.factor >= 1.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !ok {
                return bad(format!("llama3 rope_scaling {s:?} is inconsistent"));
            }
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return bad(format!("special token id {id} is outside the vocabulary ({})", self.vocab_size));
            }
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Floats of K (or V) per token per layer.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Floats of a query per token.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
}

/// `config.json` as written by transformers 4 or 5 (only the fields we use;
/// everything else is ignored, as transformers itself does).
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
}

fn token_ids(v: &Option<serde_json::Value>, name: &str) -> Result<Vec<u32>> {
    let as_id = |x: &serde_json::Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ModelError::Config(format!("{name}: {x} is not a token id")))
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(vec![]),
        Some(serde_json::Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn rope_from_json(theta: Option<f64>, scaling: Option<&serde_json::Value>) -> Result<RopeConfig> {
    let theta = theta.unwrap_or(10_000.0) as f32;
    let Some(s) = scaling.filter(|s| !s.is_null()) else {
        return Ok(RopeConfig { theta, llama3_scaling: None });
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ModelError::Config(format!("rope scaling '{kind}' needs a numeric '{key}'")))
    };
    match kind {
        "default" => Ok(RopeConfig { theta, llama3_scaling: None }),
        "llama3" => Ok(RopeConfig {
            theta,
            llama3_scaling: Some(Llama3RopeScaling {
                factor: num("factor")? as f32,
                low_freq_factor: num("low_freq_factor")? as f32,
                high_freq_factor: num("high_freq_factor")? as f32,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }),
        }),
        other => Err(ModelError::Unsupported(format!("rope scaling type '{other}'"))),
    }
}

impl HfConfig {
    fn into_config(self) -> Result<ModelConfig> {
        let kind = self
            .model_type
            .clone()
            .or_else(|| self.architectures.first().cloned())
            .ok_or_else(|| ModelError::Config("neither model_type nor architectures is set".into()))?;
        let architecture = match kind.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Architecture::Llama,
            "mistral" | "mistralforcausallm" => Architecture::Mistral,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            other => return Err(ModelError::Unsupported(format!("model type '{other}'"))),
        };
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| ModelError::Config(format!("config.json is missing '{name}'")))
        };
        let hidden_size = need(self.hidden_size, "hidden_size")?;
        let num_heads = need(self.num_attention_heads, "num_attention_heads")?;
        if num_heads == 0 {
            return Err(ModelError::Config("num_attention_heads = 0".into()));
        }
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_heads);
        // transformers 5 folds theta and scaling into `rope_parameters`.
        let (theta, scaling) = match &self.rope_parameters {
            Some(p) if !p.is_null() => (p.get("rope_theta").and_then(|t| t.as_f64()).or(self.rope_theta), Some(p)),
            _ => (self.rope_theta, self.rope_scaling.as_ref()),
        };
        let rope = rope_from_json(theta, scaling)?;
        let sliding = self.use_sliding_window.unwrap_or(architecture == Architecture::Mistral)
            && self.sliding_window.as_ref().is_some_and(|w| !w.is_null());
        let max_position_embeddings = self.max_position_embeddings.unwrap_or(4096);
        if sliding {
            let w = self.sliding_window.as_ref().and_then(|w| w.as_u64()).unwrap_or(0) as usize;
            if w < max_position_embeddings {
                return Err(ModelError::Unsupported(format!(
                    "sliding-window attention (window {w} < context {max_position_embeddings})"
                )));
            }
        }
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need(self.intermediate_size, "intermediate_size")?,
            num_layers: need(self.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            vocab_size: need(self.vocab_size, "vocab_size")?,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6) as f32,
            rope,
            max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
            bos_token_id: token_ids(&self.bos_token_id, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id, "eos_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]
    }"#;

    #[test]
    fn parses_llama3_classic_spelling() {
        let c = ModelConfig::from_hf_json(LLAMA3).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.group_size(), 4);
        assert_eq!(c.rope.theta, 500000.0);
        let s = c.rope.llama3_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (32.0, 8192));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn parses_transformers5_spelling() {
        let text = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
            "vocab_size": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
            "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"},
            "bos_token_id": 1, "eos_token_id": 2}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.rope.theta, 12345.0);
        assert_eq!(c.rope.llama3_scaling, None);
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.bos_token_id, Some(1));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_explicit_head_dim() {
        let text = r#"{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "head_dim": 64, "vocab_size": 151936, "rope_theta": 1000000.0,
            "sliding_window": 32768, "use_sliding_window": false, "tie_word_embeddings": true,
            "max_position_embeddings": 32768, "eos_token_id": 151645}"#;
        let c = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert!(c.attention_bias);
        assert_eq!(c.head_dim, 64);
    }

    #[test]
    fn rejects_missing_and_absurd_fields() {
        let missing = r#"{"model_type": "llama", "hidden_size": 256}"#;
        let e = ModelConfig::from_hf_json(missing).unwrap_err().to_string();
        assert!(e.contains("missing 'num_attention_heads'"), "{e}");

        for (field, value, expect) in [
            ("num_key_value_heads", "3", "not a multiple"),
            ("num_hidden_layers", "0", "num_hidden_layers = 0"),
            ("hidden_size", "99999999999", "out of range"),
            ("rms_norm_eps", "-1.0", "rms_norm_eps"),
            ("eos_token_id", "5000", "outside the vocabulary"),
            ("rope_theta", "0.5", "rope_theta"),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(LLAMA3).unwrap();
            v["vocab_size"] = 4096.into();
            v["eos_token_id"] = 2.into();
            v["bos_token_id"] = 1.into();
            v[field] = serde_json::from_str(value).unwrap();
            let e = ModelConfig::from_hf_json(&v.to_string()).unwrap_err().to_string();
            assert!(e.contains(expect), "{field}={value}: {e}");
        }
        assert!(ModelConfig::from_hf_json("{not json").is_err());
        assert!(ModelConfig::from_hf_json(r#"{"model_type": "gpt2"}"#)
            .unwrap_err()
            .to_string()
            .contains("unsupported"));
    }
}
