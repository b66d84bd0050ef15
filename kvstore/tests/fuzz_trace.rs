//! Fuzz target `trace_jsonl`: the Mooncake trace parser ([`parse_trace`])
//! on generated valid traces (which must round-trip), on those traces and
//! the committed corpus mutated byte by byte and line by line, under the
//! default limits and tight ones. Every input gives the requests or an error
//! naming a line of the input, never a panic, and the parser's memory stays
//! proportional to the input. See `fuzz/README.md`.

#[path = "../../fuzz/harness.rs"]
mod harness;

use proptest::prelude::*;
use proptest::sample::Index;
use tandem_kvstore::trace::{parse_trace, TraceError, TraceOptions, TraceRequest};

const TARGET: &str = "trace_jsonl";
const BLOCK: u64 = TraceOptions::DEFAULT_BLOCK_TOKENS as u64;

/// A valid trace: timestamps never decrease, each request's blocks are a
/// prefix of an earlier request's followed by fresh ids (so the prefix
/// chain holds), and there are `ceil(input_length / 512)` of them.
fn valid_trace() -> impl Strategy<Value = Vec<TraceRequest>> {
    let request = (0u64..2_000, 0u32..6_000, 0u32..300, any::<Index>(), any::<Index>());
    proptest::collection::vec(request, 0..12).prop_map(|reqs| {
        let mut out: Vec<TraceRequest> = Vec::new();
        let (mut ts, mut next_id) = (0u64, 0u64);
        for (dt, input_length, output_length, pick, share) in reqs {
            ts += dt;
            let blocks = u64::from(input_length).div_ceil(BLOCK) as usize;
            let mut hash_ids: Vec<u64> = match out.is_empty() {
                true => Vec::new(),
                false => {
                    let prev = &pick.get(&out).hash_ids;
                    prev[..share.index(prev.len().min(blocks) + 1)].to_vec()
                }
            };
            while hash_ids.len() < blocks {
                hash_ids.push(next_id);
                next_id += 1;
            }
            out.push(TraceRequest { timestamp_ms: ts, input_length, output_length, hash_ids });
        }
        out
    })
}

/// JSONL for `trace` with the field order, spacing, line endings and blank
/// lines varied the ways real files vary them.
fn render(trace: &[TraceRequest], style: &[u8]) -> Vec<u8> {
    let mut text = String::new();
    for (i, r) in trace.iter().enumerate() {
        let s = style.get(i).copied().unwrap_or(0);
        let ids: Vec<String> = r.hash_ids.iter().map(u64::to_string).collect();
        let sep = if s & 1 == 0 { ", " } else { "," };
        let mut fields = [
            format!("\"timestamp\": {}", r.timestamp_ms),
            format!("\"input_length\": {}", r.input_length),
            format!("\"output_length\": {}", r.output_length),
            format!("\"hash_ids\": [{}]", ids.join(sep)),
        ];
        fields.rotate_left(usize::from(s >> 1) % 4);
        if s & 8 != 0 {
            text.push_str("  \n");
        }
        text.push('{');
        text.push_str(&fields.join(sep));
        text.push('}');
        text.push_str(if s & 16 != 0 { "\r\n" } else { "\n" });
    }
    text.into_bytes()
}

fn valid_bytes() -> BoxedStrategy<Vec<u8>> {
    (valid_trace(), proptest::collection::vec(any::<u8>(), 12)).prop_map(|(t, s)| render(&t, &s)).boxed()
}

/// Tight limits, so the limit checks are reached by small inputs.
fn tight() -> TraceOptions {
    TraceOptions { max_line_bytes: 256, max_requests: 6, max_hash_ids: 8, ..TraceOptions::default() }
}

/// The 1-based line an error names, if it names one.
fn error_line(e: &TraceError) -> Option<usize> {
    Some(match e {
        TraceError::Read { line, .. }
        | TraceError::LineTooLong { line, .. }
        | TraceError::Json { line, .. }
        | TraceError::TooManyRequests { line, .. }
        | TraceError::TooManyHashIds { line, .. }
        | TraceError::BlockCountMismatch { line, .. }
        | TraceError::TimestampDecreased { line, .. }
        | TraceError::BrokenPrefixChain { line, .. } => *line,
        TraceError::Open { .. } | TraceError::InvalidOptions(_) => return None,
    })
}

/// Parses `bytes` under `opts` and checks what any answer must satisfy.
fn check_with(bytes: &[u8], opts: &TraceOptions) -> Result<(), String> {
    let (parsed, alloc) = harness::measure(|| parse_trace(bytes, opts));
    // serde_json's values and the chain map cost a few words per input byte.
    harness::check_alloc(alloc, (64 << 10) + 64 * bytes.len(), bytes.len())?;
    let lines = bytes.split(|&b| b == b'\n').count();
    match parsed {
        Ok(trace) => {
            if trace.len() > opts.max_requests {
                return Err(format!("{} requests accepted over the limit {}", trace.len(), opts.max_requests));
            }
            let mut previous = 0;
            for r in &trace {
                let blocks = u64::from(r.input_length).div_ceil(u64::from(opts.block_tokens));
                if r.hash_ids.len() as u64 != blocks || r.hash_ids.len() > opts.max_hash_ids {
                    return Err(format!("accepted a request with {} blocks: {r:?}", r.hash_ids.len()));
                }
                if r.timestamp_ms < previous {
                    return Err(format!("accepted a decreasing timestamp: {r:?}"));
                }
                previous = r.timestamp_ms;
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            match error_line(&e) {
                Some(line) if line >= 1 && line <= lines && msg.contains(&format!("line {line}")) => Ok(()),
                _ => Err(format!("error does not name a line of the {lines}-line input: {msg}")),
            }
        }
    }
}

fn check(bytes: &[u8]) -> Result<(), String> {
    check_with(bytes, &TraceOptions::default())?;
    check_with(bytes, &tight())
}

#[test]
fn generated_traces_round_trip() {
    let strategy = (valid_trace(), proptest::collection::vec(any::<u8>(), 12))
        .prop_map(|(t, s)| {
            // The expected requests travel with the bytes: JSON first line.
            let mut bytes = render(&t, &s);
            let expected: Vec<(u64, u32, u32, Vec<u64>)> =
                t.iter().map(|r| (r.timestamp_ms, r.input_length, r.output_length, r.hash_ids.clone())).collect();
            let mut out = serde_json::to_vec(&expected).unwrap();
            out.push(0);
            out.append(&mut bytes);
            out
        })
        .boxed();
    let run = |input: &[u8]| -> Result<(), String> {
        let Some(split) = input.iter().position(|&b| b == 0) else {
            // A corpus file: only the general checks apply.
            return check(input);
        };
        let expected: Vec<(u64, u32, u32, Vec<u64>)> = serde_json::from_slice(&input[..split]).unwrap();
        let got = parse_trace(&input[split + 1..], &TraceOptions::default()).map_err(|e| e.to_string())?;
        let got: Vec<_> =
            got.into_iter().map(|r| (r.timestamp_ms, r.input_length, r.output_length, r.hash_ids)).collect();
        if got != expected {
            return Err(format!("parsed {got:?}, wrote {expected:?}"));
        }
        check(&input[split + 1..])
    };
    harness::fuzz(TARGET, 256, strategy, run);
}

#[test]
fn mutated_traces_give_requests_or_a_line_numbered_error() {
    let seeds: Vec<Vec<u8>> = harness::corpus(TARGET).into_iter().map(|(_, b)| b).collect();
    let strategy = prop_oneof![
        harness::mutated(seeds.clone()),
        harness::mutated_from(valid_bytes(), seeds),
        proptest::collection::vec(any::<u8>(), 0..512),
    ]
    .boxed();
    harness::fuzz(TARGET, 1024, strategy, check);
}

#[test]
fn a_huge_line_is_refused_without_reading_it_all() {
    // One 8 MiB line of digits: the parser must stop at its line limit.
    let mut line = b"{\"timestamp\": ".to_vec();
    line.resize(8 << 20, b'7');
    let opts = TraceOptions { max_line_bytes: 1 << 16, ..TraceOptions::default() };
    let (parsed, alloc) = harness::measure(|| parse_trace(line.as_slice(), &opts));
    assert!(matches!(parsed, Err(TraceError::LineTooLong { line: 1, .. })), "{parsed:?}");
    assert!(alloc.peak_bytes < 1 << 20, "{alloc:?}");
}
