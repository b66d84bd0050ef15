//! `tandem bench replay|run|compare`: the loopback cluster under a
//! workload, measured at the client through the real HTTP API.
//!
//! - [`schema`] — the versioned JSON result.
//! - [`load`] — trace and synthetic workloads (conversations of turns).
//! - [`client`] — the streaming, timing client.
//! - [`cluster`] — a cluster file per run and `tandem up` as a child.
//! - [`offline`] — the hit ratio the store's policy should give the same prompts.
//! - [`report`], [`plot`], [`compare`] — Markdown, SVG plots, deltas.

pub mod client;
pub mod cluster;
pub mod compare;
pub mod load;
pub mod offline;
pub mod plot;
pub mod report;
pub mod schema;
pub mod summary;

use client::Sample;
use cluster::{Cluster, Setup};
use load::{Arrival, Conversation};
use schema::{Deployment, Run};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One run: a deployment, a policy, an offered load.
#[derive(Debug, Clone)]
pub struct Case {
    pub label: String,
    pub policy: String,
    pub deployment: Deployment,
    pub arrival: Arrival,
}

/// Starts the cluster for `case`, sends `work` through its API, stops it
/// and summarises what the client and the nodes measured.
pub fn run_case(setup: &Setup, case: &Case, work: &[Conversation], timeout: Duration) -> anyhow::Result<Run> {
    let requests: usize = work.iter().map(|c| c.turns.len()).sum();
    eprintln!("[{}] starting the cluster ({}, {})", case.label, case.deployment.name(), case.policy);
    let mut cluster = Cluster::start(setup, &case.deployment, &case.policy, &case.label)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
    let base = cluster.base.clone();
    let bar = indicatif::ProgressBar::new(requests as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{prefix}] {bar:30} {pos}/{len} requests {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(case.label.clone());
    let (samples, before, after, wall) = rt.block_on(async {
        let before = cluster::scrape(&http, &base).await;
        let start = Instant::now();
        let samples = send_all(&http, &base, case.arrival, work, timeout, &bar).await;
        let wall = start.elapsed().as_secs_f64();
        // A status poll or two so the node counters include the last work.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let after = cluster::scrape(&http, &base).await;
        (samples, before, after, wall)
    });
    bar.finish_and_clear();
    cluster.stop();
    let nodes = summary::NodeCounters::delta(&before, &after);
    let mut run = summary::summarise(case, setup, &samples, &nodes, wall);
    if !case.deployment.colocated {
        run.cache.offline_hit_ratio_blocks = offline::hit_ratio_blocks(setup, work)?;
    }
    eprintln!(
        "[{}] {} completed, {} rejected, {} failed; TTFT mean {:.0} ms p99 {:.0} ms; goodput {:.2} req/s; hit ratio {:.3}",
        case.label,
        run.requests.completed,
        run.requests.rejected,
        run.requests.failed,
        run.ttft_ms.mean,
        run.ttft_ms.p99,
        run.goodput_rps,
        run.cache.hit_ratio_tokens
    );
    if let Some(Sample { status: client::Status::Failed(why), .. }) =
        samples.iter().find(|s| matches!(s.status, client::Status::Failed(_)))
    {
        eprintln!("[{}] first failure: {why}", case.label);
    }
    Ok(run)
}

/// Sends every conversation, at its start time or as clients free up.
async fn send_all(
    http: &reqwest::Client,
    base: &str,
    arrival: Arrival,
    work: &[Conversation],
    timeout: Duration,
    bar: &indicatif::ProgressBar,
) -> Vec<Sample> {
    let url = format!("{base}/v1/completions");
    let start = Instant::now();
    let work: Arc<Vec<Conversation>> = Arc::new(work.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let clients = match arrival {
        Arrival::Concurrency(n) => n as usize,
        _ => work.len(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (http, url, work, next, bar) = (http.clone(), url.clone(), work.clone(), next.clone(), bar.clone());
        let paced = arrival.concurrency().is_none();
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(conv) = work.get(i) else { break };
                if paced {
                    let at = start + Duration::from_millis(conv.start_ms);
                    tokio::time::sleep_until(at.into()).await;
                }
                for (k, turn) in conv.turns.iter().enumerate() {
                    if k > 0 {
                        tokio::time::sleep(Duration::from_millis(conv.think_ms)).await;
                    }
                    let sent = start.elapsed().as_secs_f64();
                    let s = client::complete(&http, &url, "bench", &turn.prompt, turn.max_tokens, sent, timeout).await;
                    bar.inc(1);
                    let ok = s.status == client::Status::Completed;
                    out.push(s);
                    if !ok {
                        // Later turns build on this one's answer: counted,
                        // not sent.
                        for t in &conv.turns[k + 1..] {
                            out.push(Sample::unsent(t.prompt.len() as u32, start.elapsed().as_secs_f64()));
                            bar.inc(1);
                        }
                        break;
                    }
                }
                if paced {
                    break;
                }
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(v) = r {
            all.extend(v);
        }
    }
    all.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    all
}
