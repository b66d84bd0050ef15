//! Small statistics and result-file helpers.

use std::path::{Path, PathBuf};

/// The median of `xs` (the mean of the middle two for even lengths).
pub fn median(xs: &[f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `bench/results/` of the repository (or `$TANDEM_BENCH_RESULTS`).
pub fn results_dir() -> PathBuf {
    std::env::var_os("TANDEM_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results"))
}

/// A path as result files record it: relative to the repository when it
/// lies inside it, so results name no machine's folders.
pub fn repo_relative(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (Ok(root), Ok(full)) = (root.canonicalize(), path.canonicalize()) else {
        return path.display().to_string();
    };
    full.strip_prefix(&root).map_or_else(|_| path.display().to_string(), |p| p.display().to_string())
}

/// Writes `value` as pretty JSON to `results_dir()/name`.
pub fn write_result(name: &str, value: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(path)
}

/// Writes a result to `path` when given, else to `bench/results/<name>`.
pub fn write_result_to(
    path: Option<&std::path::Path>,
    name: &str,
    value: &serde_json::Value,
) -> anyhow::Result<PathBuf> {
    let Some(p) = path else { return write_result(name, value) };
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(p, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(p.to_owned())
}

/// A short description of the machine for result files.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    serde_json::json!({
        "cpu": cpu,
        "threads": rayon::current_num_threads(),
        "simd": format!("{:?}", tandem_kernels::cpu::simd_level()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}

/// A finished bench: print [`Report::table`], save with [`Report::write`].
#[derive(Debug)]
pub struct Report {
    pub json: serde_json::Value,
    pub table: String,
    /// Stages that failed (their errors are in the JSON and the table).
    pub failed_stages: Vec<String>,
    pub targets_met: usize,
    pub targets_total: usize,
    /// The file under `bench/results/` it is written to by default.
    pub file_name: &'static str,
}

impl Report {
    /// Writes the JSON to `path`, or to `bench/results/<file_name>`.
    pub fn write(&self, path: Option<&Path>) -> anyhow::Result<PathBuf> {
        write_result_to(path, self.file_name, &self.json)
    }
}
