//! Shared helpers for the model's reference tests.
#![allow(dead_code)]

use safetensors::SafeTensors;
use serde_json::Value;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// A reference case: prompt, greedy continuation and logits from
/// transformers (f32 compute).
pub struct Case {
    pub name: String,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub first_step_logits: Vec<f32>,
    pub prefill_logits: Vec<f32>,
    pub decode_logits: Vec<f32>,
    pub raw: Value,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Loads every case of `references/<stem>.json` with its tensors.
pub fn cases(stem: &str) -> Vec<Case> {
    let dir = fixtures().join("references");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join(json["tensors_file"].as_str().unwrap())).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            Case {
                prompt_ids: ids(&c["prompt_ids"]),
                generated_ids: ids(&c["generated_ids"]),
                first_step_logits: c["first_step_logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
                prefill_logits: tensor_f32(&st, &format!("{name}.prefill_logits")),
                decode_logits: tensor_f32(&st, &format!("{name}.decode_logits")),
                raw: c.clone(),
                name,
            }
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The SmolLM2 GGUF: `TANDEM_SMOLLM2_GGUF`, else the model cache, where
/// `tandem model fetch smollm2` puts it. Absent: a failure that says how
/// to get it, never a silent skip.
pub fn smollm2_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("TANDEM_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    match tandem_model::fetch::cached_path("smollm2") {
        Some(p) => p,
        None => {
            panic!("SmolLM2 is not in the model cache: run `tandem model fetch smollm2` (or ./scripts/test.sh) first")
        }
    }
}
