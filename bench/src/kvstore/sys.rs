//! Small pieces of the machine the kvstore bench needs: where shared memory
//! lives, CPU time of this and other processes, load, a seeded generator,
//! percentiles and byte-size labels.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directory segment files go in: `/dev/shm` when it is a writable
/// directory, else a fresh temporary directory (kept alive by the returned
/// guard) and a note saying so.
#[derive(Debug)]
pub struct ShmDir {
    pub path: PathBuf,
    /// Why `path` is not `/dev/shm`, when it is not.
    pub note: Option<String>,
    _temp: Option<tempfile::TempDir>,
}

impl ShmDir {
    /// `/dev/shm` (or `forced`) when writable, else a temporary directory.
    pub fn pick(forced: Option<&Path>) -> anyhow::Result<ShmDir> {
        let wanted = forced.unwrap_or(Path::new("/dev/shm"));
        match tempfile::Builder::new().prefix("tandem-bench-probe").tempfile_in(wanted) {
            Ok(_) => Ok(ShmDir { path: wanted.to_owned(), note: None, _temp: None }),
            Err(e) if forced.is_some() => {
                Err(e).with_context(|| format!("--shm-dir {} is not a writable directory", wanted.display()))
            }
            Err(e) => {
                let temp = tempfile::tempdir().context("creating a temporary directory for segment files")?;
                let note = format!(
                    "{} is not usable ({e}); segment files are in {} instead, which may be disk-backed",
                    wanted.display(),
                    temp.path().display()
                );
                Ok(ShmDir { path: temp.path().to_owned(), note: Some(note), _temp: Some(temp) })
            }
        }
    }
}

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn self_cpu_secs() -> f64 {
    rusage_secs(libc::RUSAGE_SELF)
}

/// CPU seconds (user + system) of this process's children that have ended
/// and been waited for (redis-server, redis-benchmark).
pub fn children_cpu_secs() -> f64 {
    rusage_secs(libc::RUSAGE_CHILDREN)
}

fn rusage_secs(who: libc::c_int) -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`; getrusage only writes it.
    let rc = unsafe { libc::getrusage(who, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds (user + system) process `pid` has used so far, from
/// `/proc/<pid>/stat` (10 ms resolution); `None` when unreadable.
pub fn pid_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; count fields after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are utime and stime; `rest` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// CPU seconds the machine has spent busy since boot (user, nice, system,
/// irq, softirq), from `/proc/stat`. Interrupt time counts: the kernel
/// samples it apart from user and system time, yet a process's own usage
/// includes the softirq work (loopback tcp) done on its behalf.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq ...
    let busy = fields.first()? + fields.get(1)? + fields.get(2)? + fields.get(5)? + fields.get(6)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The 1, 5 and 15 minute load averages.
/// CPU seconds other processes took during a run, and a note for the
/// report when they were enough to disturb it (over 10 % of the run).
pub fn other_cpu(
    tag: &str,
    secs: f64,
    busy_before: Option<f64>,
    bench_cpu: f64,
) -> (Option<f64>, Option<f64>, Option<String>) {
    let busy = busy_before.zip(machine_busy_secs()).map(|(a, b)| b - a);
    let other = busy.map(|busy| (busy - bench_cpu).max(0.0));
    let note = other.filter(|o| *o > 0.1 * secs).map(|other| {
        let note = format!(
            "other processes used {other:.0} CPU seconds during this {secs:.0} s run (of {} cores): \
             the machine was not idle, absolute numbers and ratios may be disturbed",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        eprintln!("[{tag} bench] note: {note}");
        note
    });
    (busy, other, note)
}

pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Transparent huge page settings (anonymous memory and shmem), which
/// shape both sides of the shm-vs-memcpy comparison.
pub fn thp_settings() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "unknown".into());
    serde_json::json!({
        "enabled": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "shmem_enabled": read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
    })
}

/// SplitMix64: a tiny seeded generator for key choice and fill patterns.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Fills `buf` with pseudo-random bytes (every page written, so touched).
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for chunk in buf.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// A buffer of `len` pseudo-random bytes, every page already faulted in.
pub fn filled(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

/// The `q`-quantile (0..=1) of `xs` by nearest rank; 0 for no samples.
pub fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A short label of a power-of-two byte size: `64k`, `2m`.
pub fn size_tag(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}m", bytes >> 20)
    } else if bytes.is_multiple_of(1024) {
        format!("{}k", bytes >> 10)
    } else {
        format!("{bytes}b")
    }
}

/// Gigabytes (10^9 bytes) per second.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&xs, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn size_tags_are_short() {
        assert_eq!(size_tag(64 << 10), "64k");
        assert_eq!(size_tag(2 << 20), "2m");
        assert_eq!(size_tag(100), "100b");
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let before = self_cpu_secs();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(self_cpu_secs() > before);
        assert!(pid_cpu_secs(std::process::id()).is_some());
        assert!(machine_busy_secs().is_some_and(|b| b > 0.0));
    }
}
