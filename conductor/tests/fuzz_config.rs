//! Fuzz target `cluster_toml`: the cluster file loader behind every role
//! and `tandem check-config` ([`ClusterConfig::load`], then the modeled
//! compute profile `check-config` prints). Generated valid clusters must
//! load with what they say; they, the example files and the corpus mutated
//! byte by byte and line by line must load or fail with an error naming the
//! file, never panic, and cost memory in proportion to the file.
//! See `fuzz/README.md`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use tandem_conductor::cli::cluster::ClusterConfig;

/// A generated cluster: worker names and ports, and knobs in their ranges.
#[derive(Debug, Clone)]
struct Spec {
    prefill: usize,
    decode: usize,
    max_batch: u32,
    chunk_tokens: u32,
    block_tokens: u32,
    kv_dtype: &'static str,
    policy: &'static str,
    storage: usize,
    dram_mib: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0usize..4,
        0usize..4,
        1u32..64,
        1u32..4096,
        prop_oneof![Just(16u32), Just(1), Just(64)],
        prop_oneof![Just("f32"), Just("bf16")],
        prop_oneof![Just("kv-centric"), Just("random"), Just("round-robin"), Just("least-loaded")],
        0usize..3,
        1u64..512,
    )
        .prop_map(
            |(prefill, decode, max_batch, chunk_tokens, block_tokens, kv_dtype, policy, storage, dram_mib)| Spec {
                prefill,
                decode,
                max_batch,
                chunk_tokens,
                block_tokens,
                kv_dtype,
                policy,
                storage,
                dram_mib,
            },
        )
}

fn render(s: &Spec) -> String {
    let mut t = format!(
        "[model]\npath = \"smollm2\"\nkv_dtype = \"{}\"\nblock_tokens = {}\n\n[conductor]\npolicy = \"{}\"\n",
        s.kv_dtype, s.block_tokens, s.policy
    );
    t.push_str("\n[kvstore.master]\nlisten = \"127.0.0.1:7400\"\n");
    for i in 0..s.storage {
        t.push_str(&format!(
            "\n[[kvstore.storage]]\nname = \"store-{i}\"\nlisten = \"127.0.0.1:{}\"\ndata_listen = \"127.0.0.1:{}\"\n\
             dram = \"{}MiB\"\n",
            7410 + 2 * i,
            7411 + 2 * i,
            s.dram_mib
        ));
    }
    for i in 0..s.prefill {
        t.push_str(&format!(
            "\n[[prefill]]\nname = \"prefill-{i}\"\nlisten = \"127.0.0.1:{}\"\nchunk_tokens = {}\n",
            7600 + i,
            s.chunk_tokens
        ));
    }
    for i in 0..s.decode {
        t.push_str(&format!(
            "\n[[decode]]\nname = \"decode-{i}\"\nlisten = \"127.0.0.1:{}\"\nmax_batch = {}\n",
            7700 + i,
            s.max_batch
        ));
    }
    t
}

/// Line-level edits a person makes: a line dropped, doubled or moved, a
/// value swapped for another line's.
fn line_edit(text: &[u8], edit: (u8, Index, Index)) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let (kind, a, b) = edit;
    let (i, j) = (a.index(lines.len()), b.index(lines.len()));
    match kind % 4 {
        0 => {
            lines.remove(i);
        }
        1 => lines.insert(i, lines[i].clone()),
        2 => lines.swap(i, j),
        _ => {
            let eq = |l: &[u8]| l.iter().position(|&c| c == b'=');
            if let (Some(k), Some(v)) = (eq(&lines[i]), eq(&lines[j])) {
                lines[i] = [&lines[i][..k], &lines[j][v..]].concat();
            }
        }
    }
    lines.join(&b'\n')
}

fn check(bytes: &[u8], path: &Path) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| e.to_string())?;
    let (loaded, alloc) = harness::measure(|| ClusterConfig::load(path));
    // toml's document tree costs tens of bytes per input byte.
    harness::check_alloc(alloc, (256 << 10) + 64 * bytes.len(), bytes.len())?;
    match loaded {
        Ok(cfg) => {
            // What `check-config` does next.
            let _ = cfg.model.modeled();
            let _ = cfg.workers();
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            match msg.contains(&path.display().to_string()) {
                true => Ok(()),
                false => Err(format!("the error does not name the file: {msg}")),
            }
        }
    }
}

#[test]
fn generated_clusters_load_with_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: harness::cases(256),
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&spec(), |s| {
            std::fs::write(&path, render(&s)).unwrap();
            let cfg = ClusterConfig::load(&path).map_err(|e| TestCaseError::fail(format!("{e:#}\n{}", render(&s))))?;
            prop_assert_eq!(
                (cfg.prefill.len(), cfg.decode.len(), cfg.kvstore.storage.len()),
                (s.prefill, s.decode, s.storage)
            );
            prop_assert_eq!(cfg.model.block_tokens as u64, u64::from(s.block_tokens));
            for d in &cfg.decode {
                prop_assert_eq!(d.max_batch as u32, s.max_batch);
            }
            for p in &cfg.prefill {
                prop_assert_eq!(p.chunk_tokens as u32, s.chunk_tokens);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_cluster_files_load_or_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    let seeds: Vec<Vec<u8>> = harness::corpus("cluster_toml").into_iter().map(|(_, b)| b).collect();
    let generated = spec().prop_map(|s| render(&s).into_bytes()).boxed();
    let edits = proptest::collection::vec((any::<u8>(), any::<Index>(), any::<Index>()), 1..4);
    let line_edited = (prop_oneof![generated.clone(), proptest::sample::select(seeds.clone())], edits)
        .prop_map(|(mut text, edits)| {
            for e in edits {
                text = line_edit(&text, e);
            }
            text
        })
        .boxed();
    let strategy = prop_oneof![line_edited, harness::mutated_from(generated, seeds.clone()), harness::mutated(seeds)];
    harness::fuzz("cluster_toml", 384, strategy.boxed(), |b| check(b, &path));
}
