//! Paged decode attention: KV bytes read per second as a fraction of the
//! machine's read bandwidth measured in the same run, and paged (16-token
//! pages, scattered) vs contiguous (one page per sequence) layouts.
//!
//! Geometry of SmolLM2-135M (3 KV heads × 64, 3 query heads per KV head),
//! one layer, a batch of sequences decoding one token each.

use clap::Parser;
use serde_json::json;
use std::time::Instant;
use tandem_bench::{baseline, stats};
use tandem_kernels::attention::{attend_batch, BatchArgs, BatchRow, KvGeometry};
use tandem_model::kv_cache::huge_page_vec;

#[derive(Parser)]
#[command(about = "Paged decode attention vs memory bandwidth")]
struct Args {
    /// Context lengths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 4096, 16384, 65536])]
    contexts: Vec<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed repetitions per point (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Compute threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Result file name under bench/results/.
    #[arg(long, default_value = "attention.json")]
    out: String,
}

const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const GROUP: usize = 3;

/// Seconds for one decode step of `batch` sequences of `ctx` tokens (the
/// engine's batched call: rows, or runs of chunks of them, over the pool).
fn time_step(pool: &[f32], geometry: KvGeometry, tables: &[Vec<u32>], ctx: usize, q: &[f32], out: &mut [f32]) -> f64 {
    let rows: Vec<BatchRow<'_>> = tables.iter().map(|t| BatchRow { block_table: t, context_len: ctx }).collect();
    let args = BatchArgs { geometry, layer: 0, scale: 0.125, rows: &rows };
    let start = Instant::now();
    attend_batch(q, pool, &args, out);
    std::hint::black_box(&out);
    start.elapsed().as_secs_f64()
}

/// A pool holding `batch` sequences of `ctx` tokens in pages of
/// `page_tokens`, pages shuffled when `scatter`.
fn layout(batch: usize, ctx: usize, page_tokens: usize, scatter: bool) -> (Vec<f32>, KvGeometry, Vec<Vec<u32>>) {
    let geometry = KvGeometry { page_tokens, num_layers: 1, num_kv_heads: KV_HEADS, head_dim: HEAD_DIM };
    let per_seq = ctx.div_ceil(page_tokens);
    let mut pages: Vec<u32> = (0..(batch * per_seq) as u32).collect();
    if scatter {
        // A fixed pseudo-random permutation (LCG-driven Fisher–Yates).
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..pages.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pages.swap(i, (s >> 33) as usize % (i + 1));
        }
    }
    // Allocated like the engine's KV pool (huge pages where the kernel gives them).
    let mut pool = huge_page_vec(pages.len() * geometry.page_elems(), 0f32);
    for (i, x) in pool.iter_mut().enumerate() {
        *x = ((i % 251) as f32 - 125.0) / 125.0;
    }
    let tables = pages.chunks(per_seq).map(|c| c.to_vec()).collect();
    (pool, geometry, tables)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global()?;
    }
    let q_dim = KV_HEADS * GROUP * HEAD_DIM;
    let q: Vec<f32> = (0..args.batch * q_dim).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut out = vec![0f32; q.len()];
    let bandwidth = baseline::read_bandwidth(1 << 30, 5);
    println!("read bandwidth (same run, {} threads): {:.2} GB/s", rayon::current_num_threads(), bandwidth / 1e9);
    println!(
        "{:>8} {:>12} {:>10} {:>12} {:>10} {:>14}",
        "context", "KV MB/step", "paged GB/s", "of memory", "contig GB/s", "paged/contig"
    );
    let mut rows = Vec::new();
    for &ctx in &args.contexts {
        let bytes = (args.batch * ctx * 2 * KV_HEADS * HEAD_DIM * 4) as f64;
        let mut measure = |page_tokens, scatter| {
            let (pool, geometry, tables) = layout(args.batch, ctx, page_tokens, scatter);
            time_step(&pool, geometry, &tables, ctx, &q, &mut out); // warm up
            let times: Vec<f64> =
                (0..args.runs).map(|_| time_step(&pool, geometry, &tables, ctx, &q, &mut out)).collect();
            stats::median(&times)
        };
        let paged = measure(16, true);
        let contiguous = measure(ctx, false);
        let (paged_bw, contig_bw) = (bytes / paged, bytes / contiguous);
        println!(
            "{ctx:>8} {:>12.1} {:>10.2} {:>12.2} {:>10.2} {:>14.3}",
            bytes / 1e6,
            paged_bw / 1e9,
            paged_bw / bandwidth,
            contig_bw / 1e9,
            paged / contiguous
        );
        rows.push(json!({
            "context": ctx,
            "kv_bytes_per_step": bytes,
            "paged_seconds": paged,
            "contiguous_seconds": contiguous,
            "paged_bytes_per_second": paged_bw,
            "contiguous_bytes_per_second": contig_bw,
            "paged_fraction_of_read_bandwidth": paged_bw / bandwidth,
            "paged_over_contiguous_time": paged / contiguous,
        }));
    }
    let doc = json!({
        "schema": "tandem-bench-attention/1",
        "machine": stats::machine(),
        "read_bandwidth_bytes_per_second": bandwidth,
        "batch": args.batch,
        "kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "group": GROUP,
        "kv_dtype": "f32",
        "page_tokens": 16,
        "runs": args.runs,
        "statistic": "median",
        "results": rows,
    });
    let path = stats::write_result(&args.out, &doc)?;
    println!("wrote {}", path.display());
    Ok(())
}
