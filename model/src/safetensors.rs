//! Hugging Face checkpoints: `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`,
//! memory-mapped; tensors are byte ranges of the maps, never copied.

use crate::error::{ModelError, Result};
use crate::weights::{Naming, TensorSource};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_kernels::{DType, SharedBytes, WeightMatrix};

/// The largest index file we accept (real ones are a few hundred KiB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

#[derive(Debug)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range within the file.
    start: usize,
    len: usize,
}

/// All tensors of a checkpoint directory.
#[derive(Debug)]
pub struct SafetensorsDir {
    dir: PathBuf,
    files: Vec<(PathBuf, SharedBytes)>,
    tensors: HashMap<String, TensorEntry>,
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    // SAFETY: the map is read-only; like every inference engine we rely on
    // model files not being truncated while in use.
    unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors`, or the shards listed by
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index.exists() {
            read_index(&index)?
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            return Err(ModelError::format(dir, "no model.safetensors or model.safetensors.index.json"));
        };
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for name in shard_names {
            if name.contains('/') || name.contains("..") {
                return Err(ModelError::format(&index, format!("shard name '{name}' is not a plain file name")));
            }
            let path = dir.join(&name);
            let map = map_file(&path)?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| ModelError::format(&path, format!("bad safetensors header: {e}")))?;
            let base = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let entry = TensorEntry {
                    file: files.len(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    len: e - s,
                };
                if tensors.insert(tname.clone(), entry).is_some() {
                    return Err(ModelError::format(&path, format!("tensor {tname} appears in two shards")));
                }
            }
            files.push((path, SharedBytes::new(Arc::new(map))));
        }
        Ok(Self { dir: dir.to_path_buf(), files, tensors })
    }

    /// Names of all tensors.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

fn read_index(path: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.len() > MAX_INDEX_BYTES {
        return Err(ModelError::format(path, "index file is implausibly large"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("not JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::format(path, "no 'weight_map' object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| ModelError::format(path, format!("weight_map[{tensor}] is not a file name")))?;
        shards.insert(file.to_string());
    }
    Ok(shards.into_iter().collect())
}

impl TensorSource for SafetensorsDir {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let e =
            self.tensors.get(name).ok_or_else(|| ModelError::format(&self.dir, format!("tensor {name} is missing")))?;
        let (path, bytes) = &self.files[e.file];
        let shape_ok = e.shape == [rows, cols] || (rows == 1 && e.shape == [cols]);
        if !shape_ok {
            return Err(ModelError::format(
                path,
                format!("tensor {name} has shape {:?}, expected [{rows}, {cols}]", e.shape),
            ));
        }
        let dtype = match e.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(ModelError::Unsupported(format!("tensor {name} has dtype {other:?}"))),
        };
        let data = bytes
            .slice(e.start, e.len)
            .ok_or_else(|| ModelError::format(path, format!("tensor {name} lies outside the file")))?;
        WeightMatrix::new(dtype, rows, cols, data)
            .map_err(|err| ModelError::format(path, format!("tensor {name}: {err}")))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn naming(&self) -> Naming {
        Naming::HuggingFace
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
