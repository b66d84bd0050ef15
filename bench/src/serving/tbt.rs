//! Stage 2: does fetching other requests' blocks from the store slow the
//! running decode batch? A decode node runs a full batch (`max_batch`
//! streams of short prompts that never stop); every token's arrival is
//! recorded client side. Each round brackets a prefetch window with two
//! quiet windows (the batch alone; the context grows during a round, so
//! the quiet reference sits on both sides). In the prefetch window, long prompts, prefilled beforehand so their
//! blocks are in the store, are handed to the node, which fetches their
//! blocks on its async runtime while the engine keeps decoding. The batch
//! is full, so they wait, fetched, without joining it. When a wave of them
//! is fetched before the window has covered enough decode steps, the next
//! wave hands them over again; the window ends when the last wave is
//! waiting in the node (every fetch done), and it is cancelled.
//!
//! Windows are counted in the node's decode steps: every step gives each
//! running stream one token, so the tokens of a window's steps are known
//! by their position in each stream, and late deliveries count against
//! the window whose steps produced them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::{self as pb};
use tokio::task::JoinHandle;
use tonic::Streaming;

use super::nodes::{prompt, wait_until, DecodeNode, PrefillNode, PromptSet};
use crate::kvstore::sys::percentile;
use crate::stats::median;

/// Longest wait for the batch to start, or for a window's fetches.
const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Polls of the streams against the step counter to learn their offsets.
const CALIBRATION_SAMPLES: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct TbtSettings {
    /// The decode node's batch limit, and the number of running streams.
    pub max_batch: usize,
    /// Handoffs in each wave of a prefetch window.
    pub long_prompts: usize,
    pub long_prompt_tokens: usize,
    pub short_prompt_tokens: usize,
    /// Of the running streams (they have no stop ids).
    pub max_tokens: u32,
    /// Decode steps before the first window.
    pub warmup_steps: u64,
    /// Decode steps of each quiet window.
    pub quiet_steps: u64,
    /// Quiet + prefetch window pairs.
    pub rounds: usize,
    /// Long prompts are handed over again (in waves) until the prefetch
    /// window has covered this many decode steps, or `max_waves` waves.
    pub min_window_steps: u64,
    pub max_waves: usize,
}

/// One quiet or prefetch window.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// From opening the window to its end (the prefetch window ends when
    /// every fetch is done).
    pub ms: f64,
    /// Decode steps the engine ran in it.
    pub steps: u64,
    /// Inter-token gaps of the running streams ending at the tokens of
    /// those steps.
    pub gaps: usize,
    pub tbt_p50_ms: f64,
    pub tbt_p90_ms: f64,
    pub tbt_mean_ms: f64,
    pub tbt_max_ms: f64,
    /// The decode node's mean step time in the window (ms / steps).
    pub step_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub quiet: Window,
    pub prefetch: Window,
    /// Times every long prompt was handed to the node in the window.
    pub waves: usize,
    /// Blocks and bytes the decode node read from the store in the
    /// prefetch window (its store client's hits and bytes).
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    pub fetch_gbps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TbtResult {
    pub rounds: Vec<Round>,
    /// Over every gap of every window of a kind.
    pub quiet_tbt_p50_ms: f64,
    pub quiet_tbt_p90_ms: f64,
    pub prefetch_tbt_p50_ms: f64,
    pub prefetch_tbt_p90_ms: f64,
    pub quiet_tbt_mean_ms: f64,
    pub prefetch_tbt_mean_ms: f64,
    /// prefetch / quiet (targets <= 1.2).
    pub p50_ratio: f64,
    pub p90_ratio: f64,
    pub mean_ratio: f64,
    /// The node's mean step time (median over rounds) and the ratio: how
    /// much the engine itself slowed, whatever the delivery did.
    pub quiet_step_ms: f64,
    pub prefetch_step_ms: f64,
    pub step_ratio: f64,
    /// Tokens reached the client in bursts: the median gap in quiet windows
    /// is under half the node's step time.
    pub bursty_delivery: bool,
    /// Median over rounds.
    pub prefetch_window_ms: f64,
    pub prefetch_window_steps_min: u64,
    pub blocks_per_long_prompt: usize,
    pub block_bytes: usize,
    /// Median time to prefill one long prompt (wall, client side).
    pub long_prefill_ms: f64,
    pub notes: Vec<String>,
}

/// One decode stream's token arrivals, filled by its reader task.
#[derive(Debug, Default)]
struct StreamLog {
    arrivals: Vec<Instant>,
    /// How the stream ended, when it has.
    end: Option<String>,
}

type SharedLog = Arc<Mutex<StreamLog>>;

fn with_log<T>(log: &SharedLog, f: impl FnOnce(&mut StreamLog) -> T) -> T {
    f(&mut log.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Reads `stream` until it ends, recording when each token arrives.
/// Aborting the task drops the stream, which cancels the request.
fn spawn_reader(mut stream: Streaming<pb::GenerateEvent>) -> (SharedLog, JoinHandle<()>) {
    let log = SharedLog::default();
    let task_log = log.clone();
    let task = tokio::spawn(async move {
        let end = loop {
            match stream.message().await {
                Ok(Some(pb::GenerateEvent { event: Some(Event::Tokens(t)) })) => {
                    let now = Instant::now();
                    with_log(&task_log, |l| l.arrivals.extend(std::iter::repeat_n(now, t.tokens.len())));
                }
                Ok(Some(pb::GenerateEvent { event: Some(Event::Finished(f)) })) => {
                    break format!("finished ({}) after {} tokens", f.reason, f.generated)
                }
                Ok(Some(_)) => {}
                Ok(None) => break "ended without a finish event".to_owned(),
                Err(e) => break format!("failed: {e}"),
            }
        };
        with_log(&task_log, |l| l.end = Some(end));
    });
    (log, task)
}

/// The running streams, and where each one's tokens stand against the
/// decode node's step counter.
struct Batch {
    logs: Vec<SharedLog>,
    tasks: Vec<JoinHandle<()>>,
    /// Per stream: tokens it has been sent after `steps` engine steps is
    /// `steps + offset` (every step gives every running stream one token;
    /// a stream that joined after the first step has a smaller offset).
    offsets: Vec<i64>,
}

impl Batch {
    fn min_tokens(&self) -> usize {
        self.logs.iter().map(|l| with_log(l, |l| l.arrivals.len())).min().unwrap_or(0)
    }

    fn any_ended(&self) -> bool {
        self.logs.iter().any(|l| with_log(l, |l| l.end.is_some()))
    }

    /// An error when any stream has ended: the windows need them all.
    fn check_running(&self) -> anyhow::Result<()> {
        for (i, log) in self.logs.iter().enumerate() {
            if let Some(end) = with_log(log, |l| l.end.clone()) {
                bail!("running stream {i} {end} before the measurement was done");
            }
        }
        Ok(())
    }

    /// Learns each stream's offset from the node's step counter while the
    /// batch decodes quietly. A stream never holds more than `steps +
    /// offset` tokens (the counter moves before the tokens are sent), and
    /// holds exactly that once delivery has caught up, so the offset is the
    /// largest difference seen (tokens read before the counter).
    async fn calibrate(&mut self, steps: impl Fn() -> u64) -> anyhow::Result<()> {
        let mut offsets = vec![i64::MIN; self.logs.len()];
        let mut seen = 0;
        let started = steps();
        while seen < CALIBRATION_SAMPLES || steps() < started + 2 {
            let received: Vec<i64> = self.logs.iter().map(|l| with_log(l, |l| l.arrivals.len() as i64)).collect();
            let now = steps() as i64;
            for (o, r) in offsets.iter_mut().zip(received) {
                *o = (*o).max(r - now);
            }
            seen += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.check_running()?;
        self.offsets = offsets;
        Ok(())
    }

    /// Waits until every stream has received every token of the first
    /// `steps` engine steps.
    async fn caught_up(&self, steps: u64) -> anyhow::Result<()> {
        let want = |o: i64| usize::try_from(steps as i64 + o).unwrap_or(0);
        let done = || self.logs.iter().zip(&self.offsets).all(|(l, &o)| with_log(l, |l| l.arrivals.len() >= want(o)));
        wait_until("the running streams' tokens to arrive", WAIT_TIMEOUT, || done() || self.any_ended()).await?;
        self.check_running()
    }

    /// The gaps, in milliseconds, ending at each stream's tokens of engine
    /// steps `from + 1 ..= to` (each gap from the stream's previous token),
    /// once they have all arrived: they are attributed to the steps that
    /// produced them however late they were delivered.
    async fn window_gaps(&self, from: u64, to: u64) -> anyhow::Result<Vec<f64>> {
        self.caught_up(to).await?;
        let mut gaps = Vec::with_capacity((to - from) as usize * self.logs.len());
        for (i, (log, &o)) in self.logs.iter().zip(&self.offsets).enumerate() {
            let (first, end) = (from as i64 + o, to as i64 + o);
            if first < 1 {
                bail!("stream {i} had no token before the window opened (offset {o} after {from} steps)");
            }
            with_log(log, |l| {
                let tokens = first as usize..end as usize;
                gaps.extend(tokens.map(|k| (l.arrivals[k] - l.arrivals[k - 1]).as_secs_f64() * 1e3));
            });
        }
        Ok(gaps)
    }

    async fn cancel(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn window(gaps: &[f64], span: Duration, steps: u64) -> Window {
    Window {
        ms: span.as_secs_f64() * 1e3,
        steps,
        gaps: gaps.len(),
        tbt_p50_ms: if gaps.is_empty() { f64::NAN } else { median(gaps) },
        tbt_p90_ms: percentile(gaps, 0.9),
        tbt_mean_ms: if gaps.is_empty() { f64::NAN } else { gaps.iter().sum::<f64>() / gaps.len() as f64 },
        tbt_max_ms: gaps.iter().copied().fold(0.0, f64::max),
        step_ms: span.as_secs_f64() * 1e3 / steps.max(1) as f64,
    }
}

/// Prefills the long and short prompts, starts the batch, runs the rounds
/// and cancels every stream, whether or not a round failed.
pub async fn run(s: &TbtSettings, prefill: &PrefillNode, decode: &DecodeNode) -> anyhow::Result<TbtResult> {
    let shape = prefill.shape;
    s.validate(shape.context)?;
    let blocks_per_long = s.long_prompt_tokens / shape.block_tokens;
    eprintln!(
        "[serving bench]   prefilling {} prompts of {} tokens ({blocks_per_long} blocks each) into the store",
        s.long_prompts, s.long_prompt_tokens
    );
    let (longs, long_walls) = handoffs(prefill, PromptSet::Long, s.long_prompts, s.long_prompt_tokens, 16).await?;
    let (shorts, _) = handoffs(prefill, PromptSet::Short, s.max_batch, s.short_prompt_tokens, s.max_tokens).await?;

    let mut batch = Batch { logs: Vec::new(), tasks: Vec::new(), offsets: Vec::new() };
    let mut result = Ok(());
    for h in shorts {
        match decode.client.clone().decode(h).await {
            Ok(r) => {
                let (log, task) = spawn_reader(r.into_inner());
                batch.logs.push(log);
                batch.tasks.push(task);
            }
            Err(e) => {
                result = Err(e).with_context(|| format!("decode node {} refused a short handoff", decode.name));
                break;
            }
        }
    }
    let result = match result {
        Ok(()) => rounds(s, decode, &mut batch, &longs, blocks_per_long).await,
        Err(e) => Err(e),
    };
    batch.cancel().await;
    let stats = decode.stats();
    let drained = wait_until("the decode node to drop the cancelled streams", WAIT_TIMEOUT, || {
        stats.batch_size.load(Ordering::Relaxed) == 0 && stats.waiting.load(Ordering::Relaxed) == 0
    })
    .await;
    let (rounds, notes) = result?;
    drained?;
    let mut result = summarize(rounds, notes)?;
    (result.blocks_per_long_prompt, result.block_bytes) = (blocks_per_long, shape.block_bytes);
    result.long_prefill_ms = median(&long_walls);
    Ok(result)
}

impl TbtSettings {
    fn validate(&self, context: usize) -> anyhow::Result<()> {
        if self.max_batch == 0 || self.long_prompts == 0 || self.rounds == 0 || self.max_waves == 0 {
            bail!("max_batch, long_prompts, rounds and max_waves must be at least 1");
        }
        if self.short_prompt_tokens + self.max_tokens as usize >= context || self.long_prompt_tokens >= context {
            bail!("the prompts and max_tokens do not fit the model's context of {context} tokens");
        }
        Ok(())
    }
}

/// Prefills `count` new prompts of `set` and returns their handoffs and
/// wall times (ms), checking that each was computed and stored in full.
async fn handoffs(
    prefill: &PrefillNode,
    set: PromptSet,
    count: usize,
    tokens: usize,
    max_tokens: u32,
) -> anyhow::Result<(Vec<pb::Handoff>, Vec<f64>)> {
    let (mut handoffs, mut walls) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..count {
        let p = prompt(set, i as u64, tokens, prefill.shape.vocab);
        let done = prefill.prefill(format!("{set:?}-{i}").to_lowercase(), p, max_tokens).await?;
        done.expect_fresh(tokens, Some(tokens / prefill.shape.block_tokens))?;
        walls.push(done.wall.as_secs_f64() * 1e3);
        handoffs.push(done.handoff);
    }
    Ok((handoffs, walls))
}

/// The result over every window of every round (the caller fills in the
/// long prompts' shape and prefill time).
fn summarize(rounds: Vec<RoundGaps>, mut notes: Vec<String>) -> anyhow::Result<TbtResult> {
    let all = |prefetch: bool| -> Vec<f64> {
        rounds.iter().flat_map(|r| if prefetch { &r.prefetch_gaps } else { &r.quiet_gaps }).copied().collect()
    };
    let (quiet, prefetch) = (all(false), all(true));
    if quiet.is_empty() || prefetch.is_empty() {
        bail!("no decode step fell in the windows ({} quiet and {} prefetch gaps)", quiet.len(), prefetch.len());
    }
    let (q50, q90) = (median(&quiet), percentile(&quiet, 0.9));
    let (p50, p90) = (median(&prefetch), percentile(&prefetch, 0.9));
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (q_mean, p_mean) = (mean(&quiet), mean(&prefetch));
    let rounds: Vec<Round> = rounds.into_iter().map(|r| r.round).collect();
    let over_rounds = |f: fn(&Round) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
    let (q_step, p_step) = (over_rounds(|r| r.quiet.step_ms), over_rounds(|r| r.prefetch.step_ms));
    let bursty_delivery = q50 < 0.5 * q_step;
    if bursty_delivery {
        notes.push(format!(
            "Tokens reach the client in bursts: the median gap in quiet windows is {q50:.3} ms while the decode \
             node steps every {q_step:.2} ms (p90 {q90:.3} ms). Long gaps near 40 ms would be the signature of \
             Nagle's algorithm on a server socket without TCP_NODELAY meeting the client's delayed ACK (tonic \
             ignores tcp_nodelay when given its own incoming stream of connections). The TBT ratios then compare \
             delivery bursts, not decode steps; see decode_step_prefetch_vs_quiet."
        ));
    }
    Ok(TbtResult {
        quiet_tbt_p50_ms: q50,
        quiet_tbt_p90_ms: q90,
        prefetch_tbt_p50_ms: p50,
        prefetch_tbt_p90_ms: p90,
        quiet_tbt_mean_ms: q_mean,
        prefetch_tbt_mean_ms: p_mean,
        p50_ratio: p50 / q50,
        p90_ratio: p90 / q90,
        mean_ratio: p_mean / q_mean,
        quiet_step_ms: q_step,
        prefetch_step_ms: p_step,
        step_ratio: p_step / q_step,
        bursty_delivery,
        prefetch_window_ms: over_rounds(|r| r.prefetch.ms),
        prefetch_window_steps_min: rounds.iter().map(|r| r.prefetch.steps).min().unwrap_or(0),
        blocks_per_long_prompt: 0,
        block_bytes: 0,
        long_prefill_ms: f64::NAN,
        rounds,
        notes,
    })
}

/// A round with the gaps behind its windows.
struct RoundGaps {
    round: Round,
    quiet_gaps: Vec<f64>,
    prefetch_gaps: Vec<f64>,
}

async fn rounds(
    s: &TbtSettings,
    decode: &DecodeNode,
    batch: &mut Batch,
    longs: &[pb::Handoff],
    blocks_per_long: usize,
) -> anyhow::Result<(Vec<RoundGaps>, Vec<String>)> {
    let stats = decode.stats();
    let steps = || stats.steps.load(Ordering::Relaxed);
    let warm = s.warmup_steps as usize;
    wait_until("every running stream's first tokens", WAIT_TIMEOUT, || batch.min_tokens() > warm || batch.any_ended())
        .await?;
    batch.check_running()?;
    check_full_batch(decode, s.max_batch)?;
    batch.calibrate(steps).await?;
    let mut out = Vec::with_capacity(s.rounds);
    let mut notes = Vec::new();
    let mut longest_window = s.min_window_steps;
    for r in 0..s.rounds {
        check_full_batch(decode, s.max_batch)?;
        // Leave room for this round's windows and the drain after them.
        let left = (s.max_tokens as usize).saturating_sub(batch.min_tokens());
        let need = (2 * s.quiet_steps + 2 * longest_window + 10) as usize;
        if left < need {
            let note = format!(
                "stopped after {r} of {} rounds: the running streams had {left} of their {} tokens left",
                s.rounds, s.max_tokens
            );
            if r == 0 {
                bail!("{note}");
            }
            eprintln!("[serving bench]   {note}");
            notes.push(note);
            break;
        }

        // Each window starts with every earlier token delivered.
        batch.caught_up(steps()).await?;
        let (q_from, q_steps) = (Instant::now(), steps());
        wait_until("the quiet window's decode steps", WAIT_TIMEOUT, || steps() >= q_steps + s.quiet_steps).await?;
        let (q_span, q_end) = (q_from.elapsed(), steps());
        let quiet_gaps = batch.window_gaps(q_steps, q_end).await?;

        batch.caught_up(steps()).await?;
        let (p_from, p_steps) = (Instant::now(), steps());
        let fetched = prefetch(s, decode, longs, blocks_per_long).await.with_context(|| format!("round {}", r + 1))?;
        let (p_span, p_end) = (p_from.elapsed(), steps());
        let prefetch_gaps = batch.window_gaps(p_steps, p_end).await?;
        drop(fetched.streams);
        wait_until("the decode node to drop the waiting handoffs", WAIT_TIMEOUT, || {
            stats.waiting.load(Ordering::Relaxed) == 0
        })
        .await?;
        batch.check_running()?;
        // A second quiet window right after: the context (and so the step
        // time) grows during the round, so the quiet reference brackets the
        // prefetch window from both sides instead of only preceding it.
        batch.caught_up(steps()).await?;
        let (a_from, a_steps) = (Instant::now(), steps());
        wait_until("the second quiet window's decode steps", WAIT_TIMEOUT, || steps() >= a_steps + s.quiet_steps)
            .await?;
        let (a_span, a_end) = (a_from.elapsed(), steps());
        let mut quiet_gaps = quiet_gaps;
        quiet_gaps.extend(batch.window_gaps(a_steps, a_end).await?);
        let (q_span, q_end) = (q_span + a_span, q_end + (a_end - a_steps));

        let quiet = window(&quiet_gaps, q_span, q_end - q_steps);
        let prefetch = window(&prefetch_gaps, p_span, p_end - p_steps);
        longest_window = longest_window.max(prefetch.steps);
        let round = Round {
            quiet,
            prefetch,
            waves: fetched.waves,
            fetched_blocks: fetched.blocks,
            fetched_bytes: fetched.bytes,
            fetch_gbps: fetched.bytes as f64 / p_span.as_secs_f64().max(1e-9) / 1e9,
        };
        eprintln!(
            "[serving bench]   round {}/{}: quiet TBT p50 {:.2} ms over {} steps; prefetch TBT p50 {:.2} ms over \
             {} steps, {} blocks ({:.1} MiB) fetched in {:.1} ms ({} waves)",
            r + 1,
            s.rounds,
            round.quiet.tbt_p50_ms,
            round.quiet.steps,
            round.prefetch.tbt_p50_ms,
            round.prefetch.steps,
            round.fetched_blocks,
            round.fetched_bytes as f64 / (1 << 20) as f64,
            round.prefetch.ms,
            round.waves
        );
        if round.prefetch.steps < s.min_window_steps {
            let note = format!(
                "round {}: the prefetch window covered only {} decode steps (fewer than {}) after {} waves of fetches",
                r + 1,
                round.prefetch.steps,
                s.min_window_steps,
                round.waves
            );
            eprintln!("[serving bench]   note: {note}");
            notes.push(note);
        }
        out.push(RoundGaps { round, quiet_gaps, prefetch_gaps });
    }
    Ok((out, notes))
}

fn check_full_batch(decode: &DecodeNode, max_batch: usize) -> anyhow::Result<()> {
    let running = decode.stats().batch_size.load(Ordering::Relaxed) as usize;
    if running != max_batch {
        bail!("{running} sequences are decoding; the bench needs a full batch of {max_batch}");
    }
    Ok(())
}

/// The fetches of one prefetch window.
struct Fetched {
    /// The last wave's streams (dropping them cancels those requests).
    streams: Vec<Streaming<pb::GenerateEvent>>,
    waves: usize,
    blocks: u64,
    bytes: u64,
}

/// Hands every long prompt to the decode node at once (a wave) and waits
/// until the node has fetched all their blocks; repeats with a fresh wave
/// (cancelling the previous one, whose blocks are in memory) until the
/// window has covered `min_window_steps` decode steps or `max_waves` waves.
/// Ends when the last wave is waiting, fetched, in the node's queue.
async fn prefetch(
    s: &TbtSettings,
    decode: &DecodeNode,
    longs: &[pb::Handoff],
    blocks_per_long: usize,
) -> anyhow::Result<Fetched> {
    let stats = decode.stats();
    let steps = || stats.steps.load(Ordering::Relaxed);
    let metrics = decode.store.metrics();
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (hits_before, misses_before) = (read(&metrics.hits), read(&metrics.misses));
    let (bytes_before, steps_before) = (read(&metrics.get_bytes), steps());
    let wave_blocks = (longs.len() * blocks_per_long) as u64;
    let mut streams = Vec::new();
    let mut waves = 0;
    while waves == 0 || (waves < s.max_waves && steps() - steps_before < s.min_window_steps) {
        let sends = longs.iter().map(|h| {
            let mut client = decode.client.clone();
            let h = h.clone();
            async move { client.decode(h).await.map(tonic::Response::into_inner) }
        });
        let wave = futures::future::try_join_all(sends)
            .await
            .with_context(|| format!("decode node {} refused a long handoff", decode.name))?;
        // The previous wave is fetched and waiting: cancel it.
        streams = wave;
        waves += 1;
        let target = hits_before + waves as u64 * wave_blocks;
        wait_until("the long handoffs' fetches", WAIT_TIMEOUT, || {
            read(&metrics.hits) >= target || read(&metrics.misses) > misses_before
        })
        .await?;
    }
    let n = longs.len() as u64;
    wait_until("the last wave to be waiting in the decode node", WAIT_TIMEOUT, || {
        stats.waiting.load(Ordering::Relaxed) == n
    })
    .await?;
    let blocks = read(&metrics.hits) - hits_before;
    let want = waves as u64 * wave_blocks;
    if blocks != want {
        let misses = read(&metrics.misses) - misses_before;
        bail!("the decode node fetched {blocks} blocks in {waves} waves, expected {want} ({misses} store misses)");
    }
    Ok(Fetched { streams, waves, blocks, bytes: read(&metrics.get_bytes) - bytes_before })
}
