//! Scalar quantizers (f32 → ggml block formats), following ggml's reference
//! `quantize_row_*_ref`. Used to build test matrices and small tensors; the
//! serving path only ever reads weights that were quantized elsewhere.

use crate::{DType, KernelError};
use half::{bf16, f16};

/// Encodes `src` as one row of `dtype`. K-quants are not supported (their
/// reference quantizers search for scales; tests use random blocks instead).
pub fn quantize_row(dtype: DType, src: &[f32]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::with_capacity(dtype.row_bytes(src.len())?);
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => src.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => src.iter().for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => src.chunks_exact(32).for_each(|b| q8_0_block(b, &mut out)),
        DType::Q4_0 => src.chunks_exact(32).for_each(|b| q4_0_block(b, &mut out)),
        DType::Q4_1 => src.chunks_exact(32).for_each(|b| q4_1_block(b, &mut out)),
        DType::Q4_K | DType::Q6_K => {
            return Err(KernelError::Unavailable(format!("no quantizer for {dtype}")));
        }
    }
    Ok(out)
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude, with its sign, maps to -8.
    let max = x.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

fn q4_1_block(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    push_f16(out, min);
    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;

    #[test]
    fn round_trips_within_one_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0).collect();
        for (dtype, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 5e-3),
            (DType::BF16, 4e-2),
            (DType::Q8_0, 0.04),
            (DType::Q4_0, 0.6),
            (DType::Q4_1, 0.35),
        ] {
            let bytes = quantize_row(dtype, &x).unwrap();
            assert_eq!(bytes.len(), dtype.row_bytes(64).unwrap());
            let mut back = vec![0f32; 64];
            dequantize_row(dtype, &bytes, &mut back);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype}: {a} vs {b}");
            }
        }
        assert!(quantize_row(DType::Q6_K, &x[..64]).is_err());
    }
}
