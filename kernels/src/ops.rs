//! Element-wise and row-wise operations of the Llama block: RMSNorm, RoPE,
//! SwiGLU, softmax. These are a small share of the time, so they are plain
//! loops the compiler vectorizes; what matters is that they match the
//! Hugging Face reference operation for operation.

/// `out = x / sqrt(mean(x²) + eps) * weight`, as Llama's RMSNorm (f32).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), weight.len(), "rms_norm: weight length");
    assert_eq!(x.len(), out.len(), "rms_norm: output length");
    let sum_sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let inv = 1.0 / ((sum_sq / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

/// RMSNorm over each of the `rows` rows of `x` (row length = `weight.len()`).
pub fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm(xr, weight, eps, or);
    }
}

/// Rotates each head of `x` (`heads × head_dim`) in place with the Hugging
/// Face "rotate half" layout: pairs `(i, i + head_dim/2)` turn by the angle
/// whose cosine and sine are `cos[i]`, `sin[i]` (`head_dim/2` each).
pub fn apply_rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    assert_eq!(cos.len(), half, "apply_rope: cos length");
    assert_eq!(sin.len(), half, "apply_rope: sin length");
    assert_eq!(x.len() % head_dim, 0, "apply_rope: x is not whole heads");
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] + -x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths");
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [0.5f32, 1.0, 2.0, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-5, &mut out);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f64 + 1e-5).sqrt();
        for i in 0..4 {
            let want = (x[i] as f64 / rms * w[i] as f64) as f32;
            assert!((out[i] - want).abs() < 1e-6, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn rope_rotates_half_pairs_and_preserves_norm() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        let (c, s) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        apply_rope(&mut x, 4, &c, &s);
        // Pair (0, 2) turns by 90°: (1, 3) → (-3, 1); pair (1, 3) by 0°.
        assert_eq!(x, vec![-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_values() {
        let mut x = vec![1000.0f32, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }

    #[test]
    fn silu_mul_matches_definition() {
        let mut g = vec![0.0f32, 1.0, -2.0];
        silu_mul(&mut g, &[1.0, 2.0, 3.0]);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert_eq!(g, vec![0.0, silu(1.0) * 2.0, silu(-2.0) * 3.0]);
    }
}
