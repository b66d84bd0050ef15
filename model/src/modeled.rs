//! Modeled compute (DESIGN.md §6): a forward pass that costs what a named
//! accelerator serving a named model would take, by a roofline over
//! published figures, while real KV bytes of the modeled size (divided by
//! `kv_scale`, so a trace of 190k-token prompts fits in RAM) move through
//! the real cache, store and transports.
//!
//! Selected only by the cluster file (`[model] compute = "modeled"`); the
//! real forward pass is never replaced otherwise. docs/modeled-compute.md
//! explains the formulas and shows [`roofline_table`].
//!
//! The cost of one forward pass over sequences that each append `new`
//! tokens after `past` cached ones, on `n` GPUs in tensor parallel:
//!
//! ```text
//! FLOPs   = 2·params·Σnew + 4·layers·(heads·head_dim)·Σ new·(past + new/2)
//! bytes   = 2·params + kv_bytes·Σ(past + new) + kv_bytes·Σnew
//! comm    = 2·layers·(ALLREDUCE_LATENCY + 2(n−1)/n · Σnew·hidden·2 / link)   (n > 1)
//! time    = max(FLOPs / (n·peak·MFU), bytes / (n·hbm·BW_EFFICIENCY)) + comm + OVERHEAD
//! ```

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::forward::{Logits, Step};
use crate::kv_cache::KvCache;
use crate::sampling::mix64;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Share of peak dense BF16 FLOP/s a large prefill GEMM sustains. An
/// assumption of this model, not a measurement: it sits in the 40–60 %
/// model-FLOPs utilisation that tuned serving engines are commonly reported
/// to reach on H100 prefill, and only matters when a pass is compute-bound
/// (prefill chunks of hundreds of tokens or more).
pub const MFU: f64 = 0.5;
/// Share of peak HBM bandwidth a weight/KV stream sustains. An assumption:
/// memory-bound kernels on H100 typically reach 70–80 % of the datasheet
/// bandwidth. It sets decode step times (memory-bound).
pub const BW_EFFICIENCY: f64 = 0.75;
/// Fixed cost of one forward pass: kernel launches, the engine's scheduling
/// and sampling. An assumption (no published figure), of the order of a
/// CUDA-graph-launched step's host overhead.
pub const OVERHEAD: Duration = Duration::from_micros(500);
/// Latency of one small all-reduce over NVLink (the α of the α-β model).
/// An assumption of the order of NCCL's small-message latency within one
/// NVSwitch node; it dominates tensor-parallel communication in decode.
pub const ALLREDUCE_LATENCY: Duration = Duration::from_micros(10);
/// Bytes of a weight or a K/V element: BF16 weights and KV, as the
/// published checkpoints and serving engines use them.
const ELEM_BYTES: f64 = 2.0;
/// Token ids below this are never chosen as a modeled next token (byte
/// and special tokens of common tokenizers live there).
pub const FIRST_PICKED_TOKEN: usize = 256;
/// The logit of every token but the chosen one: low enough that any
/// sampler with a temperature up to 10⁶ gives them no mass, finite so that
/// log-probabilities stay numbers.
pub const OTHER_LOGIT: f32 = -1e9;

/// An accelerator deployment serving one model: the published figures the
/// roofline reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub hardware: &'static str,
    pub model: &'static str,
    /// GPUs, all in one tensor-parallel group.
    pub gpus: u32,
    /// Dense BF16 FLOP/s of one GPU.
    pub peak_flops: f64,
    /// HBM bytes/s of one GPU.
    pub hbm_bytes_per_s: f64,
    /// Bytes/s one GPU sends (and receives at the same time) over its links.
    pub link_bytes_per_s: f64,
    pub params: f64,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The modeled model's own vocabulary (the served one is the
    /// tokenizer's, see [`Modeled::config`]).
    pub vocab_size: usize,
    pub context: usize,
}

/// One H100-SXM5-80GB: 989 TFLOP/s dense BF16 and 3.35 TB/s HBM3 (NVIDIA
/// H100 Tensor Core GPU datasheet; 1,979 TFLOP/s is the sparse figure);
/// NVLink 4 at 900 GB/s per GPU in both directions together, 450 GB/s each
/// way (same datasheet).
const H100_FLOPS: f64 = 989e12;
const H100_HBM: f64 = 3.35e12;
const H100_NVLINK_ONE_WAY: f64 = 450e9;

/// The profiles a cluster file may name in `[model] modeled`.
///
/// Llama-3-8B: 8.03e9 parameters, 32 layers, hidden 4096, FFN 14336, 32
/// query heads, 8 KV heads of 128, vocabulary 128256; Llama-3-70B: 70.6e9
/// parameters, 80 layers, hidden 8192, FFN 28672, 64 query heads, 8 KV
/// heads of 128 (Meta's model cards and `config.json`s). Context 131072 is
/// Llama 3.1's.
pub static PROFILES: [Profile; 2] = [
    Profile {
        name: "h100-llama3-8b",
        hardware: "1× H100-SXM5-80GB",
        model: "Llama-3-8B",
        gpus: 1,
        peak_flops: H100_FLOPS,
        hbm_bytes_per_s: H100_HBM,
        link_bytes_per_s: H100_NVLINK_ONE_WAY,
        params: 8.03e9,
        num_layers: 32,
        hidden_size: 4096,
        intermediate_size: 14336,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128256,
        context: 131072,
    },
    Profile {
        name: "8xh100-llama3-70b",
        hardware: "8× H100-SXM5-80GB, tensor parallel 8 over NVLink",
        model: "Llama-3-70B",
        gpus: 8,
        peak_flops: H100_FLOPS,
        hbm_bytes_per_s: H100_HBM,
        link_bytes_per_s: H100_NVLINK_ONE_WAY,
        params: 70.6e9,
        num_layers: 80,
        hidden_size: 8192,
        intermediate_size: 28672,
        num_heads: 64,
        num_kv_heads: 8,
        head_dim: 128,
        vocab_size: 128256,
        context: 131072,
    },
];

/// The profile named `name`.
pub fn profile(name: &str) -> Result<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = PROFILES.iter().map(|p| p.name).collect();
        ModelError::Config(format!("unknown modeled profile '{name}' (known: {})", known.join(", ")))
    })
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqWork {
    /// Tokens already in its KV cache.
    pub past: usize,
    /// Tokens this pass appends.
    pub new: usize,
}

impl Profile {
    /// K and V bytes of one token, all layers (BF16).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * ELEM_BYTES as usize
    }

    /// Floating-point operations of a pass: the weight GEMMs (2 per
    /// parameter per token) plus attention (QKᵀ and PV, 2 FLOPs per
    /// multiply-add each, causal within the new tokens).
    pub fn flops(&self, work: &[SeqWork]) -> f64 {
        let new: f64 = work.iter().map(|w| w.new as f64).sum();
        let attended: f64 = work.iter().map(|w| w.new as f64 * (w.past as f64 + w.new as f64 / 2.0)).sum();
        2.0 * self.params * new + 4.0 * self.num_layers as f64 * (self.num_heads * self.head_dim) as f64 * attended
    }

    /// HBM bytes a pass moves: every weight once, the KV it attends to,
    /// and the KV it writes.
    pub fn bytes(&self, work: &[SeqWork]) -> f64 {
        let kv = self.kv_bytes_per_token() as f64;
        let read: f64 = work.iter().map(|w| (w.past + w.new) as f64).sum();
        let written: f64 = work.iter().map(|w| w.new as f64).sum();
        ELEM_BYTES * self.params + kv * read + kv * written
    }

    /// Tensor-parallel communication of a pass: two all-reduces per layer
    /// (after attention and after the MLP) of every new token's hidden
    /// state, each a ring all-reduce: `2(n−1)/n · bytes / link` plus
    /// [`ALLREDUCE_LATENCY`]. Zero on one GPU.
    pub fn comm_seconds(&self, work: &[SeqWork]) -> f64 {
        if self.gpus <= 1 {
            return 0.0;
        }
        let n = self.gpus as f64;
        let tokens: f64 = work.iter().map(|w| w.new as f64).sum();
        let bytes = tokens * self.hidden_size as f64 * ELEM_BYTES;
        let one = ALLREDUCE_LATENCY.as_secs_f64() + 2.0 * (n - 1.0) / n * bytes / self.link_bytes_per_s;
        2.0 * self.num_layers as f64 * one
    }

    /// The modeled time of a pass (zero when it appends no token).
    pub fn forward_time(&self, work: &[SeqWork]) -> Duration {
        if work.iter().all(|w| w.new == 0) {
            return Duration::ZERO;
        }
        let n = self.gpus as f64;
        let compute = self.flops(work) / (n * self.peak_flops * MFU);
        let memory = self.bytes(work) / (n * self.hbm_bytes_per_s * BW_EFFICIENCY);
        Duration::from_secs_f64(compute.max(memory) + self.comm_seconds(work)) + OVERHEAD
    }

    /// One line for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} serving {}: {:.0} TFLOP/s and {:.2} TB/s per GPU, MFU {MFU}, bandwidth efficiency {BW_EFFICIENCY}, \
             {} µs per pass)",
            self.name,
            self.hardware,
            self.model,
            self.peak_flops / 1e12,
            self.hbm_bytes_per_s / 1e12,
            OVERHEAD.as_micros(),
        )
    }
}

/// A modeled backend: a profile and the factor its KV is shrunk by.
#[derive(Debug, Clone, PartialEq)]
pub struct Modeled {
    profile: &'static Profile,
    kv_scale: u32,
    /// Token ids never chosen (the tokenizer's special tokens), sorted.
    reserved: Vec<u32>,
}

impl Modeled {
    /// The profile `name` with KV bytes divided by `kv_scale`, a power of
    /// two small enough that a token's K (or V) of one layer keeps at
    /// least 2 elements.
    pub fn new(name: &str, kv_scale: u32) -> Result<Self> {
        let profile = profile(name)?;
        let m = Self { profile, kv_scale, reserved: Vec::new() };
        m.scaled_head_dim()?;
        Ok(m)
    }

    pub fn profile(&self) -> &'static Profile {
        self.profile
    }
    pub fn kv_scale(&self) -> u32 {
        self.kv_scale
    }

    /// The scaled KV geometry keeps every layer but one KV head of
    /// `num_kv_heads·head_dim / kv_scale` elements, so a token's KV is the
    /// real one's bytes divided by `kv_scale` (in BF16, as the profile).
    fn scaled_head_dim(&self) -> Result<usize> {
        let width = self.profile.num_kv_heads * self.profile.head_dim;
        let max = width / 2;
        if self.kv_scale == 0 || !self.kv_scale.is_power_of_two() || self.kv_scale as usize > max {
            return Err(ModelError::Config(format!(
                "kv_scale = {} for {}: it must be a power of two from 1 to {max} (one layer's K of a token, \
                 {width} elements, must keep at least 2)",
                self.kv_scale, self.profile.name
            )));
        }
        Ok(width / self.kv_scale as usize)
    }

    /// KV bytes per token as stored here (BF16): the real ones / `kv_scale`.
    pub fn scaled_kv_bytes_per_token(&self) -> usize {
        self.profile.kv_bytes_per_token() / self.kv_scale as usize
    }

    /// The configuration a modeled worker serves: the profile's layers,
    /// width and context with the scaled KV geometry, and the served
    /// tokenizer's vocabulary, special tokens and RoPE from `served` (the
    /// real model the `[model] path` names).
    pub fn config(&self, served: &ModelConfig) -> Result<ModelConfig> {
        let p = self.profile;
        let config = ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: p.hidden_size,
            intermediate_size: p.intermediate_size,
            num_layers: p.num_layers,
            num_heads: p.num_heads,
            num_kv_heads: 1,
            head_dim: self.scaled_head_dim()?,
            vocab_size: served.vocab_size,
            rms_norm_eps: served.rms_norm_eps,
            rope: served.rope,
            max_position_embeddings: p.context,
            tie_word_embeddings: served.tie_word_embeddings,
            attention_bias: false,
            bos_token_id: served.bos_token_id,
            eos_token_ids: served.eos_token_ids.clone(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Never picks these ids (a tokenizer's special tokens) as the next
    /// token. Fails when they leave nothing to pick from.
    pub(crate) fn reserve_tokens(&mut self, ids: &[u32], vocab: usize) -> Result<()> {
        let mut reserved: Vec<u32> =
            ids.iter().copied().filter(|&t| (FIRST_PICKED_TOKEN..vocab).contains(&(t as usize))).collect();
        reserved.sort_unstable();
        reserved.dedup();
        if vocab <= FIRST_PICKED_TOKEN + reserved.len() {
            return Err(ModelError::Config(format!(
                "modeled compute picks tokens from ids {FIRST_PICKED_TOKEN}..{vocab} that are not special; \
                 the vocabulary leaves none"
            )));
        }
        self.reserved = reserved;
        Ok(())
    }

    /// The modeled time of a pass.
    pub fn forward_time(&self, work: &[SeqWork]) -> Duration {
        self.profile.forward_time(work)
    }

    /// One line for logs, saying this is not the real forward pass.
    pub fn describe(&self) -> String {
        format!(
            "modeled compute: {}; KV {} B/token stored as {} B/token (kv_scale {})",
            self.profile.describe(),
            self.profile.kv_bytes_per_token(),
            self.scaled_kv_bytes_per_token(),
            self.kv_scale
        )
    }

    /// The token a modeled pass predicts after `token` at `pos`: a hash of
    /// both, in `FIRST_PICKED_TOKEN..vocab`, never a reserved id.
    pub fn next_token(&self, vocab: usize, token: u32, pos: usize) -> u32 {
        let span = (vocab - FIRST_PICKED_TOKEN) as u64;
        let mut offset = mix64(mix64(token as u64 ^ 0x6D6F_6465_6C65_6400) ^ pos as u64) % span;
        while self.reserved.binary_search(&((FIRST_PICKED_TOKEN as u64 + offset) as u32)).is_ok() {
            offset = (offset + 1) % span;
        }
        (FIRST_PICKED_TOKEN as u64 + offset) as u32
    }

    /// The modeled forward pass of `steps`, whose pages are reserved:
    /// writes every new token's K and V of every layer (deterministic
    /// values from token, position and layer), calls `after_layer` after
    /// each layer, paces the layers so the pass ends when its modeled time
    /// since `started` has elapsed, sets the sequences' lengths and returns
    /// one-hot logits (0 for [`Modeled::next_token`], [`OTHER_LOGIT`] for
    /// the rest) for the rows asked for.
    pub(crate) fn forward(
        &self,
        config: &ModelConfig,
        cache: &mut KvCache,
        steps: &mut [Step<'_>],
        after_layer: &mut dyn FnMut(usize, &KvCache),
        started: Instant,
    ) -> Vec<Vec<f32>> {
        let work: Vec<SeqWork> = steps.iter().map(|s| SeqWork { past: s.seq.len(), new: s.tokens.len() }).collect();
        let total = self.forward_time(&work);
        let layers = config.num_layers;
        let mut k = vec![0f32; config.kv_dim()];
        let mut v = vec![0f32; config.kv_dim()];
        for l in 0..layers {
            for step in steps.iter() {
                let base = step.seq.len();
                for (i, &t) in step.tokens.iter().enumerate() {
                    kv_values(t, base + i, l, &mut k, &mut v);
                    cache.write(step.seq, l, base + i, &k, &v);
                }
            }
            after_layer(l, cache);
            sleep_until(started + total.mul_f64((l + 1) as f64 / layers as f64));
        }
        let vocab = config.vocab_size;
        let mut out = Vec::with_capacity(steps.len());
        for step in steps.iter_mut() {
            let (len, base) = (step.tokens.len(), step.seq.len());
            let rows = match step.logits {
                Logits::None => 0..0,
                Logits::Last => len.saturating_sub(1)..len,
                Logits::All => 0..len,
            };
            let mut logits = vec![OTHER_LOGIT; rows.len() * vocab];
            for (r, i) in rows.enumerate() {
                logits[r * vocab + self.next_token(vocab, step.tokens[i], base + i) as usize] = 0.0;
            }
            out.push(logits);
            cache.set_len(step.seq, base + len);
        }
        out
    }
}

/// K and V of `token` at `pos` in `layer`: uniform in [-1, 1), the same in
/// every process, so a block a decode node recomputes equals the one a
/// prefill node stored.
fn kv_values(token: u32, pos: usize, layer: usize, k: &mut [f32], v: &mut [f32]) {
    let seed = mix64(mix64(mix64(token as u64) ^ pos as u64) ^ layer as u64);
    for (i, x) in k.iter_mut().chain(v.iter_mut()).enumerate() {
        let bits = mix64(seed.wrapping_add(i as u64)) >> 40;
        *x = bits as f32 / (1u32 << 23) as f32 - 1.0;
    }
}

/// Sleeps until `deadline` (at once if it has passed). Deadlines are
/// absolute, so oversleeping one layer shortens the next sleep and a pass
/// overruns its modeled time by at most one timer slack.
fn sleep_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep(deadline - now);
    }
}

fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 100.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// The roofline of every profile as a Markdown table: hardware figures,
/// efficiencies, KV bytes per token (real, and stored with `kv_scale`),
/// and predicted times of prefill passes of 1k/8k/32k tokens (nothing
/// cached, one pass) and of decode steps of batch 1 and 32 at 8k context.
pub fn roofline_table(kv_scale: u32) -> String {
    let mut t = format!(
        "| profile | hardware | model | peak BF16 / GPU | HBM / GPU | MFU | BW eff. | overhead / pass \
         | KV / token | KV / token ÷{kv_scale} | prefill 1k | prefill 8k | prefill 32k | decode b=1 @8k \
         | decode b=32 @8k |\n|{}\n",
        "---|".repeat(15)
    );
    for p in &PROFILES {
        let prefill = |n: usize| fmt_ms(p.forward_time(&[SeqWork { past: 0, new: n }]));
        let decode = |b: usize| fmt_ms(p.forward_time(&vec![SeqWork { past: 8192, new: 1 }; b]));
        let scaled = match Modeled::new(p.name, kv_scale) {
            Ok(m) => format!("{} B", m.scaled_kv_bytes_per_token()),
            Err(_) => "refused".to_string(),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(
            t,
            "| `{}` | {} | {} | {:.0} TFLOP/s | {:.2} TB/s | {MFU} | {BW_EFFICIENCY} | {} µs | {} KiB | {scaled} \
             | {} | {} | {} | {} | {} |",
            p.name,
            p.hardware,
            p.model,
            p.peak_flops / 1e12,
            p.hbm_bytes_per_s / 1e12,
            OVERHEAD.as_micros(),
            p.kv_bytes_per_token() / 1024,
            prefill(1024),
            prefill(8192),
            prefill(32768),
            decode(1),
            decode(32),
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn profiles_carry_the_published_kv_sizes() {
        let p8 = profile("h100-llama3-8b").unwrap();
        let p70 = profile("8xh100-llama3-70b").unwrap();
        assert_eq!(p8.kv_bytes_per_token(), 128 << 10, "32 layers × 2 × 8 heads × 128 × 2 B");
        assert_eq!(p70.kv_bytes_per_token(), 320 << 10, "80 layers × 2 × 8 heads × 128 × 2 B");
        let e = profile("h100-llama3-9b").unwrap_err().to_string();
        assert!(e.contains("h100-llama3-8b") && e.contains("8xh100-llama3-70b"), "{e}");
    }

    #[test]
    fn a_decode_step_is_bandwidth_bound() {
        let p = profile("h100-llama3-8b").unwrap();
        let w = [SeqWork { past: 8192, new: 1 }];
        // Weights 2 × 8.03e9 B, KV read 8193 tokens and written 1, of 131072 B.
        let bytes = 16.06e9 + 8193.0 * 131072.0 + 131072.0;
        assert!((p.bytes(&w) - bytes).abs() < 1.0);
        let want = bytes / (3.35e12 * 0.75) + 0.5e-3;
        let got = secs(p.forward_time(&w));
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((got - 7.32e-3).abs() < 0.01e-3, "≈ 7.32 ms: {got}");
        // Batch 32 reads the weights once: far less than 32 × one step.
        let b32 = secs(p.forward_time(&[SeqWork { past: 8192, new: 1 }; 32]));
        assert!(b32 > got && b32 < 4.0 * got, "{b32}");
    }

    #[test]
    fn a_long_prefill_is_compute_bound() {
        let p = profile("h100-llama3-8b").unwrap();
        let w = [SeqWork { past: 0, new: 8192 }];
        let flops = 2.0 * 8.03e9 * 8192.0 + 4.0 * 32.0 * 4096.0 * 8192.0 * 4096.0;
        assert!((p.flops(&w) / flops - 1.0).abs() < 1e-12);
        let want = flops / (989e12 * 0.5) + 0.5e-3;
        let got = secs(p.forward_time(&w));
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((got - 0.3021).abs() < 0.001, "≈ 302 ms: {got}");
        // Cached tokens cost attention, not weight GEMMs.
        let cached = secs(p.forward_time(&[SeqWork { past: 8192, new: 8192 }]));
        let attn = 4.0 * 32.0 * 4096.0 * 8192.0 * 8192.0 / (989e12 * 0.5);
        assert!((cached - got - attn).abs() < 1e-9, "{cached} - {got} vs {attn}");
    }

    #[test]
    fn tensor_parallel_splits_work_and_pays_all_reduces() {
        let p = profile("8xh100-llama3-70b").unwrap();
        let w = [SeqWork { past: 0, new: 8192 }];
        // 160 ring all-reduces of 8192 × 8192 × 2 B over 8 GPUs at 450 GB/s, plus 10 µs each.
        let one = 10e-6 + 1.75 * 8192.0 * 8192.0 * 2.0 / 450e9;
        assert!((p.comm_seconds(&w) - 160.0 * one).abs() < 1e-12);
        let flops = 2.0 * 70.6e9 * 8192.0 + 4.0 * 80.0 * 8192.0 * 8192.0 * 4096.0;
        let want = flops / (8.0 * 989e12 * 0.5) + 160.0 * one + 0.5e-3;
        let got = secs(p.forward_time(&w));
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        // Decode: weights read once across 8 GPUs, plus 160 small all-reduces.
        let d = [SeqWork { past: 8192, new: 1 }];
        let bytes = 2.0 * 70.6e9 + 8194.0 * 327680.0;
        let comm = 160.0 * (10e-6 + 1.75 * 8192.0 * 2.0 / 450e9);
        let want = bytes / (8.0 * 3.35e12 * 0.75) + comm + 0.5e-3;
        assert!((secs(p.forward_time(&d)) - want).abs() < 1e-9);
        assert_eq!(p.forward_time(&[SeqWork { past: 100, new: 0 }]), Duration::ZERO);
    }

    #[test]
    fn kv_scale_must_keep_two_elements_and_be_a_power_of_two() {
        for ok in [1, 2, 256, 512] {
            Modeled::new("h100-llama3-8b", ok).unwrap();
        }
        for bad in [0, 3, 1024, 4096] {
            let e = Modeled::new("h100-llama3-8b", bad).unwrap_err().to_string();
            assert!(e.contains("kv_scale") && e.contains("1 to 512"), "{bad}: {e}");
        }
        let m = Modeled::new("8xh100-llama3-70b", 256).unwrap();
        assert_eq!(m.scaled_kv_bytes_per_token(), 320 * 1024 / 256);
    }

    #[test]
    fn next_tokens_avoid_reserved_ids_and_are_deterministic() {
        let mut m = Modeled::new("h100-llama3-8b", 256).unwrap();
        let vocab = 300;
        // Every id but 299 above 256 is reserved: 299 is the only choice.
        let reserved: Vec<u32> = (256..299).chain([0, 5, 1000]).collect();
        m.reserve_tokens(&reserved, vocab).unwrap();
        for pos in 0..50 {
            assert_eq!(m.next_token(vocab, 7, pos), 299);
        }
        m.reserve_tokens(&[], vocab).unwrap();
        let picks: Vec<u32> = (0..200).map(|pos| m.next_token(vocab, 7, pos)).collect();
        assert_eq!(picks, (0..200).map(|pos| m.next_token(vocab, 7, pos)).collect::<Vec<_>>());
        assert!(picks.iter().all(|&t| (256..300).contains(&t)));
        assert!(picks.iter().collect::<std::collections::HashSet<_>>().len() > 20, "spread: {picks:?}");
        let all: Vec<u32> = (256..300).collect();
        assert!(m.reserve_tokens(&all, vocab).is_err(), "nothing left to pick");
    }

    #[test]
    fn the_docs_show_the_current_table() {
        let table = roofline_table(256);
        for file in ["docs/modeled-compute.md", "README.md"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
            let doc = std::fs::read_to_string(&path).unwrap();
            assert!(doc.contains(&table), "{file} must contain:\n{table}");
        }
    }
}
