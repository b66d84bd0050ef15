//! Text ↔ token ids: a Hugging Face `tokenizers` pipeline, loaded from a
//! model directory (`tokenizer.json` + `tokenizer_config.json` +
//! `generation_config.json`) or rebuilt from GGUF metadata, plus the model's
//! special tokens, stop ids and chat template.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;

/// Special tokens that end an assistant turn in common chat templates. One
/// of these counts as a stop token when the template uses it and the
/// vocabulary has it as a special token.
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>"];

/// A streaming decoder holds back at most this many tokens waiting for a
/// multi-byte character to complete (a UTF-8 character has at most 4 bytes,
/// each byte-level token at least one).
const MAX_PENDING_TOKENS: usize = 8;

/// A tokenizer with the model's special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    /// Prepend BOS on `encode(.., true)` when the pipeline did not.
    add_bos: bool,
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The special-token facts each source provides.
struct Specials {
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    extra_stop_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| ModelError::format(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

/// A token given as `"<s>"` or `{"content": "<s>", …}`.
fn token_string(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// `chat_template` as a string, or as `[{"name": …, "template": …}]` (the
/// `default` one, else the first).
fn chat_template_from_config(v: Option<&Value>, path: &Path) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: &str| list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name));
            let chosen = named("default").or(list.first());
            match chosen.map(|t| t.get("template").and_then(Value::as_str)) {
                None => Ok(None),
                Some(Some(s)) => Ok(Some(s.to_string())),
                Some(None) => Err(ModelError::format(path, "chat_template entry has no 'template' string")),
            }
        }
        Some(other) => {
            Err(ModelError::format(path, format!("chat_template is {other:.40}, expected a string or list")))
        }
    }
}

/// `eos_token_id` given as a number or a list of numbers.
fn ids_from_json(v: Option<&Value>) -> Vec<u32> {
    let one = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Some(Value::Array(items)) => items.iter().filter_map(one).collect(),
        Some(x) => one(x).into_iter().collect(),
        None => vec![],
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the optional `tokenizer_config.json`,
    /// `chat_template.jinja` and `generation_config.json` of a model directory.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::io(&path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::format(&path, e.to_string()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let mut chat_template = chat_template_from_config(config.get("chat_template"), &config_path)?;
        if chat_template.is_none() {
            // transformers ≥ 4.43 may save the template beside the config.
            let jinja = dir.join("chat_template.jinja");
            match std::fs::read_to_string(&jinja) {
                Ok(t) => chat_template = Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ModelError::io(&jinja, e)),
            }
        }
        let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let generation_eos = ids_from_json(generation.get("eos_token_id"));
        let lookup = |key: &str| token_string(config.get(key)).and_then(|t| inner.token_to_id(t));
        let bos_id = lookup("bos_token").or_else(|| ids_from_json(generation.get("bos_token_id")).first().copied());
        let eos_id = lookup("eos_token").or_else(|| generation_eos.first().copied());
        let specials = Specials {
            bos_id,
            eos_id,
            extra_stop_ids: generation_eos,
            // Absent: trust the pipeline's post-processor.
            add_bos: config.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            chat_template,
        };
        Self::assemble(inner, specials, &path)
    }

    /// Rebuilds the tokenizer embedded in a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let parts = crate::gguf::tokenizer::build(file)?;
        let specials = Specials {
            bos_id: parts.bos_id,
            eos_id: parts.eos_id,
            extra_stop_ids: parts.extra_stop_ids,
            add_bos: parts.add_bos,
            chat_template: parts.chat_template,
        };
        Self::assemble(parts.tokenizer, specials, file.path())
    }

    fn assemble(inner: tokenizers::Tokenizer, s: Specials, origin: &Path) -> Result<Self> {
        let named = |id: Option<u32>, what: &str| -> Result<Option<(u32, String)>> {
            match id {
                None => Ok(None),
                Some(id) => inner.id_to_token(id).map(|t| Some((id, t))).ok_or_else(|| {
                    ModelError::format(origin, format!("{what} token id {id} is not in the vocabulary"))
                }),
            }
        };
        let bos = named(s.bos_id, "BOS")?;
        let eos = named(s.eos_id, "EOS")?;
        let mut stop_ids: Vec<u32> = Vec::new();
        let mut push = |id: u32| {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        };
        eos.iter().map(|(id, _)| *id).chain(s.extra_stop_ids).for_each(&mut push);
        if let Some(template) = &s.chat_template {
            let specials = inner.get_added_tokens_decoder();
            for (&id, token) in &specials {
                if token.special
                    && END_OF_TURN_TOKENS.contains(&token.content.as_str())
                    && template.contains(&token.content)
                {
                    push(id);
                }
            }
        }
        if s.add_bos && bos.is_none() {
            return Err(ModelError::format(origin, "add_bos_token is set but there is no BOS token"));
        }
        Ok(Self { inner, bos, eos, add_bos: s.add_bos, stop_ids, chat_template: s.chat_template })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`)
    /// become their ids; `add_special` adds BOS (and whatever else the
    /// pipeline's post-processor adds).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special)
            .map_err(|e| ModelError::Request(format!("cannot tokenize: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, true, Some((bos, _))) = (add_special, self.add_bos, &self.bos) {
            if ids.first() != Some(bos) {
                ids.insert(0, *bos);
            }
        }
        Ok(ids)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(id) => Err(ModelError::Request(format!(
                "token id {id} is not in the vocabulary ({} tokens)",
                self.vocab_size()
            ))),
            None => Ok(()),
        }
    }

    /// Text of `ids`; an id outside the vocabulary is a request error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.decode_unchecked(ids, skip_special)
    }

    fn decode_unchecked(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| ModelError::Request(format!("cannot decode: {e}")))
    }

    /// A decoder that turns ids, one at a time, into text increments.
    pub fn decode_stream(&self, skip_special: bool) -> DecodeStream<'_> {
        DecodeStream { tokenizer: self, skip_special, ids: Vec::new(), read: 0, prefix: String::new() }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(id, _)| *id)
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(id, _)| *id)
    }
    /// The BOS token's text (for chat templates).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|(_, t)| t.as_str())
    }
    /// The EOS token's text (for chat templates).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|(_, t)| t.as_str())
    }
    /// Ids that end generation: EOS, `generation_config.json`'s
    /// `eos_token_id`s (or GGUF's end-of-turn ids), and the chat template's
    /// end-of-turn special token.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }
    /// Every special id, sorted: BOS, EOS, the stop ids and the added
    /// tokens marked special (a modeled model never predicts them).
    pub fn special_ids(&self) -> Vec<u32> {
        let added = self.inner.get_added_tokens_decoder();
        let mut ids: Vec<u32> = added.iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        ids.extend(self.bos.iter().chain(&self.eos).map(|(id, _)| *id));
        ids.extend_from_slice(&self.stop_ids);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Incremental detokenization. Text is emitted only once it is valid UTF-8
/// (a character split across tokens waits for its last byte) and is exactly
/// what decoding all ids at once gives.
#[derive(Debug)]
pub struct DecodeStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    /// Context: the ids of the last emission, then the pending ones.
    ids: Vec<u32>,
    /// `ids[..read]` are already emitted.
    read: usize,
    /// `decode(ids[..read])`.
    prefix: String,
}

impl DecodeStream<'_> {
    /// Adds one id; returns the new text, or `None` while a character is
    /// incomplete (or the token decodes to nothing).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let text = self.tokenizer.decode_unchecked(&self.ids, self.skip_special)?;
        if text.ends_with('\u{FFFD}') && self.ids.len() - self.read < MAX_PENDING_TOKENS {
            return Ok(None);
        }
        self.emit(text)
    }

    /// Whatever is still held back (an incomplete character at the end of
    /// generation, as replacement characters).
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let text = self.tokenizer.decode_unchecked(&self.ids, self.skip_special)?;
        self.emit(text)
    }

    fn emit(&mut self, text: String) -> Result<Option<String>> {
        // Normally `text` extends `prefix`; if a decoder rewrote earlier text,
        // emit from where they diverge rather than fail mid-stream.
        let common = common_prefix_len(&self.prefix, &text);
        let new = text[common..].to_string();
        // Keep the just-emitted ids as context for the next step (decoders
        // treat the start of a sequence specially), and forget older ones.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix = self.tokenizer.decode_unchecked(&self.ids, self.skip_special)?;
        Ok((!new.is_empty()).then_some(new))
    }
}

/// Length of the longest common prefix of `a` and `b` that ends on a
/// character boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, ca), cb)| ca != cb).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix_len("abc", "abd"), 2);
        assert_eq!(common_prefix_len("aé", "aéx"), 3);
        assert_eq!(common_prefix_len("aé", "aè"), 1);
        assert_eq!(common_prefix_len("", "x"), 0);
        assert_eq!(common_prefix_len("xyz", "x"), 1);
    }

    #[test]
    fn chat_template_list_form_prefers_default() {
        let v: Value = serde_json::json!([
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"}
        ]);
        assert_eq!(chat_template_from_config(Some(&v), Path::new("x")).unwrap().as_deref(), Some("D"));
        let v: Value = serde_json::json!([{"name": "rag", "template": "R"}]);
        assert_eq!(chat_template_from_config(Some(&v), Path::new("x")).unwrap().as_deref(), Some("R"));
        assert!(chat_template_from_config(Some(&serde_json::json!(3)), Path::new("x")).is_err());
    }
}
