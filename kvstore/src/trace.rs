//! Mooncake traces (FAST'25 release format; see `fixtures/traces/README.md`).
//!
//! One JSON object per line:
//! `{"timestamp": <ms>, "input_length": <tokens>, "output_length": <tokens>, "hash_ids": [<int>, ...]}`.
//! `hash_ids` name the request's prompt blocks of `block_tokens` tokens
//! (512 in the published traces), prefix-chained: equal ids mean an identical
//! prefix up to and including that block.
//!
//! Parsing is strict and bounded: every limit is in [`TraceOptions`], every
//! error names the 1-based line it was found on, and nothing in the input can
//! make the parser panic or allocate without bound. Blank lines are skipped.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival time, milliseconds since the start of the trace.
    pub timestamp_ms: u64,
    /// Prompt length in tokens.
    pub input_length: u32,
    /// Generated length in tokens.
    pub output_length: u32,
    /// Prefix-chained block ids of the prompt, `ceil(input_length / block_tokens)` of them.
    pub hash_ids: Vec<u64>,
}

/// Limits and conventions for [`parse_trace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceOptions {
    /// Tokens per block named by a hash id.
    pub block_tokens: u32,
    /// Longest accepted line, in bytes, without its line terminator.
    pub max_line_bytes: usize,
    /// Most requests accepted in one trace.
    pub max_requests: usize,
    /// Most blocks accepted in one request.
    pub max_hash_ids: usize,
    /// Check the prefix-chain property: a hash id always sits at the same
    /// position after the same predecessor. Costs one map entry per unique block.
    pub check_prefix_chain: bool,
}

impl TraceOptions {
    /// The published traces' block size.
    pub const DEFAULT_BLOCK_TOKENS: u32 = 512;
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            block_tokens: TraceOptions::DEFAULT_BLOCK_TOKENS,
            max_line_bytes: 1 << 20,
            max_requests: 1 << 22,
            // 64k blocks of 512 tokens: 32M tokens, far beyond any context window.
            max_hash_ids: 1 << 16,
            check_prefix_chain: true,
        }
    }
}

/// Why a trace was rejected. Every variant but [`TraceError::Open`] and
/// [`TraceError::InvalidOptions`] names the 1-based line at fault; all of them
/// are permanent (fix the file or the options).
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot open trace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("invalid trace options: {0}")]
    InvalidOptions(String),
    #[error("line {line}: read failed: {source}")]
    Read { line: usize, source: io::Error },
    #[error("line {line}: longer than the limit of {max_bytes} bytes")]
    LineTooLong { line: usize, max_bytes: usize },
    #[error("line {line}: invalid request JSON at column {column}: {message}")]
    Json { line: usize, column: usize, message: String },
    #[error("line {line}: more than the limit of {max} requests")]
    TooManyRequests { line: usize, max: usize },
    #[error("line {line}: {count} hash_ids, more than the limit of {max}")]
    TooManyHashIds { line: usize, count: usize, max: usize },
    #[error(
        "line {line}: {actual} hash_ids, but input_length {input_length} needs ceil({input_length} / \
         {block_tokens}) = {expected}"
    )]
    BlockCountMismatch { line: usize, input_length: u32, block_tokens: u32, expected: u64, actual: usize },
    #[error("line {line}: timestamp {timestamp_ms} is before the previous request's {previous_ms}")]
    TimestampDecreased { line: usize, timestamp_ms: u64, previous_ms: u64 },
    #[error(
        "line {line}: hash id {id} at block {position} breaks the prefix chain (first seen on line \
         {first_line} at block {first_position} after a different prefix)"
    )]
    BrokenPrefixChain { line: usize, id: u64, position: usize, first_line: usize, first_position: usize },
}

/// A line as written in the file; the strict fields of [`TraceRequest`] are
/// checked from it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    timestamp: u64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Where a hash id was first seen, to check the prefix chain.
struct ChainEntry {
    predecessor: Option<u64>,
    position: usize,
    line: usize,
}

/// Parses a whole trace; see the module docs for the format and checks.
pub fn parse_trace(mut reader: impl BufRead, opts: &TraceOptions) -> Result<Vec<TraceRequest>, TraceError> {
    if opts.block_tokens == 0 {
        return Err(TraceError::InvalidOptions("block_tokens must be at least 1".into()));
    }
    let mut requests = Vec::new();
    let mut chain: HashMap<u64, ChainEntry> = HashMap::new();
    let mut buf = Vec::new();
    let mut line = 0usize;
    let mut previous_ms = 0u64;
    loop {
        line += 1;
        if !read_line(&mut reader, &mut buf, line, opts.max_line_bytes)? {
            return Ok(requests);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if requests.len() >= opts.max_requests {
            return Err(TraceError::TooManyRequests { line, max: opts.max_requests });
        }
        let request = parse_line(&buf, line, opts)?;
        if request.timestamp_ms < previous_ms {
            return Err(TraceError::TimestampDecreased { line, timestamp_ms: request.timestamp_ms, previous_ms });
        }
        previous_ms = request.timestamp_ms;
        if opts.check_prefix_chain {
            check_chain(&mut chain, &request.hash_ids, line)?;
        }
        requests.push(request);
    }
}

/// Opens and parses the trace at `path`.
pub fn load_trace(path: impl AsRef<Path>, opts: &TraceOptions) -> Result<Vec<TraceRequest>, TraceError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| TraceError::Open { path: path.to_owned(), source })?;
    parse_trace(BufReader::new(file), opts)
}

/// Reads one line into `buf` without its terminator, reading at most
/// `max_bytes + 2` bytes of it. False at end of input.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>, line: usize, max_bytes: usize) -> Result<bool, TraceError> {
    buf.clear();
    // Room for the content and "\r\n": a longer line is cut short, and what
    // was read of it is still longer than `max_bytes`.
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX).saturating_add(2);
    let n = reader.by_ref().take(limit).read_until(b'\n', buf).map_err(|source| TraceError::Read { line, source })?;
    if n == 0 {
        return Ok(false);
    }
    let terminated = buf.last() == Some(&b'\n');
    if terminated {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.len() > max_bytes {
        return Err(TraceError::LineTooLong { line, max_bytes });
    }
    Ok(true)
}

fn parse_line(bytes: &[u8], line: usize, opts: &TraceOptions) -> Result<TraceRequest, TraceError> {
    // serde would also accept a struct written as a JSON array; the format is objects only.
    if let Some(pos) = bytes.iter().position(|b| !b.is_ascii_whitespace()).filter(|&p| bytes[p] != b'{') {
        return Err(TraceError::Json { line, column: pos + 1, message: "expected a JSON object".into() });
    }
    let raw: RawRequest = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json appends " at line L column C"; the line is always 1 here.
        let full = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        TraceError::Json { line, column: e.column(), message }
    })?;
    let count = raw.hash_ids.len();
    if count > opts.max_hash_ids {
        return Err(TraceError::TooManyHashIds { line, count, max: opts.max_hash_ids });
    }
    let expected = u64::from(raw.input_length).div_ceil(u64::from(opts.block_tokens));
    if expected != count as u64 {
        return Err(TraceError::BlockCountMismatch {
            line,
            input_length: raw.input_length,
            block_tokens: opts.block_tokens,
            expected,
            actual: count,
        });
    }
    Ok(TraceRequest {
        timestamp_ms: raw.timestamp,
        input_length: raw.input_length,
        output_length: raw.output_length,
        hash_ids: raw.hash_ids,
    })
}

fn check_chain(chain: &mut HashMap<u64, ChainEntry>, ids: &[u64], line: usize) -> Result<(), TraceError> {
    let mut predecessor = None;
    for (position, &id) in ids.iter().enumerate() {
        let entry = chain.entry(id).or_insert(ChainEntry { predecessor, position, line });
        if entry.predecessor != predecessor || entry.position != position {
            return Err(TraceError::BrokenPrefixChain {
                line,
                id,
                position,
                first_line: entry.line,
                first_position: entry.position,
            });
        }
        predecessor = Some(id);
    }
    Ok(())
}

/// Counts that characterise a trace (compare with the trace's README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    /// Requests in the trace.
    pub requests: usize,
    /// Blocks referenced, counting repeats.
    pub block_refs: u64,
    /// Distinct hash ids.
    pub unique_blocks: u64,
    /// Timestamp of the last request.
    pub duration_ms: u64,
    /// Sum of `input_length`.
    pub input_tokens: u64,
    /// Sum of `output_length`.
    pub output_tokens: u64,
}

/// Summarises a parsed trace.
pub fn summarize(trace: &[TraceRequest]) -> TraceSummary {
    let mut unique = std::collections::HashSet::new();
    let mut summary = TraceSummary {
        requests: trace.len(),
        block_refs: 0,
        unique_blocks: 0,
        duration_ms: trace.last().map_or(0, |r| r.timestamp_ms),
        input_tokens: 0,
        output_tokens: 0,
    };
    for r in trace {
        summary.block_refs += r.hash_ids.len() as u64;
        summary.input_tokens += u64::from(r.input_length);
        summary.output_tokens += u64::from(r.output_length);
        unique.extend(r.hash_ids.iter().copied());
    }
    summary.unique_blocks = unique.len() as u64;
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}"#;

    fn parse(text: &str) -> Result<Vec<TraceRequest>, TraceError> {
        parse_trace(text.as_bytes(), &TraceOptions::default())
    }

    fn error(text: &str, opts: &TraceOptions) -> String {
        match parse_trace(text.as_bytes(), opts) {
            Ok(r) => panic!("accepted {text:?}: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts that parsing `text` fails and that the error mentions every fragment.
    fn rejects(text: &str, fragments: &[&str]) {
        rejects_with(text, &TraceOptions::default(), fragments);
    }

    fn rejects_with(text: &str, opts: &TraceOptions, fragments: &[&str]) {
        let msg = error(text, opts);
        for f in fragments {
            assert!(msg.contains(f), "error {msg:?} for {text:?} does not mention {f:?}");
        }
    }

    #[test]
    fn parses_requests_and_skips_blank_lines() {
        let text = format!(
            "{GOOD}\n\n   \r\n{}\r\n{}",
            r#"{"hash_ids": [0, 2, 3], "output_length": 1, "input_length": 1025, "timestamp": 40}"#,
            r#"{"timestamp": 40, "input_length": 0, "output_length": 0, "hash_ids": []}"#,
        );
        let trace = parse(&text).expect("valid trace");
        assert_eq!(trace.len(), 3);
        assert_eq!(
            trace[1],
            TraceRequest { timestamp_ms: 40, input_length: 1025, output_length: 1, hash_ids: vec![0, 2, 3] }
        );
        let s = summarize(&trace);
        assert_eq!((s.requests, s.block_refs, s.unique_blocks, s.duration_ms), (3, 5, 4, 40));
        assert!(parse("").expect("empty trace").is_empty());
    }

    #[test]
    fn block_size_is_a_parameter() {
        let opts = TraceOptions { block_tokens: 16, ..TraceOptions::default() };
        let line = r#"{"timestamp": 0, "input_length": 33, "output_length": 1, "hash_ids": [0, 1, 2]}"#;
        assert_eq!(parse_trace(line.as_bytes(), &opts).map(|t| t.len()).ok(), Some(1));
        rejects(line, &["line 1", "3 hash_ids", "ceil(33 / 512) = 1"]);
        let zero = TraceOptions { block_tokens: 0, ..TraceOptions::default() };
        rejects_with(GOOD, &zero, &["block_tokens"]);
    }

    #[test]
    fn rejects_non_json() {
        rejects(&format!("{GOOD}\nnot json"), &["line 2", "invalid request JSON", "column"]);
        rejects("[1, 2]", &["line 1", "expected a JSON object"]);
        rejects(r#"[0, 1, 1, [0]]"#, &["line 1", "expected a JSON object"]);
        rejects(r#"{"timestamp": 0, "input_length": 1, "#, &["line 1", "EOF"]);
        rejects(&format!("{GOOD} trailing"), &["line 1", "trailing characters"]);
    }

    #[test]
    fn rejects_invalid_utf8() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(b"\n{\"timestamp\": \xff}\n");
        let msg = parse_trace(bytes.as_slice(), &TraceOptions::default()).err().map(|e| e.to_string());
        assert!(msg.as_deref().is_some_and(|m| m.contains("line 2")), "{msg:?}");
    }

    #[test]
    fn rejects_missing_unknown_and_duplicate_fields() {
        rejects(r#"{"timestamp": 0, "input_length": 1, "output_length": 1}"#, &["line 1", "missing field `hash_ids`"]);
        rejects(
            r#"{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0], "model": "x"}"#,
            &["line 1", "unknown field `model`"],
        );
        rejects(
            r#"{"timestamp": 0, "timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [0]}"#,
            &["line 1", "duplicate field `timestamp`"],
        );
    }

    #[test]
    fn rejects_negative_fractional_and_out_of_range_numbers() {
        rejects(r#"{"timestamp": -5, "input_length": 1, "output_length": 1, "hash_ids": [0]}"#, &["line 1", "-5"]);
        rejects(r#"{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [-1]}"#, &["line 1", "-1"]);
        rejects(
            r#"{"timestamp": 1.5, "input_length": 1, "output_length": 1, "hash_ids": [0]}"#,
            &["line 1", "floating point"],
        );
        rejects(
            r#"{"timestamp": 0, "input_length": 5000000000, "output_length": 1, "hash_ids": [0]}"#,
            &["line 1", "5000000000"],
        );
        rejects(r#"{"timestamp": 0, "input_length": "7", "output_length": 1, "hash_ids": [0]}"#, &["line 1", "string"]);
    }

    #[test]
    fn rejects_wrong_block_count() {
        rejects(
            &format!("{GOOD}\n{}", r#"{"timestamp": 1, "input_length": 1025, "output_length": 1, "hash_ids": [0, 1]}"#),
            &["line 2", "2 hash_ids", "input_length 1025", "= 3"],
        );
        rejects(
            r#"{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": [0]}"#,
            &["line 1", "1 hash_ids", "= 0"],
        );
    }

    #[test]
    fn rejects_decreasing_timestamps() {
        let late = r#"{"timestamp": 100, "input_length": 1, "output_length": 1, "hash_ids": [0]}"#;
        let early = r#"{"timestamp": 99, "input_length": 1, "output_length": 1, "hash_ids": [0]}"#;
        rejects(&format!("{late}\n\n{early}"), &["line 3", "timestamp 99", "100"]);
    }

    #[test]
    fn rejects_broken_prefix_chain() {
        let a = r#"{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [0, 1]}"#;
        let b = r#"{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [2, 1]}"#;
        rejects(&format!("{a}\n{b}"), &["line 2", "hash id 1", "block 1", "line 1"]);
        let repeated = r#"{"timestamp": 0, "input_length": 1024, "output_length": 1, "hash_ids": [3, 3]}"#;
        rejects(repeated, &["line 1", "hash id 3"]);
        let unchecked = TraceOptions { check_prefix_chain: false, ..TraceOptions::default() };
        assert!(parse_trace(format!("{a}\n{b}").as_bytes(), &unchecked).is_ok());
    }

    #[test]
    fn enforces_limits() {
        let small = TraceOptions { max_line_bytes: GOOD.len(), max_requests: 2, max_hash_ids: 1, ..Default::default() };
        // Exactly at the line limit is fine (CRLF or LF or no terminator); one more byte is not.
        let one = r#"{"timestamp": 0, "input_length": 1, "output_length": 5, "hash_ids": [0]}"#;
        assert!(parse_trace(format!("{one}\r\n{one}").as_bytes(), &small).is_ok());
        rejects_with(&format!("{one}\n{GOOD} \n"), &small, &["line 2", "longer than", "bytes"]);
        rejects_with(&format!("{one}\n{}", "x".repeat(10 * GOOD.len())), &small, &["line 2", "longer than"]);
        rejects_with(&format!("{one}\n{one}\n\n{one}"), &small, &["line 4", "more than the limit of 2 requests"]);
        rejects_with(GOOD, &small, &["line 1", "2 hash_ids", "limit of 1"]);
    }

    #[test]
    fn options_parse_with_defaults() {
        let opts: TraceOptions = serde_json::from_str(r#"{"block_tokens": 64}"#).expect("valid options");
        assert_eq!(opts, TraceOptions { block_tokens: 64, ..TraceOptions::default() });
        assert!(serde_json::from_str::<TraceOptions>(r#"{"block_size": 64}"#).is_err());
    }

    #[test]
    fn missing_file_names_the_path() {
        let msg = load_trace("/nonexistent/trace.jsonl", &TraceOptions::default()).err().map(|e| e.to_string());
        assert!(msg.as_deref().is_some_and(|m| m.contains("/nonexistent/trace.jsonl")), "{msg:?}");
    }
}
