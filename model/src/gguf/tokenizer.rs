//! The byte-level BPE tokenizer embedded in GGUF metadata
//! (`tokenizer.ggml.*`), rebuilt as a Hugging Face `tokenizers` pipeline
//! that matches the model's original `tokenizer.json`.

use super::GgufFile;
use crate::error::{ModelError, Result};
use std::collections::hash_map::Entry;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Llama-3's split regex (HF `tokenizer.json`, llama.cpp `LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: like Llama-3's but one digit at a time.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// ggml token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// What the GGUF says about special tokens and templates.
#[derive(Debug)]
pub(crate) struct GgufTokenizerParts {
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// End-of-turn / end-of-message ids (`eot_token_id`, `eom_token_id`).
    pub extra_stop_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// The pre-tokenizer llama.cpp associates with `tokenizer.ggml.pre`.
/// Returns whether the pipeline needs an NFC normalizer (Qwen2) too.
fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
            .map(Into::into)
            .map_err(|e| ModelError::Config(format!("pre-tokenizer regex for '{pre}': {e}")))
    };
    Ok(match pre {
        // GPT-2's regex inside ByteLevel.
        "default" | "gpt2" => (ByteLevel::new(false, true, true).into(), false),
        // Every digit on its own (llama.cpp: `\p{N}` before the GPT-2
        // regex; SmolLM2's tokenizer.json: `Digits(individual_digits)`).
        "smollm" => {
            let seq = vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()];
            (Sequence::new(seq).into(), false)
        }
        "llama-bpe" | "llama3" => {
            let seq = vec![split(LLAMA3_SPLIT)?, ByteLevel::new(false, true, false).into()];
            (Sequence::new(seq).into(), false)
        }
        "qwen2" => {
            let seq = vec![split(QWEN2_SPLIT)?, ByteLevel::new(false, false, false).into()];
            (Sequence::new(seq).into(), true)
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: default, gpt2, smollm, llama-bpe, qwen2)"
            )))
        }
    })
}

/// Splits a GGUF merge `"a b"` at its first space after the first char
/// (as llama.cpp does, so a token starting with a space still works).
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let pos = merge[first_len..].find(' ')? + first_len;
    Some((merge[..pos].to_string(), merge[pos + 1..].to_string()))
}

pub(crate) fn build(file: &GgufFile) -> Result<GgufTokenizerParts> {
    let model = file
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| file.format_err("metadata 'tokenizer.ggml.model' is missing (no embedded tokenizer)"))?;
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model '{model}' (only byte-level BPE, 'gpt2', is implemented)"
        )));
    }
    let tokens = file
        .get_strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| file.format_err("metadata 'tokenizer.ggml.tokens' is missing"))?;
    let n = u32::try_from(tokens.len()).map_err(|_| file.format_err("tokenizer.ggml.tokens is too long"))?;
    let types = match file.get_array("tokenizer.ggml.token_type")? {
        None => vec![1; tokens.len()],
        Some(a) => a.to_i64s().filter(|t| t.len() == tokens.len()).ok_or_else(|| {
            file.format_err(format!(
                "tokenizer.ggml.token_type must be {} integers, got {} {}",
                tokens.len(),
                a.len(),
                a.element_type_name()
            ))
        })?,
    };
    let merges = file
        .get_strings("tokenizer.ggml.merges")?
        .ok_or_else(|| file.format_err("metadata 'tokenizer.ggml.merges' is missing"))?
        .iter()
        .map(|m| split_merge(m).ok_or_else(|| file.format_err(format!("tokenizer merge '{m}' is not 'a b'"))))
        .collect::<Result<Vec<_>>>()?;

    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    let mut duplicates = 0usize;
    for (id, token) in (0..n).zip(tokens) {
        // A string listed twice keeps its first id; the later id stays
        // unknown to the tokenizer (decoding it is a request error).
        match vocab.entry(token.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(id);
            }
            Entry::Occupied(_) => duplicates += 1,
        }
    }
    if duplicates > 0 {
        tracing::warn!(path = %file.path().display(), duplicates, "GGUF vocabulary lists some tokens twice");
    }
    let pre = file.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let (pre_tokenizer, nfc) = pre_tokenizer(pre)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| file.format_err(format!("embedded BPE tokenizer: {e}")))?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    if nfc {
        tokenizer.with_normalizer(Some(NFC));
    }
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter_map(|(t, &ty)| match ty {
            TOKEN_TYPE_CONTROL => Some(AddedToken::from(t.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(t.clone(), false).normalized(false)),
            _ => None,
        })
        .collect();
    tokenizer.add_special_tokens(&added);

    let id = |key: &str| -> Result<Option<u32>> {
        match file.get_u32(key)? {
            Some(id) if id >= n => Err(file.format_err(format!("{key} = {id} is outside the vocabulary ({n})"))),
            other => Ok(other),
        }
    };
    let extra_stop_ids =
        [id("tokenizer.ggml.eot_token_id")?, id("tokenizer.ggml.eom_token_id")?].into_iter().flatten().collect();
    Ok(GgufTokenizerParts {
        tokenizer,
        bos_id: id("tokenizer.ggml.bos_token_id")?,
        eos_id: id("tokenizer.ggml.eos_token_id")?,
        extra_stop_ids,
        // llama.cpp adds BOS by default only for Llama-3's vocabulary.
        add_bos: file.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(matches!(pre, "llama-bpe" | "llama3")),
        chat_template: file.get_str("tokenizer.chat_template")?.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_split_at_the_first_inner_space() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  x"), Some((" ".into(), "x".into())));
        assert_eq!(split_merge("é ab c"), Some(("é".into(), "ab c".into())));
        assert_eq!(split_merge("abc"), None);
        assert_eq!(split_merge(""), None);
    }

    #[test]
    fn split_regexes_compile() {
        for pre in ["default", "gpt2", "smollm", "llama-bpe", "qwen2"] {
            pre_tokenizer(pre).unwrap();
        }
        assert!(matches!(pre_tokenizer("deepseek-llm"), Err(ModelError::Unsupported(_))));
    }
}
