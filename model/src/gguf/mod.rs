//! GGUF files: metadata, memory-mapped tensors, the model config, and (in
//! [`tokenizer`](self::tokenizer)) the embedded tokenizer.
//!
//! The file is mapped once; tensors are [`SharedBytes`] ranges of the map,
//! so loading copies no weight data. Everything in the header is checked
//! before use (see `reader`): counts and lengths against the bytes left,
//! tensor extents and alignment against the data section.

mod config;
mod metadata;
mod reader;
pub(crate) mod tokenizer;

pub use metadata::{GgufArray, GgufValue};

use crate::error::{ModelError, Result};
use crate::weights::{Naming, TensorSource};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_kernels::{DType, SharedBytes, WeightMatrix};

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Larger alignments are rejected as nonsense.
const MAX_ALIGNMENT: usize = 1 << 20;

/// One tensor of a GGUF file, checked to lie inside the data section.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    type_name: &'static str,
    /// Offset from the start of the file.
    start: usize,
    size_bytes: usize,
}

impl GgufTensorInfo {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// ggml order: `dims()[0]` is the innermost (contiguous) dimension.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }
    /// The ggml type id.
    pub fn ggml_type(&self) -> u32 {
        self.ggml_type
    }
    /// The ggml type name (`"Q4_1"`, `"F32"`, …).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
    /// The kernel dtype, when the kernels support this ggml type.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_ggml_type(self.ggml_type)
    }
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }
    /// Offset of the tensor's data from the start of the file.
    pub fn file_offset(&self) -> usize {
        self.start
    }
    pub fn n_elements(&self) -> u64 {
        // Checked at open not to overflow.
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: SharedBytes,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only. As with every mmap-based loader, we
        // rely on the model file not being truncated or rewritten while it
        // is in use; all offsets into it are validated against its length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(SharedBytes::new(Arc::new(mmap)), path.to_path_buf())
    }

    /// Parses a GGUF image held in memory (tests, downloads in flight).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(SharedBytes::from_vec(bytes), PathBuf::from("<memory>"))
    }

    fn parse(bytes: SharedBytes, path: PathBuf) -> Result<Self> {
        let header = reader::parse_header(bytes.as_slice(), &path)?;
        let mut metadata_index = HashMap::with_capacity(header.metadata.len());
        for (i, (key, _)) in header.metadata.iter().enumerate() {
            if metadata_index.insert(key.clone(), i).is_some() {
                return Err(ModelError::format(&path, format!("metadata key '{key}' appears twice")));
            }
        }
        let mut file = Self {
            path,
            bytes,
            version: header.version,
            alignment: DEFAULT_ALIGNMENT,
            data_offset: 0,
            metadata: header.metadata,
            metadata_index,
            tensors: Vec::new(),
            tensor_index: HashMap::new(),
        };
        if let Some(a) = file.get_u64("general.alignment")? {
            match usize::try_from(a) {
                Ok(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => file.alignment = a,
                _ => {
                    return Err(file
                        .format_err(format!("general.alignment = {a} is not a power of two in 1..={MAX_ALIGNMENT}")))
                }
            }
        }
        file.data_offset = header
            .end
            .checked_next_multiple_of(file.alignment)
            .ok_or_else(|| file.format_err("data section offset overflows"))?;
        let data_len = file.bytes.len().saturating_sub(file.data_offset);
        file.tensors.reserve(header.tensors.len());
        for raw in header.tensors {
            let info = file.check_tensor(raw, data_len)?;
            if file.tensor_index.insert(info.name.clone(), file.tensors.len()).is_some() {
                return Err(file.format_err(format!("tensor '{}' appears twice", info.name)));
            }
            file.tensors.push(info);
        }
        Ok(file)
    }

    /// Checks a tensor's type, shape and extent against the data section.
    fn check_tensor(&self, raw: reader::RawTensorInfo, data_len: usize) -> Result<GgufTensorInfo> {
        let name = &raw.name;
        let (type_name, block_elems, block_bytes) = reader::ggml_type_info(raw.ggml_type).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "{}: tensor '{name}' has unknown ggml type {}",
                self.path.display(),
                raw.ggml_type
            ))
        })?;
        let shape = format!("{:?}", raw.dims);
        let n_elements = raw.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let inner = raw.dims[0];
        let size = n_elements
            .filter(|&n| n <= i64::MAX as u64)
            .and_then(|n| (n / block_elems as u64).checked_mul(block_bytes as u64))
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| self.format_err(format!("tensor '{name}' with dims {shape} is too large (overflow)")))?;
        if !inner.is_multiple_of(block_elems as u64) {
            return Err(self.format_err(format!(
                "tensor '{name}' ({type_name}) has inner dimension {inner}, not a multiple of its block size {block_elems}"
            )));
        }
        if !raw.offset.is_multiple_of(self.alignment as u64) {
            return Err(self.format_err(format!(
                "tensor '{name}' offset {} is not aligned to {} bytes",
                raw.offset, self.alignment
            )));
        }
        let end = raw.offset.checked_add(size as u64);
        if end.is_none_or(|end| end > data_len as u64) {
            return Err(self.format_err(format!(
                "tensor '{name}' ({type_name} {shape}, {size} bytes at data offset {}) extends past the end of the file \
                 (data section is {data_len} bytes; truncated file?)",
                raw.offset
            )));
        }
        Ok(GgufTensorInfo {
            start: self.data_offset + raw.offset as usize,
            size_bytes: size,
            name: raw.name,
            dims: raw.dims,
            ggml_type: raw.ggml_type,
            type_name,
        })
    }

    pub(crate) fn format_err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::format(&self.path, reason)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Alignment of tensor data, from `general.alignment` (default 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Offset of the tensor data section from the start of the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn typed<'a, T>(&'a self, key: &str, want: &str, f: impl FnOnce(&'a GgufValue) -> Option<T>) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => f(v).map(Some).ok_or_else(|| {
                self.format_err(format!("metadata '{key}' is {} {v:.60?}, expected {want}", v.type_name()))
            }),
        }
    }

    /// A non-negative integer of any integer type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", |v| v.as_int().and_then(|i| u64::try_from(i).ok()))
    }

    /// A non-negative integer that fits `u32` (token ids, small counts).
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer in u32 range", |v| v.as_int().and_then(|i| u32::try_from(i).ok()))
    }

    /// A non-negative integer that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", |v| v.as_int().and_then(|i| usize::try_from(i).ok()))
    }

    /// A float (or integer) value.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&GgufArray>> {
        self.typed(key, "an array", GgufValue::as_array)
    }

    /// An array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Option<&[String]>> {
        self.typed(key, "an array of strings", |v| v.as_array().and_then(GgufArray::as_strings))
    }

    /// `general.architecture` (required by the format).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?
            .ok_or_else(|| self.format_err("metadata 'general.architecture' is missing"))
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor's raw bytes (a view of the map, no copy).
    pub fn tensor_bytes(&self, name: &str) -> Result<SharedBytes> {
        let t = self.tensor(name).ok_or_else(|| self.format_err(format!("tensor '{name}' is missing")))?;
        self.bytes
            .slice(t.start, t.size_bytes)
            .ok_or_else(|| self.format_err(format!("tensor '{name}' lies outside the file")))
    }
}

impl TensorSource for GgufFile {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightMatrix> {
        let t = self.tensor(name).ok_or_else(|| self.format_err(format!("tensor '{name}' is missing")))?;
        // ggml order: ne[0] is the row length; a 1-D tensor is one row;
        // trailing dimensions of 1 do not change the shape.
        let (ne0, ne1) = (t.dims[0], t.dims.get(1).copied().unwrap_or(1));
        let extra = t.dims.iter().skip(2).any(|&d| d != 1);
        if extra || ne0 != cols as u64 || ne1 != rows as u64 {
            return Err(self.format_err(format!(
                "tensor '{name}' has ggml dims {:?}, expected {rows} rows × {cols} columns (dims [{cols}, {rows}])",
                t.dims
            )));
        }
        let dtype = t.dtype().ok_or_else(|| {
            ModelError::Unsupported(format!(
                "{}: tensor '{name}' has ggml type {} ({}), which the kernels do not implement",
                self.path.display(),
                t.type_name,
                t.ggml_type
            ))
        })?;
        Ok(WeightMatrix::new(dtype, rows, cols, self.tensor_bytes(name)?)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }

    fn naming(&self) -> Naming {
        Naming::Gguf
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
