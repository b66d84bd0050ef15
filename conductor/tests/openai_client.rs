//! The official `openai` Python client (from PyPI) against `tandem up`, as a
//! user would run both: chat, streaming chat, completions, logprobs, stop
//! strings and errors, checked by `tests/python/openai_client.py`.
//!
//! The client lives in a virtualenv that `scripts/setup.sh` installs; without
//! it this test fails (it is the only check that a real client accepts our
//! responses, so it must not skip silently).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Workers load SmolLM2 and profile themselves before the cluster is up.
const STARTUP_LIMIT: Duration = Duration::from_secs(300);
/// `tandem up` gives each node 15 s to stop after SIGTERM.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("conductor/ has a parent").to_path_buf()
}

/// The virtualenv's interpreter, after checking that it imports `openai`.
fn openai_python() -> PathBuf {
    let python = repo_root().join("target/pyenv/openai/bin/python");
    let imports = Command::new(&python)
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(imports, "the `openai` Python client is not installed at {}: run ./scripts/setup.sh", python.display());
    python
}

/// A running `tandem up`: stopped with SIGTERM (then waited for) when dropped.
struct TandemUp {
    child: Child,
    logs: PathBuf,
    base_url: String,
    model: String,
}

impl TandemUp {
    /// Starts `tandem up` on a free port and waits for its ready line.
    fn start(logs: &Path) -> TandemUp {
        let stderr = std::fs::File::create(logs.join("up.stderr.log")).expect("create up.stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["up", "--http-port", "0", "--logs"])
            .arg(logs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tandem up");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        // Reads until the ready line, then drains stdout so `tandem up` never
        // blocks on a full pipe; the channel closes when stdout does.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut up = TandemUp { child, logs: logs.to_path_buf(), base_url: String::new(), model: String::new() };
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((url, model)) = parse_ready(&line) {
                        (up.base_url, up.model) = (url, model);
                        return up;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("tandem up was not up within {STARTUP_LIMIT:?}\n{}", up.logs_report())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = up.child.wait();
                    panic!("tandem up exited ({status:?}) before it was up\n{}", up.logs_report())
                }
            }
        }
    }

    /// Every file in the logs folder with its last lines, to show why.
    fn logs_report(&self) -> String {
        let mut report = format!("logs in {}:", self.logs.display());
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|d| d.map_while(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for file in files.iter().filter(|f| f.is_file()) {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            report += &format!("\n==> {} <==\n", file.display());
            report += &lines[lines.len().saturating_sub(25)..].join("\n");
        }
        report
    }

    /// Sends SIGTERM and waits; SIGKILL past `SHUTDOWN_LIMIT`. `None` if it
    /// had to be killed.
    fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own, not yet reaped, child's pid with a valid signal.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + SHUTDOWN_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for TandemUp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `Tandem is up: OpenAI API at http://HOST:PORT/v1 (model "NAME")` →
/// (base URL, model name).
fn parse_ready(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("Tandem is up: OpenAI API at ")?;
    let (url, rest) = rest.split_once(' ')?;
    let model = rest.strip_prefix("(model \"")?.strip_suffix("\")")?;
    Some((url.to_string(), model.to_string()))
}

#[test]
fn openai_python_client_talks_to_tandem_up() {
    let python = openai_python();
    let logs = tempfile::Builder::new().prefix("tandem-openai-client-").tempdir().expect("temp dir");
    let started = Instant::now();
    let mut up = TandemUp::start(logs.path());
    println!("tandem up in {:.1?}: {} (model {:?})", started.elapsed(), up.base_url, up.model);

    let script = repo_root().join("tests/python/openai_client.py");
    let ran = Instant::now();
    let out = Command::new(&python)
        .arg(&script)
        .args([&up.base_url, &up.model])
        .stdin(Stdio::null())
        .output()
        .expect("run the openai client script");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.stderr.is_empty() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    println!("client checks took {:.1?}", ran.elapsed());
    assert!(
        out.status.success(),
        "{} failed ({}); see its output above\n{}",
        script.display(),
        out.status,
        up.logs_report()
    );

    let status = up.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "tandem up did not stop cleanly on SIGTERM ({status:?})\n{}",
        up.logs_report()
    );
}
