//! GGUF reader: the real SmolLM2 file, synthetic models through
//! `Weights::load`, and malformed files (every one an error, never a panic).

mod common;

use half::f16;
use tandem_kernels::DType;
use tandem_model::gguf::{GgufArray, GgufFile, GgufValue};
use tandem_model::weights::{unpermute_order, Naming, TensorSource, Weights};
use tandem_model::ModelError;

use common::smollm2_gguf;

// ---------------------------------------------------------------------------
// A minimal GGUF writer for synthetic files.

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
    /// Override of the computed data offset.
    offset: Option<u64>,
}

struct Writer {
    version: u32,
    alignment: usize,
    n_kv: u64,
    kv: Vec<u8>,
    tensors: Vec<Tensor>,
}

impl Writer {
    fn new() -> Self {
        Self { version: 3, alignment: 32, n_kv: 0, kv: Vec::new(), tensors: Vec::new() }
    }

    fn key(&mut self, key: &str, ty: u32) -> &mut Vec<u8> {
        self.n_kv += 1;
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        &mut self.kv
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.key(key, T_U32).extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, key: &str, v: u64) -> &mut Self {
        self.key(key, T_U64).extend(v.to_le_bytes());
        self
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.key(key, T_F32).extend(v.to_le_bytes());
        self
    }
    fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.key(key, T_BOOL).push(v as u8);
        self
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        put_str(self.key(key, T_STRING), v);
        self
    }
    fn strs(&mut self, key: &str, v: &[&str]) -> &mut Self {
        let out = self.key(key, T_ARRAY);
        out.extend(T_STRING.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        for s in v {
            put_str(out, s);
        }
        self
    }
    fn i32s(&mut self, key: &str, v: &[i32]) -> &mut Self {
        let out = self.key(key, T_ARRAY);
        out.extend(T_I32.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        for x in v {
            out.extend(x.to_le_bytes());
        }
        self
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(Tensor { name: name.into(), dims: dims.into(), ggml_type, data, offset: None });
        self
    }
    fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        self.tensor(name, dims, 0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn build(&self) -> Vec<u8> {
        let align = |n: usize| n.next_multiple_of(self.alignment);
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.ggml_type.to_le_bytes());
            out.extend(t.offset.unwrap_or(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len());
        }
        out.resize(align(out.len()), 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend(&t.data);
        }
        out
    }
}

/// A small valid file exercising every metadata type and two tensors.
fn small_file() -> Vec<u8> {
    let mut w = Writer::new();
    w.str("general.architecture", "llama").u32("general.alignment", 32).f32("some.float", 1.5).bool("some.bool", true);
    w.u64("some.u64", 1 << 40).strs("some.strings", &["a", "bc", ""]).i32s("some.ints", &[-1, 2, 3]);
    // A nested array: [[1u8, 2u8], []].
    let out = w.key("some.nested", T_ARRAY);
    out.extend(T_ARRAY.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    out.extend([1u8, 2]);
    out.extend(0u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    w.f32_tensor("norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]);
    w.f32_tensor("mat.weight", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    w.build()
}

#[test]
fn small_file_parses_every_value_type() {
    let f = GgufFile::from_bytes(small_file()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_f64("some.float").unwrap(), Some(1.5));
    assert_eq!(f.get_bool("some.bool").unwrap(), Some(true));
    assert_eq!(f.get_u64("some.u64").unwrap(), Some(1 << 40));
    assert_eq!(f.get_strings("some.strings").unwrap().unwrap(), ["a", "bc", ""]);
    assert_eq!(f.get_array("some.ints").unwrap().unwrap().to_i64s(), Some(vec![-1, 2, 3]));
    assert_eq!(
        f.get("some.nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![GgufArray::U8(vec![1, 2]), GgufArray::U8(vec![])])))
    );
    assert_eq!(f.get_u64("missing").unwrap(), None);
    // A value of the wrong type is an error naming the key.
    let e = f.get_u64("some.float").unwrap_err().to_string();
    assert!(e.contains("some.float") && e.contains("f32"), "{e}");
    assert!(f.get_u32("some.u64").is_err());

    assert_eq!(f.tensors().len(), 2);
    let m = f.matrix("mat.weight", 2, 3).unwrap();
    let mut row = vec![0f32; 3];
    m.dequantize_row(1, &mut row);
    assert_eq!(row, [4.0, 5.0, 6.0]);
    let v = f.matrix("norm.weight", 1, 4).unwrap();
    assert_eq!((v.rows(), v.cols(), v.dtype()), (1, 4, DType::F32));
    assert_eq!(f.tensor("mat.weight").unwrap().file_offset() % 32, 0);
    assert_eq!(f.naming(), Naming::Gguf);

    let e = f.matrix("mat.weight", 3, 2).unwrap_err();
    assert!(matches!(e, ModelError::Format { .. }), "{e}");
    assert!(e.to_string().contains("mat.weight"), "{e}");
    assert!(f.matrix("nope.weight", 1, 1).unwrap_err().to_string().contains("nope.weight"));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = small_file();
    for len in 0..full.len() {
        let r = GgufFile::from_bytes(full[..len].to_vec());
        assert!(r.is_err(), "a file truncated to {len} of {} bytes parsed", full.len());
    }
    assert!(GgufFile::from_bytes(full).is_ok());
}

#[test]
fn random_corruption_never_panics() {
    use rand::{Rng, SeedableRng};
    let seed = 0x6767_7566;
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let full = small_file();
    for _ in 0..5000 {
        let mut bytes = full.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        // Ok or Err are both fine; reading what parsed must not panic either.
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            for t in f.tensors() {
                let _ = f.tensor_bytes(t.name());
            }
            let _ = f.matrix("mat.weight", 2, 3);
            let _ = f.config();
        }
    }
}

fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend(n_tensors.to_le_bytes());
    out.extend(n_kv.to_le_bytes());
    out
}

fn err_of(bytes: Vec<u8>) -> String {
    GgufFile::from_bytes(bytes).unwrap_err().to_string()
}

#[test]
fn bad_magic_and_versions() {
    let mut bytes = small_file();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(err_of(bytes).contains("not a GGUF file"));
    assert!(matches!(GgufFile::from_bytes(header(1, 0, 0)), Err(ModelError::Unsupported(_))));
    assert!(err_of(header(99, 0, 0)).contains("version 99"));
    // v2 parses like v3.
    assert!(GgufFile::from_bytes(header(2, 0, 0)).is_ok());
    assert!(err_of(Vec::new()).contains("magic"));
}

#[test]
fn absurd_counts_and_lengths_are_rejected_before_allocating() {
    let e = err_of(header(3, 1 << 60, 0));
    assert!(e.contains("tensor count"), "{e}");
    let e = err_of(header(3, 0, 1 << 60));
    assert!(e.contains("key/value count"), "{e}");
    // A key whose length is 2^60.
    let mut b = header(3, 0, 1);
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 64]);
    assert!(err_of(b).contains("length of metadata key"));
    // A string value of length 2^60.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "k");
    b.extend(T_STRING.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    assert!(err_of(b).contains("metadata 'k'"));
    // A u64 array of 2^60 elements, and one of u64::MAX strings.
    for (ty, len) in [(T_U64, 1u64 << 60), (T_STRING, u64::MAX)] {
        let mut b = header(3, 0, 1);
        put_str(&mut b, "arr");
        b.extend(T_ARRAY.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend([0u8; 64]);
        let e = err_of(b);
        assert!(e.contains("length of metadata 'arr'"), "{e}");
    }
    // Arrays nested a thousand deep.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "deep");
    b.extend(T_ARRAY.to_le_bytes());
    for _ in 0..1000 {
        b.extend(T_ARRAY.to_le_bytes());
        b.extend(1u64.to_le_bytes());
    }
    assert!(err_of(b).contains("nests arrays deeper"));
    // Unknown value type, invalid bool, invalid UTF-8.
    let mut b = header(3, 0, 1);
    put_str(&mut b, "k");
    b.extend(77u32.to_le_bytes());
    assert!(err_of(b).contains("unknown value type 77"));
    let mut b = header(3, 0, 1);
    put_str(&mut b, "k");
    b.extend(T_BOOL.to_le_bytes());
    b.push(2);
    assert!(err_of(b).contains("bool"));
    let mut b = header(3, 0, 1);
    b.extend(2u64.to_le_bytes());
    b.extend([0xff, 0xfe]);
    b.extend([0u8; 16]);
    let e = err_of(b);
    assert!(e.contains("UTF-8"), "{e}");
}

#[test]
fn bad_tensor_infos_are_rejected() {
    let one = |dims: &[u64], ty: u32, data: Vec<u8>| {
        let mut w = Writer::new();
        w.tensor("t.weight", dims, ty, data);
        w
    };
    // Data beyond the end of the file.
    let mut w = one(&[8], 0, vec![0; 32]);
    w.tensors[0].offset = Some(1 << 20);
    let e = err_of(w.build());
    assert!(e.contains("t.weight") && e.contains("past the end"), "{e}");
    w.tensors[0].offset = Some(u64::MAX - 31);
    assert!(err_of(w.build()).contains("past the end"));
    // Data section cut short.
    let mut bytes = one(&[8], 0, vec![0; 32]).build();
    bytes.truncate(bytes.len() - 1);
    assert!(err_of(bytes).contains("past the end"));
    // Misaligned offset.
    let mut w = one(&[1], 0, vec![0; 4]);
    w.f32_tensor("u.weight", &[1], &[0.0]);
    w.tensors[1].offset = Some(36);
    assert!(err_of(w.build()).contains("not aligned"));
    // Unknown ggml type.
    let e = GgufFile::from_bytes(one(&[8], 99, vec![0; 32]).build()).unwrap_err();
    assert!(matches!(&e, ModelError::Unsupported(m) if m.contains("t.weight") && m.contains("99")), "{e}");
    // Dimension product overflow, too many dims, zero dims.
    assert!(err_of(one(&[1 << 32, 1 << 32, 1 << 32], 0, vec![]).build()).contains("overflow"));
    assert!(err_of(one(&[u64::MAX, 2], 0, vec![]).build()).contains("overflow"));
    assert!(err_of(one(&[1, 1, 1, 1, 1], 0, vec![0; 4]).build()).contains("5 dimensions"));
    assert!(err_of(one(&[], 0, vec![]).build()).contains("0 dimensions"));
    // A quantized row that is not a whole number of blocks.
    assert!(err_of(one(&[16], 8, vec![0; 34]).build()).contains("block size 32"));
    // Duplicates.
    let mut w = one(&[1], 0, vec![0; 4]);
    w.f32_tensor("t.weight", &[1], &[0.0]);
    assert!(err_of(w.build()).contains("appears twice"));
    let mut w = Writer::new();
    w.u32("a", 1).u32("a", 2);
    assert!(err_of(w.build()).contains("appears twice"));
    // Alignment that is not a power of two.
    let mut w = Writer::new();
    w.u32("general.alignment", 48);
    assert!(err_of(w.build()).contains("general.alignment"));
}

#[test]
fn known_but_unimplemented_types_fail_at_use_not_open() {
    // Q5_K (ggml type 13): 256 weights in 176 bytes.
    let mut w = Writer::new();
    w.tensor("q5k.weight", &[256, 2], 13, vec![0; 352]);
    let f = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(f.tensor("q5k.weight").unwrap().type_name(), "Q5_K");
    let e = f.matrix("q5k.weight", 2, 256).unwrap_err();
    assert!(matches!(&e, ModelError::Unsupported(m) if m.contains("Q5_K") && m.contains("q5k.weight")), "{e}");
}

// ---------------------------------------------------------------------------
// A tiny llama model, written as GGUF and loaded through `Weights::load`.

const VOCAB: usize = 64;
const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const FFN: usize = 64;
const LAYERS: usize = 2;

/// Deterministic, distinct values per tensor.
fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((seed * 7919 + i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// Q8_0 blocks for `values` with scale 1/64 (exactly representable).
fn q8_0(values: &[f32]) -> Vec<u8> {
    let d = 1.0 / 64.0;
    let mut out = Vec::new();
    for block in values.chunks(32) {
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| ((v / d).round() as i8) as u8));
    }
    out
}

fn tiny_llama(tied: bool) -> Writer {
    let mut w = Writer::new();
    let tokens: Vec<String> = (0..VOCAB).map(|i| format!("t{i}")).collect();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    w.str("general.architecture", "llama").u32("llama.embedding_length", HIDDEN as u32);
    w.u32("llama.feed_forward_length", FFN as u32).u32("llama.block_count", LAYERS as u32);
    w.u32("llama.attention.head_count", HEADS as u32).u32("llama.attention.head_count_kv", KV_HEADS as u32);
    w.f32("llama.rope.freq_base", 50_000.0).f32("llama.attention.layer_norm_rms_epsilon", 1e-5);
    w.u32("llama.context_length", 256).u32("llama.rope.dimension_count", HEAD_DIM as u32);
    w.strs("tokenizer.ggml.tokens", &tokens)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2);
    w.tensor("token_embd.weight", &[HIDDEN as u64, VOCAB as u64], 8, q8_0(&values(1, VOCAB * HIDDEN)));
    w.f32_tensor("output_norm.weight", &[HIDDEN as u64], &values(2, HIDDEN));
    if !tied {
        w.f32_tensor("output.weight", &[HIDDEN as u64, VOCAB as u64], &values(3, VOCAB * HIDDEN));
    }
    let (q, kv) = ((HEADS * HEAD_DIM) as u64, (KV_HEADS * HEAD_DIM) as u64);
    let (h, f) = (HIDDEN as u64, FFN as u64);
    for l in 0..LAYERS {
        let s = 10 * (l + 1);
        w.f32_tensor(&format!("blk.{l}.attn_norm.weight"), &[h], &values(s, HIDDEN));
        w.f32_tensor(&format!("blk.{l}.attn_q.weight"), &[h, q], &values(s + 1, (h * q) as usize));
        w.f32_tensor(&format!("blk.{l}.attn_k.weight"), &[h, kv], &values(s + 2, (h * kv) as usize));
        w.f32_tensor(&format!("blk.{l}.attn_v.weight"), &[h, kv], &values(s + 3, (h * kv) as usize));
        w.f32_tensor(&format!("blk.{l}.attn_output.weight"), &[q, h], &values(s + 4, (h * q) as usize));
        w.f32_tensor(&format!("blk.{l}.ffn_norm.weight"), &[h], &values(s + 5, HIDDEN));
        w.f32_tensor(&format!("blk.{l}.ffn_gate.weight"), &[h, f], &values(s + 6, (h * f) as usize));
        w.f32_tensor(&format!("blk.{l}.ffn_up.weight"), &[h, f], &values(s + 7, (h * f) as usize));
        w.f32_tensor(&format!("blk.{l}.ffn_down.weight"), &[f, h], &values(s + 8, (h * f) as usize));
    }
    w
}

fn row(m: &tandem_kernels::WeightMatrix, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.cols()];
    m.dequantize_row(r, &mut out);
    out
}

#[test]
fn synthetic_llama_loads_through_weights_load() {
    for tied in [true, false] {
        let f = GgufFile::from_bytes(tiny_llama(tied).build()).unwrap();
        let c = f.config().unwrap();
        assert_eq!((c.hidden_size, c.intermediate_size, c.num_layers), (HIDDEN, FFN, LAYERS));
        assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size), (HEADS, KV_HEADS, HEAD_DIM, VOCAB));
        assert_eq!((c.rope.theta, c.rms_norm_eps, c.max_position_embeddings), (50_000.0, 1e-5, 256));
        assert_eq!((c.bos_token_id, c.eos_token_ids.as_slice()), (Some(1), &[2][..]));
        assert_eq!(c.tie_word_embeddings, tied);
        assert!(!c.attention_bias);

        let w = Weights::load(&c, &f).unwrap();
        assert_eq!(w.embed.dtype(), DType::Q8_0);
        assert_eq!(
            row(&w.embed, 5),
            values(1, VOCAB * HIDDEN)[5 * HIDDEN..6 * HIDDEN]
                .iter()
                .map(|v| (v * 64.0).round() / 64.0)
                .collect::<Vec<_>>()
        );
        assert_eq!(w.lm_head.dtype(), if tied { DType::Q8_0 } else { DType::F32 });
        assert_eq!(w.final_norm, values(2, HIDDEN));
        let l1 = &w.layers[1];
        assert_eq!(l1.attn_norm, values(20, HIDDEN));
        // Q rows come back in Hugging Face order.
        let q_gguf = values(21, HEADS * HEAD_DIM * HIDDEN);
        for (hf_row, &gguf_row) in unpermute_order(HEADS, HEAD_DIM).iter().enumerate() {
            assert_eq!(row(&l1.wq, hf_row), q_gguf[gguf_row * HIDDEN..(gguf_row + 1) * HIDDEN]);
        }
        assert_eq!(row(&l1.wv, 3), values(23, KV_HEADS * HEAD_DIM * HIDDEN)[3 * HIDDEN..4 * HIDDEN]);
        assert_eq!((l1.w_down.rows(), l1.w_down.cols()), (HIDDEN, FFN));
    }
}

#[test]
fn synthetic_llama_config_errors() {
    // Wrong architecture.
    let mut other = Writer::new();
    other.str("general.architecture", "qwen2");
    let e = GgufFile::from_bytes(other.build()).unwrap().config().unwrap_err();
    assert!(matches!(&e, ModelError::Unsupported(m) if m.contains("qwen2")), "{e}");
    // A missing key is named.
    let mut missing = Writer::new();
    missing.str("general.architecture", "llama").u32("llama.embedding_length", 32);
    let e = GgufFile::from_bytes(missing.build()).unwrap().config().unwrap_err().to_string();
    assert!(e.contains("llama.attention.head_count"), "{e}");
    // A wrongly shaped tensor fails the load with its name.
    let mut bad = tiny_llama(true);
    let t = bad.tensors.iter_mut().find(|t| t.name == "blk.1.ffn_up.weight").unwrap();
    t.dims = vec![FFN as u64, HIDDEN as u64];
    let f = GgufFile::from_bytes(bad.build()).unwrap();
    let e = Weights::load(&f.config().unwrap(), &f).unwrap_err().to_string();
    assert!(e.contains("blk.1.ffn_up.weight"), "{e}");
}

// ---------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct file.

#[test]
fn smollm2_gguf_parses() {
    let f = GgufFile::open(smollm2_gguf()).unwrap();
    assert!(matches!(f.version(), 2 | 3));
    let c = f.config().unwrap();
    assert_eq!((c.num_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
    assert_eq!((c.rope.theta, c.rms_norm_eps), (100_000.0, 1e-5));
    assert!(c.tie_word_embeddings);

    let count = |name: &str| f.tensors().iter().filter(|t| t.type_name() == name).count();
    assert_eq!(count("Q4_1"), 210);
    assert_eq!(f.tensor("token_embd.weight").unwrap().type_name(), "Q8_0");
    assert_eq!(count("F32"), 61, "2 norms per layer and the final norm");
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_strings("tokenizer.ggml.merges").unwrap().unwrap().len(), 48_900);

    let w = Weights::load(&c, &f).unwrap();
    assert_eq!((w.embed.rows(), w.embed.cols(), w.embed.dtype()), (49152, 576, DType::Q8_0));
    assert_eq!(w.layers.len(), 30);
    assert_eq!(w.layers[0].wq.dtype(), DType::Q4_1);
    assert_eq!((w.layers[29].w_down.rows(), w.layers[29].w_down.cols()), (576, 1536));
    assert!(w.final_norm.iter().all(|v| v.is_finite()));
}
