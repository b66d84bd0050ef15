//! The model's weights as kernel-ready matrices, loaded from any
//! [`TensorSource`] (safetensors directory or GGUF file) without copying
//! the bulk of the data.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use tandem_kernels::WeightMatrix;

/// Where tensors come from. Names are the source's own; [`Naming`] maps
/// the model's parts onto them.
pub trait TensorSource {
    /// A 2-D tensor as `rows × cols` (rows = output features), checked
    /// against the expected shape.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix>;
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// How this source names tensors.
    fn naming(&self) -> Naming;
    /// A human-readable origin for error messages.
    fn describe(&self) -> String;
}

/// Tensor naming conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `model.layers.0.self_attn.q_proj.weight`, …
    HuggingFace,
    /// `blk.0.attn_q.weight`, …, with Q/K rows permuted for llama.cpp's
    /// interleaved RoPE (undone at load so one RoPE layout serves both).
    Gguf,
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Naming {
    fn name(self, part: Part, layer: usize) -> String {
        use Part::*;
        match self {
            Naming::HuggingFace => match part {
                Embed => "model.embed_tokens.weight".into(),
                FinalNorm => "model.norm.weight".into(),
                LmHead => "lm_head.weight".into(),
                AttnNorm => format!("model.layers.{layer}.input_layernorm.weight"),
                Q => format!("model.layers.{layer}.self_attn.q_proj.weight"),
                K => format!("model.layers.{layer}.self_attn.k_proj.weight"),
                V => format!("model.layers.{layer}.self_attn.v_proj.weight"),
                O => format!("model.layers.{layer}.self_attn.o_proj.weight"),
                QBias => format!("model.layers.{layer}.self_attn.q_proj.bias"),
                KBias => format!("model.layers.{layer}.self_attn.k_proj.bias"),
                VBias => format!("model.layers.{layer}.self_attn.v_proj.bias"),
                FfnNorm => format!("model.layers.{layer}.post_attention_layernorm.weight"),
                Gate => format!("model.layers.{layer}.mlp.gate_proj.weight"),
                Up => format!("model.layers.{layer}.mlp.up_proj.weight"),
                Down => format!("model.layers.{layer}.mlp.down_proj.weight"),
            },
            Naming::Gguf => match part {
                Embed => "token_embd.weight".into(),
                FinalNorm => "output_norm.weight".into(),
                LmHead => "output.weight".into(),
                AttnNorm => format!("blk.{layer}.attn_norm.weight"),
                Q => format!("blk.{layer}.attn_q.weight"),
                K => format!("blk.{layer}.attn_k.weight"),
                V => format!("blk.{layer}.attn_v.weight"),
                O => format!("blk.{layer}.attn_output.weight"),
                QBias => format!("blk.{layer}.attn_q.bias"),
                KBias => format!("blk.{layer}.attn_k.bias"),
                VBias => format!("blk.{layer}.attn_v.bias"),
                FfnNorm => format!("blk.{layer}.ffn_norm.weight"),
                Gate => format!("blk.{layer}.ffn_gate.weight"),
                Up => format!("blk.{layer}.ffn_up.weight"),
                Down => format!("blk.{layer}.ffn_down.weight"),
            },
        }
    }
}

/// One decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: WeightMatrix,
    pub wk: WeightMatrix,
    pub wv: WeightMatrix,
    pub wo: WeightMatrix,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: WeightMatrix,
    pub w_up: WeightMatrix,
    pub w_down: WeightMatrix,
}

/// All weights of a model.
#[derive(Debug)]
pub struct Weights {
    pub embed: WeightMatrix,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Vec<f32>,
    pub lm_head: WeightMatrix,
}

/// The row order that undoes GGUF's per-head permutation
/// (`reshape(n_head, 2, d/2, …).swapaxes(1, 2)` in llama.cpp's converter):
/// HF row `h·d + half·d/2 + i` is GGUF row `h·d + 2i + half`.
pub fn unpermute_order(n_head: usize, head_dim: usize) -> Vec<usize> {
    let half_dim = head_dim / 2;
    let mut order = Vec::with_capacity(n_head * head_dim);
    for h in 0..n_head {
        for half in 0..2 {
            for i in 0..half_dim {
                order.push(h * head_dim + 2 * i + half);
            }
        }
    }
    order
}

fn vector(src: &dyn TensorSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let m = src.matrix(name, 1, len)?;
    let mut out = vec![0f32; len];
    m.dequantize_row(0, &mut out);
    if let Some(bad) = out.iter().find(|v| !v.is_finite()) {
        return Err(ModelError::format(src.describe(), format!("{name} contains {bad}")));
    }
    Ok(out)
}

impl Weights {
    /// No weights at all: what a modeled model holds (`crate::modeled`),
    /// whose forward pass reads none.
    pub fn empty() -> Result<Self> {
        let none = WeightMatrix::from_f32(0, 0, &[])?;
        Ok(Self { embed: none.clone(), layers: Vec::new(), final_norm: Vec::new(), lm_head: none })
    }

    /// Loads every tensor the config calls for, checking shapes.
    pub fn load(config: &ModelConfig, src: &dyn TensorSource) -> Result<Self> {
        let naming = src.naming();
        let n = |part, layer| naming.name(part, layer);
        let (h, kv, q, ffn) = (config.hidden_size, config.kv_dim(), config.q_dim(), config.intermediate_size);
        let embed = src.matrix(&n(Part::Embed, 0), config.vocab_size, h)?;
        let lm_head = if src.contains(&n(Part::LmHead, 0)) {
            src.matrix(&n(Part::LmHead, 0), config.vocab_size, h)?
        } else if config.tie_word_embeddings || naming == Naming::Gguf {
            // GGUF omits `output.weight` exactly when embeddings are tied.
            embed.clone()
        } else {
            return Err(ModelError::format(src.describe(), "lm_head.weight is missing and embeddings are not tied"));
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let mut wq = src.matrix(&n(Part::Q, l), q, h)?;
            let mut wk = src.matrix(&n(Part::K, l), kv, h)?;
            if naming == Naming::Gguf {
                wq = wq.gather_rows(&unpermute_order(config.num_heads, config.head_dim))?;
                wk = wk.gather_rows(&unpermute_order(config.num_kv_heads, config.head_dim))?;
            }
            let bias = |part, len| -> Result<Option<Vec<f32>>> {
                let name = n(part, l);
                if config.attention_bias || src.contains(&name) {
                    vector(src, &name, len).map(Some)
                } else {
                    Ok(None)
                }
            };
            let mut bq = bias(Part::QBias, q)?;
            let mut bk = bias(Part::KBias, kv)?;
            if naming == Naming::Gguf {
                let permute =
                    |b: Vec<f32>, heads| unpermute_order(heads, config.head_dim).iter().map(|&i| b[i]).collect();
                bq = bq.map(|b| permute(b, config.num_heads));
                bk = bk.map(|b| permute(b, config.num_kv_heads));
            }
            layers.push(LayerWeights {
                attn_norm: vector(src, &n(Part::AttnNorm, l), h)?,
                wq,
                wk,
                wv: src.matrix(&n(Part::V, l), kv, h)?,
                wo: src.matrix(&n(Part::O, l), h, q)?,
                bq,
                bk,
                bv: bias(Part::VBias, kv)?,
                ffn_norm: vector(src, &n(Part::FfnNorm, l), h)?,
                w_gate: src.matrix(&n(Part::Gate, l), ffn, h)?,
                w_up: src.matrix(&n(Part::Up, l), ffn, h)?,
                w_down: src.matrix(&n(Part::Down, l), h, ffn)?,
            });
        }
        Ok(Self { embed, layers, final_norm: vector(src, &n(Part::FinalNorm, 0), h)?, lm_head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_the_gguf_converter_permutation() {
        // The converter: reshape(n_head, 2, d/2).swapaxes(1, 2) on HF rows.
        let (n_head, d) = (3, 8);
        let hf: Vec<usize> = (0..n_head * d).collect();
        let mut gguf = vec![0; hf.len()];
        for h in 0..n_head {
            for half in 0..2 {
                for i in 0..d / 2 {
                    gguf[h * d + i * 2 + half] = hf[h * d + half * d / 2 + i];
                }
            }
        }
        let back: Vec<usize> = unpermute_order(n_head, d).iter().map(|&r| gguf[r]).collect();
        assert_eq!(back, hf);
    }
}
