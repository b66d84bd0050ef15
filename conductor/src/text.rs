//! Text around the token ids: chat prompts rendered with the model's
//! template, and stop strings found in (or possibly growing at the end of)
//! streamed text. Shared by the local `tandem generate` and the HTTP API.

use tandem_model::chat::{ChatMessage, ChatTemplate};
use tandem_model::tokenizer::Tokenizer;

/// The model's chat template (ChatML when the model has none).
pub fn chat_template(tokenizer: &Tokenizer) -> anyhow::Result<ChatTemplate> {
    Ok(match tokenizer.chat_template() {
        Some(src) => ChatTemplate::new(src)?,
        None => ChatTemplate::chatml(),
    })
}

/// Token ids of `messages` rendered with `template`, ready for the
/// assistant's reply.
pub fn render_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> anyhow::Result<Vec<u32>> {
    let rendered = template.render(
        messages,
        true,
        tokenizer.bos_token().unwrap_or_default(),
        tokenizer.eos_token().unwrap_or_default(),
    )?;
    Ok(tokenizer.encode(&rendered, false)?)
}

/// A single user message (with an optional system message) as a chat
/// prompt.
pub fn chat_prompt(tokenizer: &Tokenizer, text: &str, system: Option<&str>) -> anyhow::Result<Vec<u32>> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::system(s));
    }
    messages.push(ChatMessage::user(text));
    render_chat(tokenizer, &chat_template(tokenizer)?, &messages)
}

/// Byte offset of the first stop string in `text`.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// How much of `text` can be released: all but a suffix that could still
/// grow into a stop string.
pub fn held_back(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops {
        for (i, _) in text.char_indices().rev().take(s.len()) {
            if s.starts_with(&text[i..]) {
                safe = safe.min(i);
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_partial_matches_held_back() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc\n\ndef", &stops), Some(3));
        assert_eq!(find_stop("abcEN", &stops), None);
        assert_eq!(held_back("abcEN", &stops), 3);
        assert_eq!(held_back("abc\n", &stops), 3);
        assert_eq!(held_back("abcx", &stops), 4);
    }
}
