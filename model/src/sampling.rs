//! Turning logits into the next token: greedy, temperature, top-k, top-p,
//! seeded; with log-probabilities on request.

use crate::error::{ModelError, Result};

/// How to pick tokens. Validated by [`SamplingParams::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Seed of the sampler's random stream; the same seed gives the same
    /// tokens.
    pub seed: u64,
    /// How many alternatives to report with each token's log-probability
    /// (`None`: no log-probabilities).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }
    }
}

/// The most alternatives a caller may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Request(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p.is_finite() && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Request(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if self.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(ModelError::Request(format!("at most {MAX_TOP_LOGPROBS} top logprobs")));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// One chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log p(token) under the model's distribution (temperature 1, before
    /// any filtering), when asked for.
    pub logprob: Option<f32>,
    /// The most likely alternatives with their log-probabilities.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A sampler with a counter-based random stream: the draw for the `n`-th
/// sampled token depends only on `(seed, n)`. Its whole state is the
/// parameters plus [`Sampler::step`], so a request can move between
/// processes (prefill → decode) and continue exactly as in one process.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    step: u64,
}

/// SplitMix64's finaliser: a bijective 64-bit mix (Steele et al., 2014).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        Self::resume(params, 0)
    }

    /// A sampler that has already sampled `step` tokens (a handed-off request).
    pub fn resume(params: SamplingParams, step: u64) -> Result<Self> {
        params.validate()?;
        Ok(Self { params, step })
    }

    /// Tokens sampled so far: with the parameters, the whole state.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// A uniform draw in [0, 1) for the current step.
    fn uniform(&self) -> f64 {
        let x = mix64(mix64(self.params.seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_add(self.step));
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, vocabulary-sized).
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(ModelError::Request("no logits to sample from".into()));
        }
        if logits.iter().any(|v| v.is_nan()) {
            return Err(ModelError::Request("the model produced NaN logits".into()));
        }
        let token = if self.params.is_greedy() { argmax(logits) } else { self.draw(logits) };
        self.step += 1;
        let (logprob, top_logprobs) = match self.params.logprobs {
            None => (None, Vec::new()),
            Some(k) => {
                let lse = log_sum_exp(logits);
                // `logprobs: 0` asks for the chosen token's alone.
                let top = if k == 0 {
                    Vec::new()
                } else {
                    top_k_indices(logits, k).into_iter().map(|i| (i as u32, logits[i] - lse)).collect()
                };
                (Some(logits[token as usize] - lse), top)
            }
        };
        Ok(Sampled { token, logprob, top_logprobs })
    }

    fn draw(&self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        let k = if self.params.top_k == 0 { logits.len() } else { self.params.top_k.min(logits.len()) };
        // Candidates by descending logit (ties: lower id first).
        let cand = top_k_indices(logits, k);
        let max = logits[cand[0]];
        let mut probs: Vec<f64> = cand.iter().map(|&i| exp_or_zero(((logits[i] - max) / t) as f64)).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f64 = probs[..keep].iter().sum();
        let mut u = self.uniform() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return cand[i] as u32;
            }
            u -= p;
        }
        cand[keep - 1] as u32
    }
}

/// Index of the largest value; ties go to the lowest index (as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `exp(x)`, with 0 for arguments whose exponential is 0 in f64 anyway:
/// libm's underflow path for them is many times slower than a normal exp,
/// and logits far below the maximum (masked vocabularies, cost-modeled
/// workers) would hit it for nearly every token of the vocabulary.
fn exp_or_zero(x: f64) -> f64 {
    if x < -746.0 {
        0.0
    } else {
        x.exp()
    }
}

fn log_sum_exp(v: &[f32]) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = v.iter().map(|&x| exp_or_zero((x - max) as f64)).sum();
    max + s.ln() as f32
}

/// Indices of the `k` largest values, descending, ties to the lower index.
fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(v.len());
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let cmp = |a: &usize, b: &usize| v[*b].total_cmp(&v[*a]).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_top_logprobs_gives_the_chosen_tokens_logprob_alone() {
        let mut s = Sampler::new(SamplingParams { logprobs: Some(0), ..SamplingParams::default() }).unwrap();
        let out = s.sample(&[0.0, 2.0, 1.0]).unwrap();
        assert_eq!(out.token, 1);
        assert!(out.logprob.is_some_and(|lp| lp < 0.0));
        assert!(out.top_logprobs.is_empty(), "not the whole vocabulary: {:?}", out.top_logprobs);
    }

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature, top_k, top_p, seed, logprobs: Some(3) }).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(0.0, 0, 1.0, 0);
        let out = s.sample(&[1.0, 3.0, 3.0, -1.0]).unwrap();
        assert_eq!(out.token, 1);
        assert_eq!(out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let lp = out.logprob.unwrap();
        let z: f32 = [1.0f32, 3.0, 3.0, -1.0].iter().map(|x| x.exp()).sum();
        assert!((lp - (3.0f32.exp() / z).ln()).abs() < 1e-5);
    }

    #[test]
    fn logits_far_below_the_maximum_weigh_nothing() {
        let mut logits = vec![-1e9f32; 1000];
        logits[7] = 2.0;
        logits[9] = 1.0;
        let out = sampler(0.0, 0, 1.0, 0).sample(&logits).unwrap();
        let expect = -(1.0f64 + (-1.0f64).exp()).ln();
        assert_eq!(out.token, 7);
        assert!((f64::from(out.logprob.unwrap()) - expect).abs() < 1e-6, "{:?}", out.logprob);
        assert_eq!(exp_or_zero(-746.5), 0.0);
        assert_eq!(exp_or_zero(-700.0), (-700.0f64).exp(), "above the cut, exp itself");
        let drawn = sampler(1.0, 0, 1.0, 3).sample(&logits).unwrap().token;
        assert!(drawn == 7 || drawn == 9, "only the two finite candidates: {drawn}");
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_filters() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(0.8, 0, 1.0, seed);
            (0..64).map(|_| s.sample(&logits).unwrap().token).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));

        // top_k = 2 only ever yields the two best ids (6 and 13: logit 1.8).
        let mut s = sampler(5.0, 2, 1.0, 1);
        for _ in 0..200 {
            let t = s.sample(&logits).unwrap().token;
            assert!(t == 6 || t == 13, "{t}");
        }
        // A tiny top_p keeps only the single most likely token.
        let mut s = sampler(1.0, 0, 1e-6, 1);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).unwrap().token, 6);
        }
    }

    #[test]
    fn a_resumed_sampler_continues_the_same_stream() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 13) % 17) as f32 * 0.2).collect();
        let mut one = sampler(1.0, 0, 0.95, 7);
        let whole: Vec<u32> = (0..40).map(|_| one.sample(&logits).unwrap().token).collect();
        // Hand off after 1 and after 25 tokens: the continuation is the same.
        for cut in [1usize, 25] {
            let mut first = sampler(1.0, 0, 0.95, 7);
            let mut got: Vec<u32> = (0..cut).map(|_| first.sample(&logits).unwrap().token).collect();
            let mut second = Sampler::resume(first.params().clone(), first.step()).unwrap();
            got.extend((cut..40).map(|_| second.sample(&logits).unwrap().token));
            assert_eq!(got, whole, "handoff after {cut} tokens changed the stream");
        }
        // The draws are spread: a uniform stream, not a constant.
        let distinct: std::collections::HashSet<u32> = whole.iter().copied().collect();
        assert!(distinct.len() > 10, "{whole:?}");
    }

    #[test]
    fn rejects_bad_parameters_and_nan_logits() {
        for (t, p) in [(-1.0, 1.0), (f32::NAN, 1.0), (1.0, 0.0), (1.0, 1.5), (f32::INFINITY, 1.0)] {
            let params = SamplingParams { temperature: t, top_p: p, ..Default::default() };
            assert!(Sampler::new(params).is_err(), "t={t} p={p}");
        }
        let mut s = sampler(0.0, 0, 1.0, 0);
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
    }
}
