//! Loading a model from a path and generating tokens with it: chunked
//! prefill, then continuous batched decode of every request together.
//!
//! The engine works on token ids; text (tokenizer, chat template, stop
//! strings) stays with the caller, which sees every token through a
//! callback and may stop a sequence there.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::forward::{Logits, Model, Step};
use crate::gguf::GgufFile;
use crate::kv_cache::{KvCache, KvDType, SeqKv};
use crate::safetensors::SafetensorsDir;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_kernels::Precision;

/// A model with its tokenizer, loaded from disk.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

/// Whether `path` is a GGUF file (by its magic, not its name).
fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// Loads a Hugging Face directory (`config.json`, safetensors,
/// `tokenizer.json`) or a GGUF file.
pub fn load(path: &Path, precision: Precision) -> Result<LoadedModel> {
    let (config, weights, tokenizer) = if path.is_dir() {
        let config = ModelConfig::from_hf_file(&path.join("config.json"))?;
        let tensors = SafetensorsDir::open(path)?;
        let weights = Weights::load(&config, &tensors)?;
        (config, weights, Tokenizer::from_hf_dir(path)?)
    } else if path.is_file() {
        if !is_gguf(path) {
            return Err(ModelError::format(path, "not a GGUF file (expected a .gguf file or a model directory)"));
        }
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        let weights = Weights::load(&config, &file)?;
        (config, weights, Tokenizer::from_gguf(&file)?)
    } else {
        return Err(ModelError::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::format(
            path,
            format!("tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(), config.vocab_size),
        ));
    }
    Ok(LoadedModel { model: Model::new(config, weights, precision), tokenizer, path: path.to_path_buf() })
}

/// The tokenizer and configuration of a model without its weights (what a
/// conductor needs to tokenize and bound requests).
pub fn load_tokenizer(path: &Path) -> Result<(Tokenizer, ModelConfig)> {
    if path.is_dir() {
        Ok((Tokenizer::from_hf_dir(path)?, ModelConfig::from_hf_file(&path.join("config.json"))?))
    } else if is_gguf(path) {
        let file = GgufFile::open(path)?;
        Ok((Tokenizer::from_gguf(&file)?, file.config()?))
    } else if path.is_file() {
        Err(ModelError::format(path, "not a GGUF file (expected a .gguf file or a model directory)"))
    } else {
        Err(ModelError::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)))
    }
}

/// Knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Tokens per KV page (= block size in the store).
    pub page_tokens: usize,
    pub kv_dtype: KvDType,
    /// Pages in the pool.
    pub num_pages: usize,
    /// Most prompt tokens computed in one forward call.
    pub chunk_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { page_tokens: 16, kv_dtype: KvDType::F32, num_pages: 1024, chunk_tokens: 512 }
    }
}

/// One generation request, in token ids.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (the stop token is kept in the
    /// output, as most servers report it via `finish_reason`).
    pub stop_ids: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_tokens`.
    Length,
    /// Produced a stop token, or the caller stopped it.
    Stop,
    /// Reached the model's context length.
    ContextFull,
}

/// The result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<Sampled>,
    pub finish_reason: FinishReason,
}

impl Generation {
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.token).collect()
    }
}

/// Where the time went.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prefill_tokens: usize,
    pub prefill: Duration,
    /// Tokens produced by decode steps (the first token of each request
    /// comes from prefill and is not counted).
    pub decode_tokens: usize,
    pub decode: Duration,
    pub decode_steps: usize,
}

impl Timings {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decode_tokens as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// What the caller says after seeing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A model plus its paged KV cache.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    cache: KvCache,
    options: EngineOptions,
}

struct Active {
    index: usize,
    seq: SeqKv,
    sampler: Sampler,
    out: Vec<Sampled>,
    finish: Option<FinishReason>,
}

impl Engine {
    pub fn new(model: Model, options: EngineOptions) -> Result<Self> {
        if options.chunk_tokens == 0 {
            return Err(ModelError::Request("chunk_tokens must be at least 1".into()));
        }
        let cache = KvCache::new(model.kv_geometry(options.page_tokens), options.num_pages, options.kv_dtype)?;
        Ok(Self { model, cache, options })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    fn validate(&self, r: &Request) -> Result<()> {
        let c = self.model.config();
        if r.prompt.is_empty() {
            return Err(ModelError::Request("the prompt is empty".into()));
        }
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        if r.prompt.len() >= c.max_position_embeddings {
            return Err(ModelError::Request(format!(
                "the prompt has {} tokens; the model's context length is {}",
                r.prompt.len(),
                c.max_position_embeddings
            )));
        }
        if r.max_tokens == 0 {
            return Err(ModelError::Request("max_tokens must be at least 1".into()));
        }
        r.sampling.validate()
    }

    /// Generates for every request, batching their decode steps together.
    /// `on_token(request_index, token)` sees each token as it is sampled and
    /// may stop that request. All KV pages are returned when this returns,
    /// whether it succeeds or fails.
    pub fn generate(
        &mut self,
        requests: &[Request],
        mut on_token: impl FnMut(usize, &Sampled) -> Flow,
    ) -> Result<(Vec<Generation>, Timings)> {
        for r in requests {
            self.validate(r)?;
        }
        let mut active: Vec<Active> = Vec::with_capacity(requests.len());
        for (index, r) in requests.iter().enumerate() {
            let sampler = Sampler::new(r.sampling.clone())?;
            active.push(Active { index, seq: SeqKv::default(), sampler, out: Vec::new(), finish: None });
        }
        let result = self.run(requests, &mut active, &mut on_token);
        for a in active.iter_mut() {
            self.cache.release(std::mem::take(&mut a.seq));
        }
        let timings = result?;
        let gens = active
            .into_iter()
            .map(|a| Generation { tokens: a.out, finish_reason: a.finish.unwrap_or(FinishReason::Length) })
            .collect();
        Ok((gens, timings))
    }

    fn run(
        &mut self,
        requests: &[Request],
        active: &mut [Active],
        on_token: &mut impl FnMut(usize, &Sampled) -> Flow,
    ) -> Result<Timings> {
        let mut t = Timings::default();
        let ctx = self.model.config().max_position_embeddings;
        // Prefill: chunks of each prompt, packed into forward calls of at
        // most `chunk_tokens` tokens.
        let start = Instant::now();
        let mut done = vec![0usize; requests.len()];
        loop {
            let mut budget = self.options.chunk_tokens;
            let mut plan = Vec::new();
            for (i, r) in requests.iter().enumerate() {
                if budget == 0 {
                    break;
                }
                let take = (r.prompt.len() - done[i]).min(budget);
                if take > 0 {
                    plan.push((i, done[i]..done[i] + take));
                    budget -= take;
                }
            }
            if plan.is_empty() {
                break;
            }
            // `plan` lists requests in index order, each at most once.
            let mut steps: Vec<Step<'_>> = Vec::with_capacity(plan.len());
            let mut next = plan.iter().peekable();
            for (i, a) in active.iter_mut().enumerate() {
                if let Some((_, range)) = next.next_if(|(p, _)| *p == i) {
                    let last = range.end == requests[i].prompt.len();
                    steps.push(Step {
                        tokens: &requests[i].prompt[range.clone()],
                        seq: &mut a.seq,
                        logits: if last { Logits::Last } else { Logits::None },
                    });
                }
            }
            let logits = self.model.forward(&mut self.cache, &mut steps)?;
            drop(steps);
            for ((i, range), logits) in plan.iter().zip(logits) {
                done[*i] = range.end;
                t.prefill_tokens += range.len();
                if range.end == requests[*i].prompt.len() {
                    let a = &mut active[*i];
                    let s = a.sampler.sample(&logits)?;
                    Self::accept(a, s, &requests[*i], ctx, on_token);
                }
            }
        }
        t.prefill = start.elapsed();

        // Decode: every unfinished sequence advances one token per step.
        let start = Instant::now();
        loop {
            let mut live: Vec<&mut Active> = active.iter_mut().filter(|a| a.finish.is_none()).collect();
            if live.is_empty() {
                break;
            }
            let last: Vec<u32> = live.iter().map(|a| a.out.last().expect("prefill sampled a token").token).collect();
            let mut steps: Vec<Step<'_>> = live
                .iter_mut()
                .zip(&last)
                .map(|(a, tok)| Step { tokens: std::slice::from_ref(tok), seq: &mut a.seq, logits: Logits::Last })
                .collect();
            let logits = self.model.forward(&mut self.cache, &mut steps)?;
            drop(steps);
            t.decode_steps += 1;
            for (a, logits) in live.iter_mut().zip(logits) {
                let s = a.sampler.sample(&logits)?;
                t.decode_tokens += 1;
                let r = &requests[a.index];
                Self::accept(a, s, r, ctx, on_token);
            }
        }
        t.decode = start.elapsed();
        Ok(t)
    }

    fn accept(a: &mut Active, s: Sampled, r: &Request, ctx: usize, on_token: &mut impl FnMut(usize, &Sampled) -> Flow) {
        let flow = on_token(a.index, &s);
        let stop = r.stop_ids.contains(&s.token);
        a.out.push(s);
        a.finish = if stop || flow == Flow::Stop {
            Some(FinishReason::Stop)
        } else if a.out.len() >= r.max_tokens {
            Some(FinishReason::Length)
        } else if r.prompt.len() + a.out.len() >= ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
    }
}
