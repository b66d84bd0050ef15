//! Baselines measured on this machine in the same run as the benchmark.

use rayon::prelude::*;
use std::time::Instant;

/// Read bandwidth in bytes/s: every thread of the current rayon pool sums
/// its share of a `bytes`-sized buffer (far larger than the caches), best
/// of `reps`. This is the ceiling for a kernel that streams its input once.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let words = bytes / 8;
    // Huge pages where the kernel gives them, like the KV pools measured against it.
    let mut buf = tandem_model::kv_cache::huge_page_vec(words, 0u64);
    for (i, x) in buf.iter_mut().enumerate() {
        *x = i as u64;
    }
    let chunk = words.div_ceil(rayon::current_num_threads() * 4).max(1 << 12);
    let mut best = 0.0f64;
    for _ in 0..reps {
        let start = Instant::now();
        let sum: u64 = buf.par_chunks(chunk).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(bytes as f64 / secs);
    }
    best
}
