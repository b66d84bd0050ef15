//! Fuzz targets of the model file parsers (see `fuzz/README.md`):
//!
//! - `gguf`: [`GgufFile`] on generated valid files (every metadata type,
//!   nested arrays, quantized and float tensors), which must read back what
//!   was written, and on those files and the corpus mutated; parsed from
//!   memory and memory-mapped from a file. Whatever parses must also survive
//!   every accessor, `config()` and the embedded tokenizer.
//! - `safetensors`: [`SafetensorsDir`] on generated valid checkpoints and
//!   mutations of them (the 8-byte header length, the JSON header, the data).
//!
//! Every input gives `Ok` or an error, never a panic, and parsing allocates
//! in proportion to the file, whatever lengths and counts it claims.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use proptest::prelude::*;
use tandem_model::gguf::{GgufArray, GgufFile, GgufValue};
use tandem_model::safetensors::SafetensorsDir;
use tandem_model::tokenizer::Tokenizer;
use tandem_model::weights::TensorSource;

/// Parsing may hold a few times the file (decoded strings, tensor tables)
/// plus a constant; a length or count the file cannot back must be refused
/// before it is allocated.
fn alloc_limit(input_len: usize) -> usize {
    (256 << 10) + 16 * input_len
}

// -------------------------------------------------------------------- gguf

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Element type id and encoding of a metadata array.
fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    fn items<T>(out: &mut Vec<u8>, ty: u32, v: &[T], f: impl Fn(&mut Vec<u8>, &T)) {
        out.extend(ty.to_le_bytes());
        out.extend((v.len() as u64).to_le_bytes());
        v.iter().for_each(|x| f(out, x));
    }
    match a {
        GgufArray::U8(v) => items(out, 0, v, |o, x| o.push(*x)),
        GgufArray::I32(v) => items(out, 5, v, |o, x| o.extend(x.to_le_bytes())),
        GgufArray::F32(v) => items(out, 6, v, |o, x| o.extend(x.to_le_bytes())),
        GgufArray::U64(v) => items(out, 10, v, |o, x| o.extend(x.to_le_bytes())),
        GgufArray::Bool(v) => items(out, 7, v, |o, x| o.push(u8::from(*x))),
        GgufArray::String(v) => items(out, 8, v, |o, x| put_str(o, x)),
        GgufArray::Array(v) => items(out, 9, v, put_array),
        other => unreachable!("not generated: {other:?}"),
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    let (ty, bytes): (u32, Vec<u8>) = match v {
        GgufValue::U8(x) => (0, vec![*x]),
        GgufValue::I8(x) => (1, x.to_le_bytes().to_vec()),
        GgufValue::U16(x) => (2, x.to_le_bytes().to_vec()),
        GgufValue::I16(x) => (3, x.to_le_bytes().to_vec()),
        GgufValue::U32(x) => (4, x.to_le_bytes().to_vec()),
        GgufValue::I32(x) => (5, x.to_le_bytes().to_vec()),
        GgufValue::F32(x) => (6, x.to_le_bytes().to_vec()),
        GgufValue::Bool(x) => (7, vec![u8::from(*x)]),
        GgufValue::String(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
            return;
        }
        GgufValue::Array(a) => {
            out.extend(9u32.to_le_bytes());
            put_array(out, a);
            return;
        }
        GgufValue::U64(x) => (10, x.to_le_bytes().to_vec()),
        GgufValue::I64(x) => (11, x.to_le_bytes().to_vec()),
        GgufValue::F64(x) => (12, x.to_le_bytes().to_vec()),
    };
    out.extend(ty.to_le_bytes());
    out.extend(bytes);
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![proptest::string::string_regex("[a-z.Ġ ]{0,12}").unwrap(), any::<String>()]
}

fn array() -> impl Strategy<Value = GgufArray> {
    let leaf = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(GgufArray::U8),
        proptest::collection::vec(any::<i32>(), 0..8).prop_map(GgufArray::I32),
        proptest::collection::vec(-1e6f32..1e6, 0..8).prop_map(GgufArray::F32),
        proptest::collection::vec(any::<u64>(), 0..4).prop_map(GgufArray::U64),
        proptest::collection::vec(any::<bool>(), 0..8).prop_map(GgufArray::Bool),
        proptest::collection::vec(text(), 0..8).prop_map(GgufArray::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| proptest::collection::vec(inner, 0..4).prop_map(GgufArray::Array))
}

fn value() -> impl Strategy<Value = GgufValue> {
    prop_oneof![
        any::<u8>().prop_map(GgufValue::U8),
        any::<i8>().prop_map(GgufValue::I8),
        any::<u16>().prop_map(GgufValue::U16),
        any::<i16>().prop_map(GgufValue::I16),
        any::<u32>().prop_map(GgufValue::U32),
        any::<i32>().prop_map(GgufValue::I32),
        any::<u64>().prop_map(GgufValue::U64),
        any::<i64>().prop_map(GgufValue::I64),
        (-1e30f32..1e30).prop_map(GgufValue::F32),
        (-1e300f64..1e300).prop_map(GgufValue::F64),
        any::<bool>().prop_map(GgufValue::Bool),
        text().prop_map(GgufValue::String),
        array().prop_map(GgufValue::Array),
    ]
}

/// Keys llama files carry, so mutations reach `config()` and the tokenizer.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("general.architecture".to_string()),
        Just("general.alignment".to_string()),
        Just("llama.embedding_length".to_string()),
        Just("llama.attention.head_count".to_string()),
        Just("llama.context_length".to_string()),
        Just("tokenizer.ggml.model".to_string()),
        Just("tokenizer.ggml.tokens".to_string()),
        Just("tokenizer.ggml.merges".to_string()),
        Just("tokenizer.ggml.bos_token_id".to_string()),
        proptest::string::string_regex("[a-z]{1,6}(\\.[a-z_]{1,8}){0,2}").unwrap(),
    ]
}

/// A generated tensor: name, ggml dims, type, data.
#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

fn tensor() -> impl Strategy<Value = Tensor> {
    // (type, elements per block, bytes per block): F32, F16, Q4_0, Q8_0, BF16.
    let ty =
        prop_oneof![Just((0u32, 1u64, 4u64)), Just((1, 1, 2)), Just((2, 32, 18)), Just((8, 32, 34)), Just((30, 1, 2))];
    (ty, 1u64..4, 1u64..4, any::<bool>(), "[a-z]{1,8}\\.weight", any::<u8>()).prop_map(
        |((ggml_type, block, bytes), blocks, rows, two_d, name, fill)| {
            let dims = if two_d { vec![blocks * block, rows] } else { vec![blocks * block] };
            let n = dims.iter().product::<u64>() / block * bytes;
            Tensor { name, dims, ggml_type, data: vec![fill; n as usize] }
        },
    )
}

/// A valid GGUF file and what it holds.
#[derive(Debug, Clone)]
struct GgufSpec {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<Tensor>,
    alignment: usize,
}

fn gguf_spec() -> impl Strategy<Value = GgufSpec> {
    let alignment = prop_oneof![Just(32usize), Just(1), Just(64)];
    (proptest::collection::vec((key(), value()), 0..8), proptest::collection::vec(tensor(), 0..4), alignment).prop_map(
        |(kv, tensors, alignment)| {
            // Keys and names are unique in a valid file; the alignment key
            // is written by `gguf_bytes`.
            let mut seen = std::collections::HashSet::new();
            let metadata = kv.into_iter().filter(|(k, _)| k != "general.alignment" && seen.insert(k.clone())).collect();
            let mut names = std::collections::HashSet::new();
            let tensors = tensors.into_iter().filter(|t| names.insert(t.name.clone())).collect();
            GgufSpec { metadata, tensors, alignment }
        },
    )
}

fn gguf_bytes(spec: &GgufSpec) -> Vec<u8> {
    let align = |n: usize| n.next_multiple_of(spec.alignment);
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((spec.tensors.len() as u64).to_le_bytes());
    out.extend((spec.metadata.len() as u64 + 1).to_le_bytes());
    put_str(&mut out, "general.alignment");
    put_value(&mut out, &GgufValue::U32(spec.alignment as u32));
    for (k, v) in &spec.metadata {
        put_str(&mut out, k);
        put_value(&mut out, v);
    }
    let mut offset = 0;
    let mut offsets = Vec::new();
    for t in &spec.tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ggml_type.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = align(offset + t.data.len());
    }
    out.resize(align(out.len()), 0);
    let start = out.len();
    for (t, off) in spec.tensors.iter().zip(offsets) {
        out.resize(start + off, 0);
        out.extend(&t.data);
    }
    out
}

fn valid_gguf() -> BoxedStrategy<Vec<u8>> {
    gguf_spec().prop_map(|s| gguf_bytes(&s)).boxed()
}

/// Uses everything a parsed file offers; none of it may panic.
fn exercise_gguf(f: &GgufFile) {
    for (k, _) in f.metadata() {
        let _ = (f.get_u64(k), f.get_u32(k), f.get_f64(k), f.get_bool(k), f.get_str(k), f.get_strings(k));
        if let Ok(Some(a)) = f.get_array(k) {
            let _ = (a.len(), a.to_i64s(), a.element_type_name());
        }
    }
    for t in f.tensors() {
        let bytes = f.tensor_bytes(t.name()).expect("a listed tensor lies inside the file");
        assert_eq!(bytes.len(), t.size_bytes());
        let dims = t.dims();
        let (cols, rows) = (dims[0] as usize, dims.get(1).copied().unwrap_or(1) as usize);
        let _ = f.matrix(t.name(), rows, cols);
    }
    let _ = f.config();
    if let Ok(tok) = Tokenizer::from_gguf(f) {
        let _ = tok.encode("Hello, world! 123", true);
    }
}

fn check_gguf(bytes: &[u8], file: &Path) -> Result<(), String> {
    let (parsed, alloc) = harness::measure(|| GgufFile::from_bytes(bytes.to_vec()));
    // The copy handed to `from_bytes` is the input's own size.
    harness::check_alloc(alloc, alloc_limit(bytes.len()) + bytes.len(), bytes.len())?;
    std::fs::write(file, bytes).map_err(|e| e.to_string())?;
    let mapped = GgufFile::open(file);
    match (&parsed, &mapped) {
        (Ok(a), Ok(b)) if a.tensors().len() == b.tensors().len() && a.metadata().count() == b.metadata().count() => {}
        (Err(_), Err(_)) => {}
        _ => return Err(format!("from memory: {parsed:?}; memory-mapped: {mapped:?}")),
    }
    if let Ok(f) = &mapped {
        exercise_gguf(f);
    }
    Ok(())
}

#[test]
fn generated_gguf_files_read_back_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    // Runs on the spec itself (the failure report shows it); the corpus is
    // replayed by the mutation test.
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: harness::cases(256),
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&gguf_spec(), |spec| {
            let bytes = gguf_bytes(&spec);
            let f = GgufFile::from_bytes(bytes.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(f.alignment(), spec.alignment);
            for (k, v) in &spec.metadata {
                prop_assert_eq!(f.get(k), Some(v), "metadata {}", k);
            }
            prop_assert_eq!(f.tensors().len(), spec.tensors.len());
            for t in &spec.tensors {
                let info = f.tensor(&t.name).unwrap();
                prop_assert_eq!(info.dims(), &t.dims[..]);
                prop_assert_eq!(info.file_offset() % spec.alignment, 0);
                let bytes = f.tensor_bytes(&t.name).unwrap();
                prop_assert_eq!(bytes.as_slice(), &t.data[..]);
            }
            check_gguf(&bytes, &file).map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[test]
fn mutated_gguf_files_parse_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    let seeds: Vec<Vec<u8>> = harness::corpus("gguf").into_iter().map(|(_, b)| b).collect();
    let strategy = prop_oneof![
        harness::mutated_from(valid_gguf(), seeds.clone()),
        harness::mutated(seeds),
        proptest::collection::vec(any::<u8>(), 0..256).prop_map(|mut b| {
            // Past the magic and version, so the counts are reached.
            let mut v = b"GGUF\x03\0\0\0".to_vec();
            v.append(&mut b);
            v
        }),
    ];
    harness::fuzz("gguf", 768, strategy.boxed(), |b| check_gguf(b, &file));
}

// ------------------------------------------------------------- safetensors

/// A generated tensor: name, safetensors dtype, shape, data.
fn st_tensor() -> impl Strategy<Value = (String, &'static str, Vec<usize>, Vec<u8>)> {
    let dtype = prop_oneof![Just(("F32", 4usize)), Just(("F16", 2)), Just(("BF16", 2)), Just(("I64", 8))];
    (dtype, 1usize..5, 1usize..5, any::<bool>(), "model\\.[a-z]{1,6}\\.weight", any::<u8>()).prop_map(
        |((dtype, width), rows, cols, two_d, name, fill)| {
            let shape = if two_d { vec![rows, cols] } else { vec![cols] };
            let n = shape.iter().product::<usize>() * width;
            (name, dtype, shape, vec![fill; n])
        },
    )
}

type StTensors = Vec<(String, &'static str, Vec<usize>, Vec<u8>)>;

fn st_bytes(tensors: &StTensors, pad: usize) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0;
    for (name, dtype, shape, data) in tensors {
        let end = offset + data.len();
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len() + pad, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    tensors.iter().for_each(|t| out.extend(&t.3));
    out
}

fn st_spec() -> impl Strategy<Value = StTensors> {
    proptest::collection::vec(st_tensor(), 0..5).prop_map(|v| {
        let mut names = std::collections::HashSet::new();
        v.into_iter().filter(|t| names.insert(t.0.clone())).collect()
    })
}

fn check_safetensors(bytes: &[u8], dir: &Path) -> Result<(), String> {
    std::fs::write(dir.join("model.safetensors"), bytes).map_err(|e| e.to_string())?;
    let (opened, alloc) = harness::measure(|| SafetensorsDir::open(dir));
    harness::check_alloc(alloc, alloc_limit(bytes.len()), bytes.len())?;
    if let Ok(st) = opened {
        let names: Vec<String> = st.tensor_names().map(str::to_owned).collect();
        for name in names {
            // Shapes are not exposed: ask for a few, the right one among them
            // for generated files.
            for (rows, cols) in [(1, 1), (1, 4), (4, 4), (2, 3), (usize::MAX, 2)] {
                let _ = st.matrix(&name, rows, cols);
            }
        }
    }
    Ok(())
}

#[test]
fn generated_safetensors_load_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: harness::cases(256),
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&(st_spec(), 0usize..16), |(tensors, pad)| {
            let bytes = st_bytes(&tensors, pad);
            check_safetensors(&bytes, dir.path()).map_err(TestCaseError::fail)?;
            let st = SafetensorsDir::open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(st.tensor_names().count(), tensors.len());
            for (name, dtype, shape, _) in &tensors {
                let (rows, cols) = if shape.len() == 2 { (shape[0], shape[1]) } else { (1, shape[0]) };
                let m = st.matrix(name, rows, cols);
                if *dtype == "I64" {
                    prop_assert!(m.is_err(), "{} loaded as {:?}", dtype, m);
                } else {
                    let m = m.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!((m.rows(), m.cols()), (rows, cols));
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_safetensors_open_or_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let seeds: Vec<Vec<u8>> = harness::corpus("safetensors").into_iter().map(|(_, b)| b).collect();
    let valid = (st_spec(), 0usize..16).prop_map(|(t, pad)| st_bytes(&t, pad)).boxed();
    let strategy = prop_oneof![harness::mutated_from(valid, seeds.clone()), harness::mutated(seeds)];
    harness::fuzz("safetensors", 768, strategy.boxed(), |b| check_safetensors(b, dir.path()));
}

/// Writes the valid seeds of both targets into `fuzz/corpus/`
/// (`-- --ignored write_model_seed_corpus`); found crashes sit beside them.
#[test]
#[ignore = "rewrites the committed seed corpus"]
fn write_model_seed_corpus() {
    let corpus = harness::fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(corpus.join(target)).unwrap();
        std::fs::write(corpus.join(target).join(name), bytes).unwrap();
    };
    let metadata = vec![
        ("general.architecture".to_string(), GgufValue::String("llama".into())),
        ("llama.embedding_length".into(), GgufValue::U32(8)),
        ("llama.attention.head_count".into(), GgufValue::U32(2)),
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(GgufArray::String(vec!["a".into(), "b".into(), "ab".into()])),
        ),
        ("tokenizer.ggml.merges".into(), GgufValue::Array(GgufArray::String(vec!["a b".into()]))),
        ("nested".into(), GgufValue::Array(GgufArray::Array(vec![GgufArray::U8(vec![1, 2]), GgufArray::Bool(vec![])]))),
    ];
    let tensors = vec![
        Tensor { name: "token_embd.weight".into(), dims: vec![8, 3], ggml_type: 0, data: vec![0; 96] },
        Tensor { name: "blk.0.attn_q.weight".into(), dims: vec![32, 2], ggml_type: 8, data: vec![1; 68] },
    ];
    put("gguf", "llama-tokenizer.gguf", &gguf_bytes(&GgufSpec { metadata, tensors, alignment: 32 }));
    put("gguf", "empty.gguf", &gguf_bytes(&GgufSpec { metadata: vec![], tensors: vec![], alignment: 32 }));
    let t = vec![
        ("model.norm.weight".to_string(), "F32", vec![4], vec![0u8; 16]),
        ("model.embed.weight".to_string(), "BF16", vec![2, 3], vec![0x3f; 12]),
    ];
    put("safetensors", "two-tensors.safetensors", &st_bytes(&t, 0));
    put("safetensors", "empty.safetensors", &st_bytes(&vec![], 3));
}
