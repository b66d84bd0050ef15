//! Tokenizers (Hugging Face directory and GGUF-embedded) and chat templates,
//! checked against the reference token ids in `fixtures/references`.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use tandem_model::chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
use tandem_model::gguf::GgufFile;
use tandem_model::tokenizer::Tokenizer;
use tandem_model::ModelError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

use common::smollm2_gguf;

fn smollm2() -> (GgufFile, Tokenizer) {
    let file = GgufFile::open(smollm2_gguf()).unwrap();
    let tok = Tokenizer::from_gguf(&file).unwrap();
    (file, tok)
}

/// Cases of a reference file, by name.
fn reference_case(file: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join("references").join(file)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn tiny() -> Tokenizer {
    Tokenizer::from_hf_dir(fixtures().join("tiny-llama-bf16")).unwrap()
}

#[test]
fn tiny_fixture_tokenizer_matches_reference_ids() {
    let tok = tiny();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.vocab_size()), (Some(1), Some(2), 4096));
    assert_eq!(tok.stop_ids(), [2]);
    assert_eq!((tok.bos_token(), tok.eos_token()), (Some("<s>"), Some("</s>")));
    assert_eq!(tok.chat_template(), None);

    let case = reference_case("tiny-llama-bf16__f32compute.json", "text");
    let prompt = case["prompt_text"].as_str().unwrap();
    let want = ids(&case["prompt_ids"]);
    // The reference includes BOS, added by the tokenizer's post-processor.
    assert_eq!(want[0], 1);
    assert_eq!(tok.encode(prompt, true).unwrap(), want);
    assert_eq!(tok.encode(prompt, false).unwrap(), want[1..]);
    assert_eq!(tok.decode(&want, true).unwrap(), prompt);

    for name in ["text", "random37", "bos_only"] {
        let case = reference_case("tiny-llama-bf16__f32compute.json", name);
        let all: Vec<u32> = ids(&case["prompt_ids"]).into_iter().chain(ids(&case["generated_ids"])).collect();
        assert_eq!(tok.decode(&all, false).unwrap(), case["full_text"].as_str().unwrap(), "case {name}");
        assert_eq!(tok.decode(&ids(&case["generated_ids"]), false).unwrap(), case["generated_text"].as_str().unwrap());
    }
}

#[test]
fn hf_dir_reads_template_list_generation_eos_and_add_bos() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-llama-bf16");
    std::fs::copy(src.join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true,
        "chat_template": [{"name": "rag", "template": "R"}, {"name": "default", "template": "{{ bos_token }}D"}]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [2, 0]}"#).unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template(), Some("{{ bos_token }}D"));
    assert_eq!(tok.stop_ids(), [2, 0]);
    // BOS once, whether the post-processor or add_bos_token adds it.
    let with = tok.encode("To be", true).unwrap();
    assert_eq!(with[0], 1);
    assert_ne!(with[1], 1);

    assert!(matches!(Tokenizer::from_hf_dir(dir.path().join("nope")), Err(ModelError::Io { .. })));
    std::fs::write(dir.path().join("tokenizer_config.json"), "{broken").unwrap();
    assert!(matches!(Tokenizer::from_hf_dir(dir.path()), Err(ModelError::Format { .. })));
}

#[test]
fn smollm2_gguf_tokenizer_encodes_the_reference_chat_prompt() {
    let (_, tok) = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.stop_ids(), [2]);

    let case = reference_case("smollm2-135m-instruct-f32__f32compute__chat.json", "chat");
    let template = ChatTemplate::new(tok.chat_template().expect("SmolLM2 embeds a chat template")).unwrap();
    let user = case["prompt_text"].as_str().unwrap();
    let prompt =
        template.render(&[ChatMessage::user(user)], true, tok.bos_token().unwrap(), tok.eos_token().unwrap()).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{prompt}");
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    let want = ids(&case["prompt_ids"]);
    assert_eq!(want.len(), 37);
    // SmolLM2 does not add BOS: the template writes <|im_start|> itself.
    assert_eq!(tok.encode(&prompt, true).unwrap(), want);
    assert_eq!(tok.encode(&prompt, false).unwrap(), want);

    let generated = ids(&case["generated_ids"]);
    assert_eq!(tok.decode(&generated, false).unwrap(), case["generated_text"].as_str().unwrap());
    let all: Vec<u32> = want.iter().chain(&generated).copied().collect();
    assert_eq!(tok.decode(&all, false).unwrap(), case["full_text"].as_str().unwrap());
    assert_eq!(tok.decode(&generated[..7], true).unwrap(), "The capital of France is Paris.");
}

#[test]
fn smollm2_splits_digits_and_special_tokens() {
    let (_, tok) = smollm2();
    let digits = tok.encode("12345", false).unwrap();
    assert_eq!(digits.len(), 5);
    for (id, d) in digits.iter().zip("12345".chars()) {
        assert_eq!(tok.decode(&[*id], false).unwrap(), d.to_string());
    }
    assert_eq!(tok.encode("a 2024 b", false).unwrap().len(), 2 + 4 + 1);
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!((ids[0], *ids.last().unwrap()), (1, 2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

/// Text drawn from a mix of scripts, emoji, combining marks and whitespace.
fn random_text(rng: &mut impl rand::Rng) -> String {
    const POOL: &[&str] = &[
        "a", "Z", "q", " ", "  ", "\n", "\t", "7", "42", ".", ",", "'s", "!?", "é", "ß", "ø", "中", "文", "日本", "한",
        "Ж", "ы", "ع", "ह", "🙂", "😀", "👍🏽", "🇫🇷", "e\u{301}", "\u{200d}", "€", "½", "٣", "<", "|", ">", "{", "}",
        "\\",
    ];
    (0..rng.random_range(0..40)).map(|_| POOL[rng.random_range(0..POOL.len())]).collect()
}

#[test]
fn random_unicode_round_trips_and_streams() {
    use rand::SeedableRng;
    let seed = 20_250_101;
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (_, smol) = smollm2();
    let tiny = tiny();
    let mut held_back = 0;
    for _ in 0..300 {
        let text = random_text(&mut rng);
        for tok in [&smol, &tiny] {
            let ids = tok.encode(&text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
            let mut stream = tok.decode_stream(false);
            let mut streamed = String::new();
            for &id in &ids {
                match stream.step(id).unwrap() {
                    Some(piece) => {
                        assert!(!piece.contains('\u{FFFD}'), "{piece:?} from {text:?}");
                        streamed += &piece;
                    }
                    None => held_back += 1,
                }
            }
            assert_eq!(stream.flush().unwrap(), None);
            assert_eq!(streamed, text);
        }
    }
    // Characters split across tokens were exercised.
    assert!(held_back > 0);
}

#[test]
fn streaming_decode_of_multibyte_text_equals_full_decode() {
    let (_, tok) = smollm2();
    let text = "Paris 🇫🇷 est magnifique — 東京は大きい! 😀👍🏽 naïve café";
    let ids = tok.encode(text, false).unwrap();
    let mut stream = tok.decode_stream(false);
    let pieces: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
    assert!(pieces.iter().any(Option::is_none), "some character spans several tokens");
    assert_eq!(pieces.into_iter().flatten().collect::<String>(), tok.decode(&ids, false).unwrap());

    // An incomplete character at the end comes out on flush.
    let emoji = tok.encode("😀", false).unwrap();
    assert!(emoji.len() > 1);
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.step(emoji[0]).unwrap(), None);
    assert_eq!(stream.flush().unwrap().as_deref(), Some("\u{FFFD}"));

    // Skipped special tokens produce nothing.
    let mut stream = tok.decode_stream(true);
    assert_eq!(stream.step(2).unwrap(), None);
    assert_eq!(stream.step(tok.encode("Hi", false).unwrap()[0]).unwrap().as_deref(), Some("Hi"));
}

#[test]
fn out_of_range_ids_are_request_errors() {
    let (_, tok) = smollm2();
    assert!(matches!(tok.decode(&[5, 49152], false), Err(ModelError::Request(_))));
    assert!(matches!(tok.decode_stream(false).step(u32::MAX), Err(ModelError::Request(_))));
    let tiny = tiny();
    assert!(matches!(tiny.decode(&[4096], false), Err(ModelError::Request(_))));
}

#[test]
fn chat_template_hf_dialect() {
    let source = "{% set ns = namespace(sys='') %}\
        {% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content.strip() %}{% endif %}{% endfor %}\
        {{ bos_token }}[{{ ns.sys }}]\n\
        {% for m in messages if m.role != 'system' %}\
            {% if loop.index0 > 3 %}{% break %}{% endif %}\
            {{ m.role.upper() }}: {{ m.content.strip() }}{% if not loop.last %} | {% endif %}\
        {% endfor %}\
        {{ messages[-1] | tojson }}{% if add_generation_prompt %}{{ eos_token }}{% endif %}";
    let t = ChatTemplate::new(source).unwrap();
    let msgs = [ChatMessage::system("  be brief "), ChatMessage::user(" hi "), ChatMessage::assistant("yo")];
    let out = t.render(&msgs, true, "<s>", "</s>").unwrap();
    assert_eq!(out, "<s>[be brief]\nUSER: hi | ASSISTANT: yo{\"role\": \"assistant\", \"content\": \"yo\"}</s>");
    // json.dumps spacing and indentation, no HTML escaping, raw non-ASCII.
    let t = ChatTemplate::new("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}").unwrap();
    let out = t.render(&[ChatMessage::user("<b>&é")], false, "", "").unwrap();
    assert_eq!(
        out,
        "[{\"role\": \"user\", \"content\": \"<b>&é\"}]|{\n  \"role\": \"user\",\n  \"content\": \"<b>&é\"\n}"
    );

    // strftime_now gives a plausible date.
    let date = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}").unwrap().render(&[], false, "", "").unwrap();
    assert_eq!(date.len(), 10, "{date}");
    assert!(date.starts_with("20"), "{date}");

    let chatml = ChatTemplate::new(CHATML_TEMPLATE).unwrap().render(&[ChatMessage::user("x")], true, "", "").unwrap();
    assert_eq!(chatml, "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

#[test]
fn chat_template_errors_are_clear() {
    let e = ChatTemplate::new("{% for m in messages %}{{ m.content }").unwrap_err();
    assert!(matches!(&e, ModelError::Config(m) if m.contains("does not compile")), "{e}");

    let t = ChatTemplate::new(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}\
         {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
         {% endif %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    assert_eq!(t.render(&[ChatMessage::user("a"), ChatMessage::assistant("b")], false, "", "").unwrap(), "ab");
    let e = t.render(&[ChatMessage::assistant("b")], false, "", "").unwrap_err();
    assert!(matches!(&e, ModelError::Request(m) if m.contains("roles must alternate")), "{e}");
}
