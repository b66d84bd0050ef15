//! The forward pass of a Llama-family decoder over a paged KV cache.
//!
//! One call runs a batch of sequence steps: each step appends some tokens
//! to one sequence (a prefill chunk, or one decode token) and attends to
//! everything that sequence has cached plus its own new tokens, causally.
//! Every token row is computed independently of the others in the batch
//! (matmuls and attention are batch-invariant), so chunking, batching and
//! page placement never change a result.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvPool, SeqKv};
use crate::modeled::Modeled;
use crate::weights::{LayerWeights, Weights};
use std::sync::Arc;
use std::time::Instant;
use tandem_kernels::attention::{attend_batch, BatchArgs, BatchRow, KvGeometry};
use tandem_kernels::ops::{apply_rope, rms_norm_rows, silu_mul};
use tandem_kernels::{matmul, Precision};

/// Which logits a step wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The last token's (sampling the next token).
    Last,
    /// Every new token's (scoring, tests).
    All,
}

/// Tokens to append to one sequence.
#[derive(Debug)]
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub seq: &'a mut SeqKv,
    pub logits: Logits,
}

/// A loaded model, ready to run: real weights, or a modeled backend
/// ([`Model::modeled`]) that costs what a named accelerator would take and
/// has no weights.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    weights: Weights,
    inv_freq: Vec<f32>,
    precision: Precision,
    modeled: Option<Arc<Modeled>>,
}

/// RoPE inverse frequencies as Hugging Face computes them, with Llama-3
/// scaling when configured.
pub fn rope_inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    let base = config.rope.theta as f64;
    let mut inv: Vec<f32> = (0..d / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / d as f64)) as f32).collect();
    if let Some(s) = config.rope.llama3_scaling {
        let old = s.original_max_position_embeddings as f32;
        let low_wavelen = old / s.low_freq_factor;
        let high_wavelen = old / s.high_freq_factor;
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= s.factor;
            } else if wavelen >= high_wavelen {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
            }
        }
    }
    inv
}

/// Scratch buffers of one forward call, `rows` token rows.
struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl Model {
    pub fn new(config: ModelConfig, weights: Weights, precision: Precision) -> Self {
        let inv_freq = rope_inv_freq(&config);
        Self { config, weights, inv_freq, precision, modeled: None }
    }

    /// A modeled model (DESIGN.md §6, [`crate::modeled`]): no weights; it
    /// serves the configuration [`Modeled::config`] derives from `served`
    /// (the real model whose tokenizer the workers use), and never picks
    /// `reserved` token ids (the tokenizer's special tokens) as the next
    /// token.
    pub fn modeled(mut modeled: Modeled, served: &ModelConfig, reserved: &[u32]) -> Result<Self> {
        let config = modeled.config(served)?;
        modeled.reserve_tokens(reserved, config.vocab_size)?;
        let inv_freq = rope_inv_freq(&config);
        Ok(Self {
            config,
            weights: Weights::empty()?,
            inv_freq,
            precision: Precision::Fast,
            modeled: Some(Arc::new(modeled)),
        })
    }

    /// Whether the forward pass is modeled rather than computed.
    pub fn is_modeled(&self) -> bool {
        self.modeled.is_some()
    }

    /// The modeled backend, if this model is modeled.
    pub fn modeled_backend(&self) -> Option<&Modeled> {
        self.modeled.as_deref()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// The KV geometry of this model for a page size.
    pub fn kv_geometry(&self, page_tokens: usize) -> KvGeometry {
        KvGeometry {
            page_tokens,
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// A fingerprint of the weights and numerics: the same file loaded with
    /// the same precision gives the same string in every process, so KV
    /// blocks keyed with it (see `tandem_proto::KeySalt`) are
    /// interchangeable, and different models never share keys.
    pub fn fingerprint(&self) -> String {
        use std::hash::Hasher as _;
        let mut h = twox_hash::XxHash3_64::new();
        h.write(format!("{:?}|{:?}", self.config, self.precision).as_bytes());
        if let Some(m) = &self.modeled {
            // No weights to hash; the profile, the scale and the served
            // configuration (vocabulary, scaled geometry) identify it.
            let name = m.profile().name;
            return format!("modeled-{name}-kv{}-{:016x}", m.kv_scale(), h.finish());
        }
        let mut row = vec![0.0f32; self.config.hidden_size];
        for t in [0, 1, self.config.vocab_size / 2, self.config.vocab_size - 1] {
            self.weights.embed.dequantize_row(t, &mut row);
            h.write(bytemuck::cast_slice(&row));
        }
        format!("{:016x}", h.finish())
    }

    /// Runs `steps`, appending their tokens to their sequences' KV, and
    /// returns, per step, the logits it asked for (`vocab` floats per row).
    pub fn forward(&self, cache: &mut KvCache, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_observed(cache, steps, &mut |_, _| {})
    }

    /// [`Model::forward`], calling `after_layer(l, cache)` when layer `l`
    /// is done (every new token's K and V of layer `l` are in the cache),
    /// before layer `l + 1` computes: a prefill worker copies those layer
    /// ranges out to the store while the next layer runs. (The sequences'
    /// lengths are updated only at the end of the call.)
    pub fn forward_observed(
        &self,
        cache: &mut KvCache,
        steps: &mut [Step<'_>],
        after_layer: &mut dyn FnMut(usize, &KvCache),
    ) -> Result<Vec<Vec<f32>>> {
        let started = Instant::now();
        let c = &self.config;
        if *cache.geometry() != self.kv_geometry(cache.geometry().page_tokens) {
            return Err(ModelError::Request("KV cache geometry does not match the model".into()));
        }
        // Validate everything before touching any state.
        for step in steps.iter() {
            if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::Request(format!(
                    "token id {bad} is outside the vocabulary (size {})",
                    c.vocab_size
                )));
            }
            let end = step.seq.len() + step.tokens.len();
            if end > c.max_position_embeddings {
                return Err(ModelError::Request(format!(
                    "sequence of {end} tokens exceeds the model's context length {}",
                    c.max_position_embeddings
                )));
            }
            if !step.tokens.is_empty()
                && !cache.is_writable(step.seq, step.seq.len())
                && step.seq.len() % cache.geometry().page_tokens != 0
            {
                return Err(ModelError::Request("sequence would write into a shared KV page".into()));
            }
        }
        for step in steps.iter_mut() {
            let end = step.seq.len() + step.tokens.len();
            cache.reserve(step.seq, end)?;
        }
        if let Some(m) = &self.modeled {
            return Ok(m.forward(c, cache, steps, after_layer, started));
        }

        // Row r of every buffer is one new token: (step, absolute position).
        let rows: Vec<(usize, usize)> = steps
            .iter()
            .enumerate()
            .flat_map(|(s, st)| (0..st.tokens.len()).map(move |i| (s, st.seq.len() + i)))
            .collect();
        let n = rows.len();
        let mut b = Buffers {
            x: vec![0.0; n * c.hidden_size],
            h: vec![0.0; n * c.hidden_size],
            q: vec![0.0; n * c.q_dim()],
            k: vec![0.0; n * c.kv_dim()],
            v: vec![0.0; n * c.kv_dim()],
            attn: vec![0.0; n * c.q_dim()],
            o: vec![0.0; n * c.hidden_size],
            gate: vec![0.0; n * c.intermediate_size],
            up: vec![0.0; n * c.intermediate_size],
        };
        let tokens: Vec<u32> = steps.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        for (row, &t) in b.x.chunks_exact_mut(c.hidden_size).zip(&tokens) {
            self.weights.embed.dequantize_row(t as usize, row);
        }
        let (cos, sin) = self.rope_tables(&rows);

        for (l, layer) in self.weights.layers.iter().enumerate() {
            // Each layer runs as one job on the kernel pool: its parallel
            // kernels then fork from a pool thread instead of each handing
            // its work over from this thread and waiting to be woken (a few
            // microseconds apiece, eight products and an attention per
            // layer). The observer stays on the caller's thread.
            let steps = &*steps;
            rayon::scope(|_| {
                self.attention_block(l, layer, cache, steps, &rows, &cos, &sin, &mut b);
                self.mlp_block(layer, n, &mut b);
            });
            after_layer(l, cache);
        }

        // Logits for the rows that want them, through the LM head in one
        // product (a batch of 16 decode steps would otherwise stream the
        // 49152-row head 16 times); rows are independent in the kernels, so
        // each step's logits are the same bits as alone.
        let (mut picked, mut counts) = (Vec::new(), Vec::with_capacity(steps.len()));
        let mut row = 0;
        for step in steps.iter_mut() {
            let len = step.tokens.len();
            let pick = match step.logits {
                Logits::None => 0..0,
                Logits::Last => len.saturating_sub(1)..len,
                Logits::All => 0..len,
            };
            picked.extend_from_slice(&b.x[(row + pick.start) * c.hidden_size..(row + pick.end) * c.hidden_size]);
            counts.push(pick.len());
            let new_len = step.seq.len() + len;
            cache.set_len(step.seq, new_len);
            row += len;
        }
        let mut all = self.logits(&picked);
        let mut out: Vec<Vec<f32>> = Vec::with_capacity(steps.len());
        for &rows in counts.iter().rev() {
            out.push(all.split_off(all.len() - rows * c.vocab_size));
        }
        out.reverse();
        Ok(out)
    }

    /// Final norm and LM head over `x` (rows of `hidden_size`).
    fn logits(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.config;
        let m = x.len() / c.hidden_size;
        if m == 0 {
            return Vec::new();
        }
        let mut h = vec![0.0; x.len()];
        rms_norm_rows(x, &self.weights.final_norm, c.rms_norm_eps, &mut h);
        let mut logits = vec![0.0; m * c.vocab_size];
        matmul(&self.weights.lm_head, &h, m, &mut logits, self.precision);
        logits
    }

    fn rope_tables(&self, rows: &[(usize, usize)]) -> (Vec<f32>, Vec<f32>) {
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(rows.len() * half);
        let mut sin = Vec::with_capacity(rows.len() * half);
        for &(_, pos) in rows {
            for &f in &self.inv_freq {
                // As transformers: the angle is an f32 product, its cosine
                // and sine rounded to f32.
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        l: usize,
        w: &LayerWeights,
        cache: &mut KvCache,
        steps: &[Step<'_>],
        rows: &[(usize, usize)],
        cos: &[f32],
        sin: &[f32],
        b: &mut Buffers,
    ) {
        let c = &self.config;
        let (n, d, half) = (rows.len(), c.head_dim, c.head_dim / 2);
        rms_norm_rows(&b.x, &w.attn_norm, c.rms_norm_eps, &mut b.h);
        matmul(&w.wq, &b.h, n, &mut b.q, self.precision);
        matmul(&w.wk, &b.h, n, &mut b.k, self.precision);
        matmul(&w.wv, &b.h, n, &mut b.v, self.precision);
        for (buf, bias) in [(&mut b.q, &w.bq), (&mut b.k, &w.bk), (&mut b.v, &w.bv)] {
            if let Some(bias) = bias {
                for row in buf.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
            }
        }
        for r in 0..n {
            let (cs, sn) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
            apply_rope(&mut b.q[r * c.q_dim()..(r + 1) * c.q_dim()], d, cs, sn);
            apply_rope(&mut b.k[r * c.kv_dim()..(r + 1) * c.kv_dim()], d, cs, sn);
        }
        for (r, &(s, pos)) in rows.iter().enumerate() {
            let kv = r * c.kv_dim()..(r + 1) * c.kv_dim();
            cache.write(steps[s].seq, l, pos, &b.k[kv.clone()], &b.v[kv]);
        }
        // Each row attends causally to its sequence up to itself; the kernel
        // splits long rows over the pool with fixed chunk boundaries, so a
        // row's result is the same whatever else is in the batch.
        let attend_rows: Vec<BatchRow<'_>> = rows
            .iter()
            .map(|&(s, pos)| BatchRow { block_table: steps[s].seq.block_table(), context_len: pos + 1 })
            .collect();
        let args =
            BatchArgs { geometry: *cache.geometry(), layer: l, scale: 1.0 / (d as f32).sqrt(), rows: &attend_rows };
        match cache.pool() {
            KvPool::F32(p) => attend_batch(&b.q, p, &args, &mut b.attn),
            KvPool::BF16(p) => attend_batch(&b.q, p, &args, &mut b.attn),
        }
        matmul(&w.wo, &b.attn, n, &mut b.o, self.precision);
        b.x.iter_mut().zip(&b.o).for_each(|(x, o)| *x += o);
    }

    fn mlp_block(&self, w: &LayerWeights, n: usize, b: &mut Buffers) {
        let c = &self.config;
        rms_norm_rows(&b.x, &w.ffn_norm, c.rms_norm_eps, &mut b.h);
        matmul(&w.w_gate, &b.h, n, &mut b.gate, self.precision);
        matmul(&w.w_up, &b.h, n, &mut b.up, self.precision);
        silu_mul(&mut b.gate, &b.up);
        matmul(&w.w_down, &b.gate, n, &mut b.o, self.precision);
        b.x.iter_mut().zip(&b.o).for_each(|(x, o)| *x += o);
    }
}
