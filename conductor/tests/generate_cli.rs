//! `tandem generate` as a user runs it: a real process, real model files,
//! JSON output checked against the transformers references.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn tandem_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tandem")
}

fn reference(stem: &str) -> Value {
    let path = fixtures().join("references").join(format!("{stem}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn generate_json(args: &[&str]) -> Value {
    let out = Command::new(tandem_bin()).arg("generate").args(args).arg("--json").output().unwrap();
    assert!(out.status.success(), "tandem generate failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn generate_reproduces_the_tiny_llama_reference() {
    let model = fixtures().join("tiny-llama-bf16");
    let refs = reference("tiny-llama-bf16__f32compute");
    for case in refs["cases"].as_array().unwrap() {
        let prompt: Vec<String> = ids(&case["prompt_ids"]).iter().map(u64::to_string).collect();
        for kv in ["f32", "bf16"] {
            let doc = generate_json(&[
                "--model",
                model.to_str().unwrap(),
                "--prompt-ids",
                &prompt.join(","),
                "--max-tokens",
                "32",
                "--ignore-eos",
                "--temperature",
                "0",
                "--exact",
                "--kv-dtype",
                kv,
            ]);
            assert_eq!(doc["prompt_ids"], case["prompt_ids"]);
            if kv == "f32" {
                assert_eq!(doc["generated_ids"], case["generated_ids"], "case {}", case["name"]);
            } else {
                assert_eq!(ids(&doc["generated_ids"]).len(), 32);
            }
            assert_eq!(doc["timings"]["prefill_tokens"].as_u64().unwrap() as usize, prompt.len());
            assert!(doc["timings"]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn generate_tokenizes_text_like_transformers() {
    let model = fixtures().join("tiny-llama-bf16");
    let refs = reference("tiny-llama-bf16__f32compute");
    let case = refs["cases"].as_array().unwrap().iter().find(|c| c["name"] == "text").unwrap();
    let doc = generate_json(&[
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt_text"].as_str().unwrap(),
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--exact",
    ]);
    assert_eq!(doc["prompt_ids"], case["prompt_ids"]);
    assert_eq!(doc["generated_ids"], case["generated_ids"]);
    assert_eq!(doc["text"], case["generated_text"]);
}

#[test]
fn generate_rejects_bad_input_with_a_clear_error() {
    let model = fixtures().join("tiny-llama-bf16");
    let run = |args: &[&str]| Command::new(tandem_bin()).arg("generate").args(args).output().unwrap();
    for (args, expect) in [
        (vec!["--model", model.to_str().unwrap(), "--prompt-ids", "1,99999"], "outside the vocabulary"),
        (vec!["--model", "/nonexistent/model", "--prompt", "hi"], "unknown model"),
        (vec!["--model", model.to_str().unwrap(), "--prompt", "hi", "--temperature", "-2"], "temperature"),
        (vec!["--model", model.to_str().unwrap(), "--prompt", "hi", "--device", "cuda"], "not compiled with CUDA"),
        (vec!["--model", model.to_str().unwrap()], "--prompt"),
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    let long: Vec<String> = (0..2100).map(|i| (3 + i % 4000).to_string()).collect();
    let out = run(&["--model", model.to_str().unwrap(), "--prompt-ids", &long.join(",")]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("context length"));
}
