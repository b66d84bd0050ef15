//! [`ModelConfig`] from GGUF metadata (`general.architecture` = `llama`).

use super::GgufFile;
use crate::config::{Architecture, ModelConfig, RopeConfig};
use crate::error::{ModelError, Result};

impl GgufFile {
    /// The model's hyper-parameters, validated.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        if arch != "llama" {
            // Other families store Q/K unpermuted or need other metadata;
            // treating them as llama would load silently wrong weights.
            return Err(ModelError::Unsupported(format!("GGUF architecture '{arch}' (only 'llama' is implemented)")));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let need = |k: &str| -> Result<usize> {
            self.get_usize(&key(k))?.ok_or_else(|| self.format_err(format!("metadata '{}' is missing", key(k))))
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        if num_heads == 0 {
            return Err(self.format_err(format!("{} is 0", key("attention.head_count"))));
        }
        if let Some(kind) = self.get_str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(ModelError::Unsupported(format!("GGUF rope scaling type '{kind}'")));
            }
        }
        if self.contains_tensor("rope_freqs.weight") {
            return Err(ModelError::Unsupported(
                "GGUF rope frequency factors (rope_freqs.weight, Llama-3.1 style scaling)".into(),
            ));
        }
        // `attention.key_length` is the head size; `rope.dimension_count` is
        // the rotated part, equal to it in every llama model we run.
        let head_dim = match self.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => self.get_usize(&key("rope.dimension_count"))?.unwrap_or(hidden_size / num_heads),
        };
        if let Some(rot) = self.get_usize(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(ModelError::Unsupported(format!("partial RoPE ({rot} of {head_dim} dimensions)")));
            }
        }
        let vocab_size = match self.get_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => self.get_array("tokenizer.ggml.tokens")?.map(|a| a.len()).ok_or_else(|| {
                self.format_err(format!("neither '{}' nor tokenizer.ggml.tokens is present", key("vocab_size")))
            })?,
        };
        let rms_norm_eps = self.get_f64(&key("attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            self.format_err(format!("metadata '{}' is missing", key("attention.layer_norm_rms_epsilon")))
        })?;
        let mut eos_token_ids: Vec<u32> = self.get_u32("tokenizer.ggml.eos_token_id")?.into_iter().collect();
        if let Some(eot) = self.get_u32("tokenizer.ggml.eot_token_id")? {
            if !eos_token_ids.contains(&eot) {
                eos_token_ids.push(eot);
            }
        }
        let config = ModelConfig {
            architecture: Architecture::Llama,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads: self.get_usize(&key("attention.head_count_kv"))?.unwrap_or(num_heads),
            head_dim,
            vocab_size,
            rms_norm_eps: rms_norm_eps as f32,
            rope: RopeConfig {
                theta: self.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
                llama3_scaling: None,
            },
            max_position_embeddings: need("context_length")?,
            tie_word_embeddings: !self.contains_tensor("output.weight"),
            attention_bias: self.contains_tensor("blk.0.attn_q.bias"),
            bos_token_id: self.get_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensor(name).is_some()
    }
}
