//! Shared harness of the property-based fuzz tests (see `fuzz/README.md`),
//! included by each of them with `#[path = "../../fuzz/harness.rs"] mod harness;`.
//!
//! - [`fuzz`] replays the committed corpus `fuzz/corpus/<target>/`, then runs
//!   `TANDEM_FUZZ_CASES` generated cases (the target's default otherwise)
//!   from a printed seed (`TANDEM_FUZZ_SEED` replays one). A failing case is
//!   shrunk and written under the target directory's tmp folder, ready to be
//!   committed to the corpus.
//! - [`mutated`] is a libFuzzer-style byte mutator over seed inputs: bit
//!   flips, interesting integers written over fields, inserts, deletes,
//!   copies, truncation and splicing of two seeds.
//! - [`measure`] counts what a call allocates on the calling thread (the
//!   largest single allocation and the peak of live bytes), so a test can
//!   assert that a parser never allocates more than its input justifies.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

// ------------------------------------------------------------ allocations

/// The system allocator, counting per thread.
pub struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(size);
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

fn on_dealloc(size: usize) {
    // Memory freed by another thread than the one that took it makes
    // `LIVE` approximate; the parsers measured here run on one thread.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

// SAFETY: every call is forwarded to `System` unchanged; the bookkeeping
// only touches const-initialised thread locals, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_dealloc(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_dealloc(layout.size());
        on_alloc(new_size);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// What a call allocated on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    /// Most bytes live at once, above what was live when the call started.
    pub peak_bytes: usize,
    /// The largest single allocation.
    pub largest_bytes: usize,
}

/// Runs `f`, counting its allocations on this thread.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Allocated) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let r = f();
    let peak = PEAK.with(Cell::get).saturating_sub(base);
    (r, Allocated { peak_bytes: peak, largest_bytes: LARGEST.with(Cell::get) })
}

/// Fails unless `a` stays within `limit_bytes` (both the peak and the
/// largest single allocation).
pub fn check_alloc(a: Allocated, limit_bytes: usize, input_len: usize) -> Result<(), String> {
    if a.peak_bytes > limit_bytes || a.largest_bytes > limit_bytes {
        return Err(format!("an input of {input_len} bytes made the parser allocate {a:?}, over {limit_bytes} bytes"));
    }
    Ok(())
}

// ------------------------------------------------------------------ corpus

/// `fuzz/` at the workspace root.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The committed inputs of `target`, by file name, sorted.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

/// One committed input, by name (for the named regression tests).
pub fn corpus_file(target: &str, name: &str) -> Vec<u8> {
    let path = fuzz_dir().join("corpus").join(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------- mutation

/// Values that break length and count fields.
const INTERESTING: [u64; 16] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    4096,
    1 << 20,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
];

/// The longest input a mutation may grow.
const MAX_MUTATED_BYTES: usize = 1 << 20;

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    /// Writes an interesting value as a little-endian integer of 1, 2, 4 or 8 bytes.
    Interesting(Index, usize, usize),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    /// Copies a range over another place.
    Copy(Index, Index, usize),
    Truncate(Index),
    /// Replaces the tail with the tail of another seed.
    Splice(Index, Index, Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        3 => (any::<Index>(), 0..INTERESTING.len(), 0usize..4).prop_map(|(i, v, w)| Mutation::Interesting(i, v, w)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..32)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), any::<Index>(), 1usize..64).prop_map(|(a, b, n)| Mutation::Copy(a, b, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), any::<Index>()).prop_map(|(s, a, b)| Mutation::Splice(s, a, b)),
    ]
}

/// Applies `m` to `bytes`; `seeds` are the inputs a splice may take from.
pub fn apply(bytes: &mut Vec<u8>, m: &Mutation, seeds: &[Vec<u8>]) {
    let len = bytes.len();
    match m {
        Mutation::FlipBit(i, b) if len > 0 => bytes[i.index(len)] ^= 1 << b,
        Mutation::SetByte(i, v) if len > 0 => bytes[i.index(len)] = *v,
        Mutation::Interesting(i, v, w) if len > 0 => {
            let width = [1, 2, 4, 8][*w];
            let at = i.index(len);
            let le = INTERESTING[*v].to_le_bytes();
            let n = width.min(len - at);
            bytes[at..at + n].copy_from_slice(&le[..n]);
        }
        Mutation::Insert(i, b) if len + b.len() <= MAX_MUTATED_BYTES => {
            let at = i.index(len + 1);
            bytes.splice(at..at, b.iter().copied());
        }
        Mutation::Remove(i, n) if len > 0 => {
            let at = i.index(len);
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Copy(from, to, n) if len > 0 => {
            let (from, to) = (from.index(len), to.index(len));
            let n = (*n).min(len - from).min(len - to);
            bytes.copy_within(from..from + n, to);
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Mutation::Splice(s, a, b) if !seeds.is_empty() => {
            let other = s.get(seeds);
            let cut = a.index(len + 1);
            let from = b.index(other.len() + 1);
            bytes.truncate(cut);
            let room = MAX_MUTATED_BYTES.saturating_sub(bytes.len());
            bytes.extend_from_slice(&other[from..other.len().min(from + room)]);
        }
        _ => {}
    }
}

/// A seed chosen from `seeds` with 1 to 8 mutations applied.
pub fn mutated(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    assert!(!seeds.is_empty());
    (any::<Index>(), proptest::collection::vec(mutation(), 1..8))
        .prop_map(move |(pick, edits)| {
            let mut bytes = pick.get(&seeds).clone();
            for m in &edits {
                apply(&mut bytes, m, &seeds);
            }
            bytes
        })
        .boxed()
}

/// `valid` (generated inputs) with 1 to 8 mutations applied, splicing
/// from `seeds`.
pub fn mutated_from(valid: BoxedStrategy<Vec<u8>>, seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    (valid, proptest::collection::vec(mutation(), 1..8))
        .prop_map(move |(mut bytes, edits)| {
            for m in &edits {
                apply(&mut bytes, m, &seeds);
            }
            bytes
        })
        .boxed()
}

// ------------------------------------------------------------------ runner

/// Cases to run: `TANDEM_FUZZ_CASES`, or the target's default.
pub fn cases(default_cases: u32) -> u32 {
    std::env::var("TANDEM_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default_cases)
}

fn runner(target: &str, default_cases: u32) -> TestRunner {
    let seed = std::env::var("TANDEM_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand_seed);
    let cases = cases(default_cases);
    eprintln!("fuzz {target}: {cases} cases, seed {seed} (TANDEM_FUZZ_SEED={seed} replays it)");
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    })
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Replays the corpus of `target`, then checks `check` on generated inputs.
/// `check` returns `Err` for a wrong answer; a panic inside it is a failure
/// too. The shrunk failing input is saved and its path printed.
pub fn fuzz(
    target: &str,
    default_cases: u32,
    strategy: BoxedStrategy<Vec<u8>>,
    check: impl Fn(&[u8]) -> Result<(), String>,
) {
    for (name, bytes) in corpus(target) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&bytes)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("corpus {target}/{name}: {e}"),
            Err(_) => panic!("corpus {target}/{name}: the parser panicked"),
        }
    }
    let result = runner(target, default_cases).run(&strategy, |bytes| check(&bytes).map_err(TestCaseError::fail));
    match result {
        Ok(()) => {}
        Err(TestError::Abort(why)) => panic!("fuzz {target} aborted: {why}"),
        Err(TestError::Fail(why, bytes)) => {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("crash-{:016x}", fnv1a(&bytes)));
            std::fs::write(&path, &bytes).unwrap();
            panic!(
                "fuzz {target} failed: {why}\nminimal input ({} bytes) saved to {}; add it to fuzz/corpus/{target}/ \
                 with a regression test",
                bytes.len(),
                path.display()
            );
        }
    }
}

/// FNV-1a, to name saved inputs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}
