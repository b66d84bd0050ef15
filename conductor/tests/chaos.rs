//! Chaos: a steady stream of greedy requests through the HTTP API while a
//! seeded schedule SIGKILLs and restarts every kind of node — storage
//! nodes, the store master, prefill and decode workers, the conductor —
//! each its own `tandem` process on fixed loopback ports.
//!
//! Afterwards every request either completed with exactly the single-process
//! engine's text or ended with a clear error (a broken connection counts
//! only while the conductor itself was down); none went silent past the
//! client's timeout; every node is back to its idle accounting; every
//! block the store lists reads back with a good checksum.
//!
//! `TANDEM_CHAOS_SEED=N` replays a schedule; `TANDEM_CHAOS_ROUNDS=N` runs
//! the schedule N times over (default 1: every node killed once).

use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::procs::{
    reference_texts, seed_from_env, stream_completion, tokenize, Outcome, ProcCluster, Rng, Role, Shape,
};

const MAX_TOKENS: usize = 24;
/// Longest silence a client accepts before it calls the request hung:
/// above the conductor's stall timeout times its attempts would be
/// generous; the conductor's own bound is `stall_timeout_ms`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
const CLIENTS: usize = 4;

/// One fault of the schedule.
#[derive(Debug, Clone)]
struct Fault {
    node: String,
    /// A second node killed at the same moment (a third of the faults).
    also: Option<String>,
    /// Pause before the kill.
    after: Duration,
    /// How long the node stays down.
    down: Duration,
}

fn schedule(seed: u64, names: &[String], rounds: usize) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for _ in 0..rounds {
        let mut order: Vec<String> = names.to_vec();
        rng.shuffle(&mut order);
        for node in order {
            let after = Duration::from_millis(rng.range(1_500, 4_000));
            let down = Duration::from_millis(rng.range(200, 2_500));
            let other = names[rng.range(0, names.len() as u64) as usize].clone();
            let also = (rng.range(0, 3) == 0 && other != node).then_some(other);
            out.push(Fault { node, also, after, down });
        }
    }
    out
}

/// One request as the client saw it.
#[derive(Debug)]
struct Record {
    prompt: usize,
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

fn prompts() -> Vec<Vec<u32>> {
    // Several blocks each, so prefills write and decodes fetch real work
    // while nodes die; two prompts share a long prefix (store hits).
    let shared = "The old lighthouse keeper climbed the stairs every evening, counting each step, and ".repeat(4);
    (0..6)
        .map(|i| {
            let text = match i % 3 {
                0 => format!("{shared} on night {i} he saw"),
                1 => format!("Recipe {i}: mix the flour, the butter and the sugar, then ").repeat(5),
                _ => format!("Chapter {i}. The train left the station at dawn, and the passengers ").repeat(4),
            };
            tokenize(&text)
        })
        .collect()
}

#[test]
fn requests_survive_seeded_kills_and_restarts_of_every_node_kind() {
    let seed = seed_from_env("TANDEM_CHAOS_SEED");
    let rounds: usize = std::env::var("TANDEM_CHAOS_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let prompts = prompts();
    let want = reference_texts(&prompts, MAX_TOKENS);
    let mut c = ProcCluster::start(&Shape {
        storage: 2,
        prefill: 2,
        decode: 2,
        conductor_extra: "policy = \"round-robin\"\nretries = 4\nstall_timeout_ms = 10000".into(),
        master_extra: "put_timeout_ms = 3000\nlease_ms = 3000".into(),
    });
    let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let plan = schedule(seed, &names, rounds);
    eprintln!("schedule (seed {seed}):");
    for f in &plan {
        let also = f.also.as_deref().map(|a| format!(" and {a}")).unwrap_or_default();
        eprintln!(
            "  after {:>5} ms kill -9 {}{also}, down {} ms, restart",
            f.after.as_millis(),
            f.node,
            f.down.as_millis()
        );
    }

    // The steady stream: CLIENTS threads, one request at a time each.
    let http = c.http;
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::<Record>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (stop, records, prompts) = (stop.clone(), records.clone(), prompts.clone());
            std::thread::spawn(move || {
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let p = i % prompts.len();
                    let body = json!({"prompt": prompts[p], "max_tokens": MAX_TOKENS, "temperature": 0,
                        "ignore_eos": true, "stream": true});
                    let start = Instant::now();
                    let outcome = stream_completion(http, &body, CLIENT_TIMEOUT);
                    if matches!(outcome, Outcome::Transport(_) | Outcome::Error(_)) {
                        // The conductor is down, or it answered with an
                        // error (a 503 while no decode node is up carries
                        // `Retry-After`): back off like a real client
                        // instead of spinning, which would fill the record
                        // with instant errors and say nothing about retries.
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    records.lock().unwrap().push(Record { prompt: p, start, end: Instant::now(), outcome });
                    i += CLIENTS;
                }
            })
        })
        .collect();

    // The faults, one at a time; the conductor's down windows are kept.
    let mut conductor_down: Vec<(Instant, Instant)> = Vec::new();
    let t0 = Instant::now();
    for f in &plan {
        std::thread::sleep(f.after);
        let victims: Vec<usize> = std::iter::once(&f.node).chain(&f.also).map(|n| c.index(n)).collect();
        let killed = Instant::now();
        for &i in &victims {
            c.kill9(i);
            eprintln!("{:>6.1}s kill -9 {}", t0.elapsed().as_secs_f64(), c.nodes[i].name);
        }
        std::thread::sleep(f.down);
        // Restart in dependency order (the master before storage nodes).
        let mut order = victims.clone();
        order.sort_unstable();
        for &i in &order {
            c.start_node(i);
            eprintln!("{:>6.1}s {} is back", t0.elapsed().as_secs_f64(), c.nodes[i].name);
        }
        if victims.iter().any(|&i| c.nodes[i].role == Role::Conductor) {
            conductor_down.push((killed, Instant::now()));
        }
    }
    // Let the stream run on a healed cluster for a moment, then stop it.
    c.wait_ready(Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for h in clients {
        h.join().unwrap();
    }

    // Judge every request.
    let records = std::mem::take(&mut *records.lock().unwrap());
    let (mut completed, mut errors, mut cut, mut bad) = (0, 0, 0, Vec::new());
    let mut cut_why = std::collections::BTreeMap::<String, usize>::new();
    for r in &records {
        let during_conductor_outage = conductor_down.iter().any(|&(a, b)| r.start <= b && r.end >= a);
        match &r.outcome {
            Outcome::Completed { text, finish } if *text == want[r.prompt] && finish == "length" => completed += 1,
            Outcome::Completed { text, finish } => {
                bad.push(format!("prompt {}: completed ({finish}) with {text:?}, want {:?}", r.prompt, want[r.prompt]))
            }
            Outcome::Error(m) => {
                errors += 1;
                eprintln!("clear error ({:.1}s): {m}", r.end.duration_since(r.start).as_secs_f64());
            }
            Outcome::Transport(m) if during_conductor_outage => {
                cut += 1;
                *cut_why.entry(m.chars().take(60).collect::<String>()).or_insert(0) += 1;
            }
            Outcome::Transport(m) => bad.push(format!("prompt {}: the connection broke: {m}", r.prompt)),
            Outcome::Hung(m) => bad.push(format!("prompt {}: hung: {m}", r.prompt)),
        }
    }
    eprintln!(
        "seed {seed}: {} requests: {completed} completed exactly, {errors} clear errors, {cut} cut by the conductor's \
         own death, {} bad",
        records.len(),
        bad.len()
    );
    eprintln!("cut by the conductor's death: {cut_why:#?}");
    assert!(bad.is_empty(), "seed {seed}: {bad:#?}");
    // Retries carry requests over worker and store deaths: most of those
    // not cut by the conductor's own death complete.
    let judged = records.len() - cut;
    assert!(completed >= judged / 2, "seed {seed}: only {completed} of {judged} requests completed");

    // Healed: every prompt answers exactly again.
    for (p, w) in prompts.iter().zip(&want) {
        let body = json!({"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": true, "stream": true});
        match stream_completion(http, &body, CLIENT_TIMEOUT) {
            Outcome::Completed { text, .. } => assert_eq!(&text, w, "seed {seed}: after the faults"),
            o => panic!("seed {seed}: after the faults: {o:?}"),
        }
    }
    // Nothing left behind anywhere, and no block with a bad checksum.
    c.assert_back_to_baseline(Duration::from_secs(30));
    let (listed, read, mismatches) = c.read_back_all_blocks();
    eprintln!("store: {listed} blocks listed, {read} read back, {mismatches} checksum mismatches");
    assert_eq!(mismatches, 0, "seed {seed}: blocks whose checksum fails");
    assert!(read > 0, "seed {seed}: the store holds no block after the run");
}
