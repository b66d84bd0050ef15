//! Bounds-checked parsing of a GGUF header (v2/v3): metadata and tensor
//! infos. Every length and count is checked against the bytes that are left
//! before anything is allocated, so a malformed or truncated file yields an
//! error, never a panic or an allocation larger than the file.

use super::metadata::{GgufArray, GgufValue};
use crate::error::{ModelError, Result};
use std::path::Path;

/// `"GGUF"` as a little-endian u32.
pub(crate) const MAGIC: &[u8; 4] = b"GGUF";
/// Arrays of arrays deeper than this are rejected (recursion bound).
const MAX_ARRAY_DEPTH: usize = 8;
/// ggml tensors have at most four dimensions.
pub(crate) const MAX_DIMS: usize = 4;

/// A tensor as described in the header, not yet checked against the data.
#[derive(Debug)]
pub(crate) struct RawTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

#[derive(Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<RawTensorInfo>,
    /// Where the header (and its tensor infos) ends, before alignment padding.
    pub end: usize,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: impl std::fmt::Display) -> ModelError {
        ModelError::format(self.path, format!("GGUF header at byte {}: {reason}", self.pos))
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(
                self.err(format!("{what} needs {n} bytes but only {} remain (truncated file?)", self.remaining()))
            );
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items each taking at least `min_item_bytes`, bounded by
    /// the bytes left so that no allocation can exceed the file's size.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let max = self.remaining() / min_item_bytes.max(1);
        match usize::try_from(n) {
            Ok(n) if n <= max => Ok(n),
            _ => {
                Err(self.err(format!("{what} is {n}, but the {} bytes left can hold at most {max}", self.remaining())))
            }
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(&format!("length of {what}"), 1)?;
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            ModelError::format(self.path, format!("GGUF header at byte {start}: {what} is not valid UTF-8: {e}"))
        })
    }

    fn vec<T, const N: usize>(&mut self, n: usize, what: &str, f: fn([u8; N]) -> T) -> Result<Vec<T>> {
        // `n` came from `count(.., N)`, so this stays within the file.
        let bytes = self.take(n * N, what)?;
        Ok(bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect())
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(what)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.bool(what)?),
            8 => GgufValue::String(self.string(what)?),
            9 => GgufValue::Array(self.array_value(what, depth + 1)?),
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.err(format!("{what} has unknown value type {other}"))),
        })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{what} is a bool with byte value {b}"))),
        }
    }

    fn array_value(&mut self, what: &str, depth: usize) -> Result<GgufArray> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.err(format!("{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")));
        }
        let ty = self.u32(&format!("element type of {what}"))?;
        let len_what = format!("length of {what}");
        Ok(match ty {
            0 => GgufArray::U8(self.vec_of::<_, 1>(&len_what, what, |b| b[0])?),
            1 => GgufArray::I8(self.vec_of::<_, 1>(&len_what, what, i8::from_le_bytes)?),
            2 => GgufArray::U16(self.vec_of::<_, 2>(&len_what, what, u16::from_le_bytes)?),
            3 => GgufArray::I16(self.vec_of::<_, 2>(&len_what, what, i16::from_le_bytes)?),
            4 => GgufArray::U32(self.vec_of::<_, 4>(&len_what, what, u32::from_le_bytes)?),
            5 => GgufArray::I32(self.vec_of::<_, 4>(&len_what, what, i32::from_le_bytes)?),
            6 => GgufArray::F32(self.vec_of::<_, 4>(&len_what, what, f32::from_le_bytes)?),
            10 => GgufArray::U64(self.vec_of::<_, 8>(&len_what, what, u64::from_le_bytes)?),
            11 => GgufArray::I64(self.vec_of::<_, 8>(&len_what, what, i64::from_le_bytes)?),
            12 => GgufArray::F64(self.vec_of::<_, 8>(&len_what, what, f64::from_le_bytes)?),
            7 => {
                let n = self.count(&len_what, 1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(what)?);
                }
                GgufArray::Bool(v)
            }
            8 => {
                // Each string is at least its 8-byte length.
                let n = self.count(&len_what, 8)?;
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.string(&format!("{what}[{i}]"))?);
                }
                GgufArray::String(v)
            }
            9 => {
                // Each nested array is at least its type and length.
                let n = self.count(&len_what, 12)?;
                let mut v = Vec::with_capacity(n);
                for i in 0..n {
                    v.push(self.array_value(&format!("{what}[{i}]"), depth + 1)?);
                }
                GgufArray::Array(v)
            }
            other => return Err(self.err(format!("{what} has unknown element type {other}"))),
        })
    }

    fn vec_of<T, const N: usize>(&mut self, len_what: &str, what: &str, f: fn([u8; N]) -> T) -> Result<Vec<T>> {
        let n = self.count(len_what, N)?;
        self.vec(n, what, f)
    }
}

/// Parses everything before the tensor data.
pub(crate) fn parse_header(data: &[u8], path: &Path) -> Result<Header> {
    let mut c = Cursor { data, pos: 0, path };
    let magic = c.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(ModelError::format(
            path,
            format!("not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\""),
        ));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err(ModelError::Unsupported(format!("{}: GGUF version 1 (re-convert the model)", path.display()))),
        v => return Err(ModelError::format(path, format!("unknown GGUF version {v}"))),
    }
    // A tensor info is at least name length (8) + n_dims (4) + type (4) +
    // offset (8); a key/value at least key length (8) + type (4) + 1 byte.
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata key/value count", 13)?;
    let mut metadata = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("type of metadata '{key}'"))?;
        let value = c.value(ty, &format!("metadata '{key}'"), 0)?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let n_dims = c.u32(&format!("dimension count of tensor '{name}'"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.err(format!("tensor '{name}' has {n_dims} dimensions (must be 1..={MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            dims.push(c.u64(&format!("dimension {d} of tensor '{name}'"))?);
        }
        let ggml_type = c.u32(&format!("type of tensor '{name}'"))?;
        let offset = c.u64(&format!("offset of tensor '{name}'"))?;
        tensors.push(RawTensorInfo { name, dims, ggml_type, offset });
    }
    Ok(Header { version, metadata, tensors, end: c.pos })
}

/// ggml's type table: `(name, weights per block, bytes per block)`. Types
/// the kernels cannot run are still listed so their extent can be checked
/// and they can be reported by name.
pub(crate) fn ggml_type_info(ty: u32) -> Option<(&'static str, usize, usize)> {
    Some(match ty {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}
