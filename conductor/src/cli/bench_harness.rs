//! `tandem bench replay|run|compare`: argument handling around
//! `tandem_bench::harness`.

use super::bench::{ClusterArgs, CompareArgs, ReplayArgs, RunArgs};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_bench::harness::cluster::{Compute, Setup};
use tandem_bench::harness::load::{self, Arrival, Conversation, Lengths, SyntheticSpec};
use tandem_bench::harness::schema::{BenchResult, Deployment, Slo, WorkloadInfo, SCHEMA_VERSION};
use tandem_bench::harness::{run_case, Case};
use tandem_bench::workload::Synth;

/// Synthesised token ids: clear of special tokens, inside any served vocabulary.
const VOCAB: (u32, u32) = (256, 32_000);

/// The context of the modeled models: replayed prompts are cut to fit it.
const MODELED_CONTEXT: u32 = 131_072;

const POLICIES: [&str; 6] = ["kv-centric", "random", "round-robin", "least-loaded", "cache-affinity", "colocated"];

/// `write_back`: decode nodes store the blocks that fill while decoding.
fn setup(c: &ClusterArgs, write_back: bool) -> anyhow::Result<Setup> {
    let modeled = c.compute == "modeled";
    let compute =
        if modeled { Compute::Modeled { profile: c.profile.clone(), kv_scale: c.kv_scale } } else { Compute::Real };
    for (v, name) in [(c.slo_ttft_ms, "--slo-ttft-ms"), (c.slo_tbt_ms, "--slo-tbt-ms")] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} must be a positive number of milliseconds");
        }
    }
    Ok(Setup {
        tandem: std::env::current_exe().context("finding the tandem binary")?,
        model: c.model.clone(),
        compute,
        block_tokens: c.block_tokens.unwrap_or(if modeled { 512 } else { 16 }),
        kv_dtype: c.kv_dtype.clone().unwrap_or_else(|| if modeled { "bf16" } else { "f32" }.into()),
        store_dram: c.store_dram.clone(),
        eviction: c.eviction.clone(),
        transport: c.transport.clone(),
        kv_memory: c.kv_memory.clone(),
        prefix_reads: !c.no_cache,
        chunk_tokens: c.chunk_tokens.or(modeled.then_some(8192)),
        write_back,
        slo_ttft_ms: c.slo_ttft_ms,
        slo_tbt_ms: c.slo_tbt_ms,
        keep: c.keep.clone(),
    })
}

/// "1P1D", "2P1D", "colocatedx2" (or "colocated×2").
fn deployment(s: &str) -> anyhow::Result<Deployment> {
    let t = s.trim().to_ascii_lowercase();
    if let Some(n) = t.strip_prefix("colocatedx").or_else(|| t.strip_prefix("colocated×")) {
        let n: u32 = n.parse().with_context(|| format!("deployment {s:?}: colocatedxN"))?;
        if n == 0 {
            bail!("deployment {s:?} has no workers");
        }
        return Ok(Deployment { prefill: 0, decode: n, colocated: true });
    }
    let (p, d) = t
        .strip_suffix('d')
        .and_then(|x| x.split_once('p'))
        .with_context(|| format!("deployment {s:?}: write NpMd like 1P1D, or colocatedxN"))?;
    let (p, d): (u32, u32) = (p.parse()?, d.parse()?);
    if p == 0 || d == 0 || p + d > 16 {
        bail!("deployment {s:?}: 1-15 prefill and decode nodes each, 16 in all");
    }
    Ok(Deployment { prefill: p, decode: d, colocated: false })
}

/// Runs × (deployment, policy); "colocated" as a policy makes the
/// deployment colocated with the same number of workers.
fn cases(c: &ClusterArgs, arrival: Arrival, suffix: &str) -> anyhow::Result<Vec<Case>> {
    let mut out = Vec::new();
    for d in &c.deployments {
        let dep = deployment(d)?;
        for p in &c.policies {
            if !POLICIES.contains(&p.as_str()) {
                bail!("unknown policy {p:?} (use {})", POLICIES.join(", "));
            }
            let deployment = if p == "colocated" && !dep.colocated {
                Deployment { prefill: 0, decode: dep.prefill + dep.decode, colocated: true }
            } else {
                dep
            };
            let policy = if deployment.colocated { "colocated".to_string() } else { p.clone() };
            let mut label = policy.clone();
            if c.deployments.len() > 1 || deployment.colocated != dep.colocated {
                label = format!("{} {label}", deployment.name());
            }
            label += suffix;
            if out.iter().any(|x: &Case| x.label == label) {
                continue;
            }
            out.push(Case { label, policy, deployment, arrival });
        }
    }
    Ok(out)
}

fn execute(
    c: &ClusterArgs,
    setup: Setup,
    runs: Vec<(Case, Vec<Conversation>)>,
    workload: WorkloadInfo,
    default_name: &str,
) -> anyhow::Result<()> {
    let started_unix_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut result = BenchResult {
        schema_version: SCHEMA_VERSION,
        tandem_version: env!("CARGO_PKG_VERSION").into(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_unix_s,
        machine: tandem_bench::stats::machine(),
        workload,
        compute: if setup.prefix_reads {
            setup.compute.name()
        } else {
            format!("{}, prefix cache off", setup.compute.name())
        },
        slo: Slo { ttft_ms: c.slo_ttft_ms, tbt_ms: c.slo_tbt_ms },
        runs: Vec::new(),
    };
    let timeout = Duration::from_secs(c.timeout_s.max(1));
    for (case, work) in &runs {
        result.runs.push(run_case(&setup, case, work, timeout)?);
    }
    let path = c.json.clone().unwrap_or_else(|| tandem_bench::stats::results_dir().join(default_name));
    write(&result, &path)?;
    Ok(())
}

fn write(result: &BenchResult, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Results name no machine's folders: the command is kept relative.
    std::fs::write(path, serde_json::to_string_pretty(result)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    print!("{}", table(result));
    let files = tandem_bench::harness::report::write_report(result, path)?;
    eprintln!("wrote {}", files.markdown.display());
    Ok(())
}

/// One line per run, for the terminal (the Markdown report has it all).
fn table(r: &BenchResult) -> String {
    let mut t = format!(
        "{:<28} {:>5} {:>5} {:>5} {:>5} {:>10} {:>10} {:>9} {:>9} {:>7}\n",
        "run", "sent", "done", "429", "fail", "TTFT mean", "TTFT p99", "TBT p99", "goodput", "hits"
    );
    for x in &r.runs {
        t += &format!(
            "{:<28} {:>5} {:>5} {:>5} {:>5} {:>8.0}ms {:>8.0}ms {:>7.0}ms {:>5.2}r/s {:>7.3}\n",
            x.label,
            x.requests.sent,
            x.requests.completed,
            x.requests.rejected,
            x.requests.failed,
            x.ttft_ms.mean,
            x.ttft_ms.p99,
            x.tbt_ms.p99,
            x.goodput_rps,
            x.cache.hit_ratio_tokens
        );
    }
    t
}

pub fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let c = &a.cluster;
    // Synthesised tokens stand in for the trace's answers, so blocks that
    // fill while decoding could never be hit again: decode write-back off.
    let setup = setup(c, false)?;
    let opts = tandem_kvstore::trace::TraceOptions::default();
    let mut trace = tandem_kvstore::trace::load_trace(&a.trace, &opts)
        .with_context(|| format!("reading the trace {}", a.trace.display()))?;
    if let Some(n) = a.max_requests {
        trace.truncate(n);
    }
    let synth = Synth {
        trace_block_tokens: opts.block_tokens,
        block_tokens: a.tokens_per_block.unwrap_or(setup.block_tokens),
        output_scale: a.output_scale,
        time_scale: a.time_scale,
        vocab_lo: VOCAB.0,
        vocab_hi: VOCAB.1,
    };
    synth.validate().map_err(anyhow::Error::msg)?;
    let mut work = load::from_trace(&trace, &synth);
    if let Some(d) = a.duration {
        work.retain(|w| (w.start_ms as f64) < d * 1000.0);
    }
    if work.is_empty() {
        bail!("no request of the trace is left to send");
    }
    let max_input = a.max_input.or(matches!(setup.compute, Compute::Modeled { .. }).then_some(MODELED_CONTEXT));
    let cut = max_input.map_or(0, |m| load::cap_prompts(&mut work, m));
    let span_s = work.last().map_or(0.0, |w| w.start_ms as f64 / 1000.0);
    let rate = if span_s > 0.0 { (work.len() - 1) as f64 / span_s } else { 0.0 };
    let (input, output) = load::mean_lengths(&work);
    let name = a.trace.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let info = WorkloadInfo {
        kind: "trace".into(),
        description: format!(
            "trace {name}: {} requests, {}, {} tokens per 512-token trace block, outputs x{}{}; decode write-back off",
            work.len(),
            match a.concurrency {
                Some(n) => format!("closed loop with {n} client(s) (timestamps ignored)"),
                None => format!("arrival times x{} ({rate:.2} req/s)", a.time_scale),
            },
            synth.block_tokens,
            a.output_scale,
            match (cut, max_input) {
                (0, _) | (_, None) => String::new(),
                (n, Some(m)) => format!(", {n} prompt(s) cut to fit {m} tokens with their output"),
            }
        ),
        requests: work.len() as u64,
        input_tokens_mean: input,
        output_tokens_mean: output,
    };
    let arrival = a.concurrency.map_or(Arrival::Fixed { rate }, Arrival::Concurrency);
    let runs = cases(c, arrival, "")?.into_iter().map(|k| (k, work.clone())).collect();
    execute(c, setup, runs, info, "replay.json")
}

pub fn synthetic(a: RunArgs) -> anyhow::Result<()> {
    let c = &a.cluster;
    let arrivals: Vec<Arrival> = if !a.concurrency.is_empty() {
        if a.concurrency.iter().any(|&n| n == 0 || n > 4096) {
            bail!("--concurrency must be 1-4096");
        }
        a.concurrency.iter().map(|&n| Arrival::Concurrency(n)).collect()
    } else {
        let rates = if a.rates.is_empty() { vec![1.0] } else { a.rates.clone() };
        if rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--rates must be positive");
        }
        rates
            .iter()
            .map(|&rate| if a.arrival == "fixed" { Arrival::Fixed { rate } } else { Arrival::Poisson { rate } })
            .collect()
    };
    let spec = SyntheticSpec {
        requests: a.requests,
        input: Lengths::parse(&a.input).map_err(anyhow::Error::msg)?,
        output: Lengths::parse(&a.output).map_err(anyhow::Error::msg)?,
        prefix_groups: a.prefix_groups,
        prefix_tokens: a.prefix_tokens,
        turns: a.turns,
        think_ms: a.think_ms,
        seed: a.seed,
        vocab_lo: VOCAB.0,
        vocab_hi: VOCAB.1,
    };
    let mut runs = Vec::new();
    let mut description = String::new();
    let (mut input, mut output) = (0.0, 0.0);
    for arrival in &arrivals {
        let work = spec.generate(arrival).map_err(anyhow::Error::msg)?;
        (input, output) = load::mean_lengths(&work);
        description = spec.describe(arrival);
        let suffix = match (arrivals.len() > 1, arrival) {
            (false, _) => String::new(),
            (true, Arrival::Concurrency(n)) => format!(" @ {n} clients"),
            (true, a) => format!(" @ {} rps", a.rate().unwrap_or_default()),
        };
        for k in cases(c, *arrival, &suffix)? {
            runs.push((k, work.clone()));
        }
    }
    if arrivals.len() > 1 {
        description = format!("{description} (swept: {} loads)", arrivals.len());
    }
    let info = WorkloadInfo {
        kind: "synthetic".into(),
        description,
        requests: u64::from(spec.requests),
        input_tokens_mean: input,
        output_tokens_mean: output,
    };
    execute(c, setup(c, true)?, runs, info, "run.json")
}

pub fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let read = |p: &PathBuf| -> anyhow::Result<BenchResult> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        BenchResult::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let (x, y) = (read(&a.a)?, read(&a.b)?);
    print!("{}", tandem_bench::harness::compare::compare(&x, &y));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_parse_and_bad_ones_are_named() {
        assert_eq!(deployment("1P1D").unwrap(), Deployment { prefill: 1, decode: 1, colocated: false });
        assert_eq!(deployment("2p1d").unwrap(), Deployment { prefill: 2, decode: 1, colocated: false });
        assert_eq!(deployment("colocatedx2").unwrap(), Deployment { prefill: 0, decode: 2, colocated: true });
        assert_eq!(deployment("colocated×3").unwrap().decode, 3);
        assert!(deployment("0P1D").is_err());
        assert!(deployment("P1D").is_err());
        assert!(deployment("colocatedx0").is_err());
        assert!(deployment("fast").unwrap_err().to_string().contains("NpMd"));
    }
}
