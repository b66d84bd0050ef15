//! Cost models of the workers (DESIGN.md §5): predicted prefill time from
//! the uncached and cached prompt lengths, predicted decode step time from
//! the batch size and the batch's context tokens. Fitted by least squares
//! to timings from profiling a node at start, then corrected online from
//! the timings nodes report.

use serde::{Deserialize, Serialize};

/// A linear model `y = w · features(x)`, fitted by least squares, with a
/// multiplicative online correction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fitted {
    pub weights: Vec<f64>,
    /// Exponentially weighted mean of observed / predicted (1 = the fit is
    /// exact).
    pub correction: f64,
}

/// How fast the online correction follows new observations.
const CORRECTION_RATE: f64 = 0.3;

impl Fitted {
    /// Least squares over `(features, y)` samples, with a tiny ridge so
    /// collinear profiles still solve. `None` when there are fewer samples
    /// than features or the system is singular.
    pub fn fit(samples: &[(Vec<f64>, f64)]) -> Option<Fitted> {
        let n = samples.first()?.0.len();
        if samples.len() < n || samples.iter().any(|(f, y)| f.len() != n || !y.is_finite()) {
            return None;
        }
        // Normal equations A w = b, A = XᵀX + λI, b = Xᵀy; features scaled
        // to unit size first so the ridge is scale-free.
        let scale: Vec<f64> =
            (0..n).map(|j| samples.iter().map(|(f, _)| f[j].abs()).fold(0.0, f64::max).max(1e-12)).collect();
        let mut a = vec![vec![0.0; n + 1]; n];
        for (f, y) in samples {
            for i in 0..n {
                for j in 0..n {
                    a[i][j] += f[i] / scale[i] * f[j] / scale[j];
                }
                a[i][n] += f[i] / scale[i] * y;
            }
        }
        for (i, row) in a.iter_mut().enumerate() {
            row[i] += 1e-9 * samples.len() as f64;
        }
        let w = solve(a)?;
        Some(Fitted { weights: w.iter().zip(&scale).map(|(w, s)| w / s).collect(), correction: 1.0 })
    }

    pub fn predict(&self, features: &[f64]) -> f64 {
        let raw: f64 = self.weights.iter().zip(features).map(|(w, f)| w * f).sum();
        (raw * self.correction).max(0.0)
    }

    /// Folds in one measurement: predictions move toward what nodes report.
    pub fn observe(&mut self, features: &[f64], actual: f64) {
        let raw: f64 = self.weights.iter().zip(features).map(|(w, f)| w * f).sum();
        if raw > 0.0 && actual.is_finite() && actual > 0.0 {
            let ratio = (actual / raw).clamp(0.1, 10.0);
            self.correction = (1.0 - CORRECTION_RATE) * self.correction + CORRECTION_RATE * ratio;
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let n = a.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))?;
        if a[pivot][col].abs() < 1e-15 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}

/// Prefill time (ms) of a prompt with `uncached` tokens to compute after
/// `cached` tokens read from the store: `a + b·u + c·u² + d·u·c` (the
/// quadratic and cross terms are attention over the prompt and over the
/// prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillCost(pub Fitted);

impl PrefillCost {
    fn features(uncached: f64, cached: f64) -> Vec<f64> {
        vec![1.0, uncached, uncached * uncached, uncached * cached]
    }

    /// Fits `(uncached, cached, ms)` profile points.
    pub fn fit(points: &[(u32, u32, f64)]) -> Option<PrefillCost> {
        let samples: Vec<_> = points.iter().map(|&(u, c, ms)| (Self::features(u as f64, c as f64), ms)).collect();
        Fitted::fit(&samples).map(PrefillCost)
    }

    pub fn predict_ms(&self, uncached: u32, cached: u32) -> f64 {
        if uncached == 0 {
            return 0.0;
        }
        self.0.predict(&Self::features(uncached as f64, cached as f64))
    }

    pub fn observe(&mut self, uncached: u32, cached: u32, ms: f64) {
        self.0.observe(&Self::features(uncached as f64, cached as f64), ms);
    }
}

/// Decode step time (ms) of a batch of `batch` sequences holding `context`
/// tokens in all: `a + b·batch + c·context` (weights are read once per
/// step; attention reads every sequence's KV).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeCost(pub Fitted);

impl DecodeCost {
    fn features(batch: f64, context: f64) -> Vec<f64> {
        vec![1.0, batch, context]
    }

    /// Fits `(batch, context tokens, ms)` profile points.
    pub fn fit(points: &[(u32, u64, f64)]) -> Option<DecodeCost> {
        let samples: Vec<_> = points.iter().map(|&(b, c, ms)| (Self::features(b as f64, c as f64), ms)).collect();
        Fitted::fit(&samples).map(DecodeCost)
    }

    pub fn predict_ms(&self, batch: u32, context: u64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        self.0.predict(&Self::features(batch as f64, context as f64))
    }

    pub fn observe(&mut self, batch: u32, context: u64, ms: f64) {
        self.0.observe(&Self::features(batch as f64, context as f64), ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_known_prefill_model_and_follows_measurements() {
        let truth = |u: f64, c: f64| 5.0 + 0.5 * u + 1e-4 * u * u + 2e-5 * u * c;
        let mut points = Vec::new();
        for u in [16u32, 64, 256, 1024, 2048] {
            for c in [0u32, 512, 4096] {
                points.push((u, c, truth(u as f64, c as f64)));
            }
        }
        let mut m = PrefillCost::fit(&points).unwrap();
        for &(u, c, ms) in &points {
            assert!((m.predict_ms(u, c) - ms).abs() < 1e-6 * ms.max(1.0), "u={u} c={c}");
        }
        assert_eq!(m.predict_ms(0, 100), 0.0, "nothing to compute");
        // The node turns out twice as slow as profiled: predictions follow.
        for _ in 0..40 {
            m.observe(512, 0, 2.0 * truth(512.0, 0.0));
        }
        let p = m.predict_ms(1024, 0);
        assert!((p / (2.0 * truth(1024.0, 0.0)) - 1.0).abs() < 0.01, "{p}");
    }

    #[test]
    fn decode_fit_and_degenerate_profiles() {
        let truth = |b: f64, c: f64| 3.0 + 0.2 * b + 0.001 * c;
        let points: Vec<(u32, u64, f64)> = [(1, 100), (4, 2000), (16, 9000), (32, 40000), (8, 500)]
            .iter()
            .map(|&(b, c)| (b, c, truth(b as f64, c as f64)))
            .collect();
        let m = DecodeCost::fit(&points).unwrap();
        assert!((m.predict_ms(10, 10_000) - truth(10.0, 10_000.0)).abs() < 1e-6);
        assert!(DecodeCost::fit(&points[..2]).is_none(), "fewer points than terms");
        assert!(DecodeCost::fit(&[(1, 1, f64::NAN), (2, 2, 1.0), (3, 3, 1.0)]).is_none());
    }
}
