//! Tandem's model engine, shared by prefill and decode nodes.
//!
//! - [`config`] — model hyper-parameters from `config.json` or GGUF metadata.
//! - [`weights`] — kernel-ready weight matrices from any tensor source.
//! - [`safetensors`] — memory-mapped Hugging Face checkpoints (single/sharded).
//! - [`gguf`] — GGUF files: metadata, tensors, embedded tokenizer and template.
//! - [`tokenizer`] — text ↔ token ids, stop tokens.
//! - [`chat`] — chat templates (minijinja).
//! - [`kv_cache`] — the paged KV cache (pages, block tables, f32/bf16).
//! - [`forward`] — the batched forward pass: chunked prefill + paged decode.
//! - [`modeled`] — modeled compute: a roofline of a named accelerator and
//!   model replaces the forward pass (selected by config only) while real
//!   KV bytes of the scaled size move.
//! - [`sampling`] — greedy/temperature/top-k/top-p sampling, stops, logprobs.
//! - [`engine`] — loading a model by name or path and generating text.
//! - [`fetch`] — downloading known models into the local cache.
//! - [`deploy`] — the cluster file's `[model]` section (model + KV layout).

pub mod chat;
pub mod config;
pub mod deploy;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod tokenizer;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use gguf::GgufFile;
pub use tokenizer::Tokenizer;
pub mod engine;
pub mod forward;
pub mod kv_cache;
pub mod modeled;
pub mod safetensors;
pub mod sampling;
