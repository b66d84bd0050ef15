//! `tandem generate`: run a model in this process and stream its output.

use crate::text::{chat_prompt, find_stop, held_back};
use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use tandem_kernels::device::{ensure_available, Device};
use tandem_kernels::Precision;
use tandem_model::engine::{self, Engine, EngineOptions, Flow, Request};
use tandem_model::kv_cache::KvDType;
use tandem_model::sampling::SamplingParams;

/// Generate text with a model in this process.
///
/// Examples:
///   tandem generate --chat --prompt "What is the capital of France?"
///   tandem generate --model ./Llama-3.2-1B --prompt "Once upon a time" --max-tokens 64
///   tandem generate --prompt-ids 1,9690,198 --max-tokens 8 --json
///   tandem generate --cluster etc/cluster.toml --chat --prompt "Hi!"   (through running workers)
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A known model name (`smollm2`, fetched on first use), a .gguf file,
    /// or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json).
    #[arg(long, short, default_value = "smollm2")]
    model: String,

    /// The prompt text.
    #[arg(long, short, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,

    /// The prompt as comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,

    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long, requires = "prompt")]
    chat: bool,

    /// A system message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,

    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,

    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,

    /// Sample only among the k most likely tokens (0: no limit).
    #[arg(long, default_value_t = 0)]
    top_k: usize,

    /// Nucleus sampling: the smallest set of tokens with this much
    /// probability (1: no limit).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,

    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Stop when the output contains this text (repeatable). The stop text
    /// is not printed.
    #[arg(long)]
    stop: Vec<String>,

    /// Keep generating past end-of-sequence tokens (benchmarks).
    #[arg(long)]
    ignore_eos: bool,

    /// Report each token's log-probability and this many alternatives
    /// (0–20; JSON output).
    #[arg(long)]
    logprobs: Option<usize>,

    /// Element type of the KV cache.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    kv_dtype: String,

    /// Tokens per KV cache page.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    page_tokens: u32,

    /// Most prompt tokens per forward pass (chunked prefill).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65536))]
    chunk_tokens: u32,

    /// The exact f32 path: weights dequantized to f32, no activation
    /// quantization (what the reference tests use; slower).
    #[arg(long)]
    exact: bool,

    /// Run this many copies of the request as one batch (decode speed at
    /// batch N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    batch: u32,

    /// Compute threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,

    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,

    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    json: bool,

    /// Send the request through a running cluster instead of this process:
    /// its first prefill node (or --prefill-node) hands off to its first
    /// decode node (or --decode-node). The model and KV settings come from
    /// the file's [model].
    #[arg(long, conflicts_with_all = ["model", "batch", "stop", "kv_dtype", "page_tokens", "chunk_tokens", "exact", "device"])]
    cluster: Option<PathBuf>,

    /// With --cluster: the prefill node to use.
    #[arg(long, requires = "cluster")]
    prefill_node: Option<String>,

    /// With --cluster: the decode node to hand off to.
    #[arg(long, requires = "cluster")]
    decode_node: Option<String>,
}

/// Per-sequence text state for stop strings.
struct TextState {
    text: String,
    stopped_at: Option<usize>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let device: Device = args.device.parse()?;
    ensure_available(device)?;
    super::set_threads(args.threads)?;
    let precision = if args.exact { Precision::Exact } else { Precision::Fast };
    let (cluster, path) = match &args.cluster {
        Some(file) => {
            let (cfg, path) = super::remote::cluster_model(file)?;
            (Some(cfg), path)
        }
        None => (None, tandem_model::fetch::resolve(&args.model, !args.json)?),
    };
    let loaded = engine::load(&path, precision).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = loaded.tokenizer;

    let prompt_ids = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) if args.chat => chat_prompt(&tokenizer, text, args.system.as_deref())?,
        (None, Some(text)) => tokenizer.encode(text, true)?,
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        logprobs: args.logprobs,
    };
    let stop_ids = if args.ignore_eos { Vec::new() } else { tokenizer.stop_ids().to_vec() };
    if let Some(cfg) = &cluster {
        let route = super::remote::Route {
            prefill: args.prefill_node.as_deref(),
            decode: args.decode_node.as_deref(),
            json: args.json,
        };
        return super::remote::run(route, cfg, &tokenizer, prompt_ids, args.max_tokens, &sampling, stop_ids);
    }
    let batch = args.batch as usize;
    let requests: Vec<Request> = (0..batch)
        .map(|i| Request {
            prompt: prompt_ids.clone(),
            max_tokens: args.max_tokens,
            sampling: SamplingParams { seed: sampling.seed.wrapping_add(i as u64), ..sampling.clone() },
            stop_ids: stop_ids.clone(),
        })
        .collect();

    let page_tokens = args.page_tokens as usize;
    let per_seq = (prompt_ids.len() + args.max_tokens).div_ceil(page_tokens) + 1;
    let options = EngineOptions {
        page_tokens,
        kv_dtype: args.kv_dtype.parse::<KvDType>()?,
        num_pages: per_seq * batch,
        chunk_tokens: args.chunk_tokens as usize,
    };
    let mut engine = Engine::new(loaded.model, options)?;

    let stream_text = !args.json && batch == 1;
    let mut states: Vec<TextState> = (0..batch).map(|_| TextState { text: String::new(), stopped_at: None }).collect();
    let mut decoders: Vec<_> = (0..batch).map(|_| tokenizer.decode_stream(true)).collect();
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0usize;
    let (gens, timings) = engine.generate(&requests, |i, tok| {
        let piece = decoders[i].step(tok.token).ok().flatten().unwrap_or_default();
        let st = &mut states[i];
        st.text.push_str(&piece);
        if let Some(at) = find_stop(&st.text, &args.stop) {
            st.stopped_at = Some(at);
        }
        if stream_text {
            // Print what is certainly not part of a stop string.
            let safe = st.stopped_at.unwrap_or_else(|| held_back(&st.text, &args.stop));
            if safe > printed {
                let _ = write!(stdout, "{}", &st.text[printed..safe]);
                let _ = stdout.flush();
                printed = safe;
            }
        }
        if st.stopped_at.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    })?;
    for (st, dec) in states.iter_mut().zip(decoders.iter_mut()) {
        if st.stopped_at.is_none() {
            st.text.push_str(&dec.flush().ok().flatten().unwrap_or_default());
        }
        if let Some(at) = st.stopped_at {
            st.text.truncate(at);
        }
    }
    if stream_text {
        let _ = writeln!(stdout, "{}", &states[0].text[printed.min(states[0].text.len())..]);
    }
    drop(stdout);

    let t = &timings;
    if args.json {
        let output = |i: usize| {
            let g = &gens[i];
            let mut o = json!({
                "generated_ids": g.ids(),
                "text": states[i].text,
                "finish_reason": format!("{:?}", g.finish_reason).to_lowercase(),
            });
            if args.logprobs.is_some() {
                o["logprobs"] = json!(g
                    .tokens
                    .iter()
                    .map(|s| json!({
                        "token": s.token, "logprob": s.logprob,
                        "top": s.top_logprobs.iter().map(|(id, lp)| json!([id, lp])).collect::<Vec<_>>(),
                    }))
                    .collect::<Vec<_>>());
            }
            o
        };
        let mut doc = json!({
            "model": path.display().to_string(),
            "prompt_ids": prompt_ids,
            "precision": if args.exact { "exact" } else { "fast" },
            "kv_dtype": args.kv_dtype,
            "threads": rayon::current_num_threads(),
            "timings": {
                "batch": batch,
                "prefill_tokens": t.prefill_tokens,
                "prefill_seconds": t.prefill.as_secs_f64(),
                "prefill_tokens_per_second": t.prefill_tokens_per_second(),
                "decode_tokens": t.decode_tokens,
                "decode_seconds": t.decode.as_secs_f64(),
                "decode_tokens_per_second": t.decode_tokens_per_second(),
                "decode_steps": t.decode_steps,
            },
        });
        let first = output(0);
        for (k, v) in first.as_object().expect("an object") {
            doc[k] = v.clone();
        }
        if batch > 1 {
            doc["outputs"] = json!((0..batch).map(output).collect::<Vec<_>>());
        }
        println!("{doc}");
    } else {
        eprintln!(
            "\nprefill: {} tokens in {:.3} s ({:.1} tok/s) · decode: {} tokens in {:.3} s ({:.1} tok/s, batch {batch}) · finish: {:?}",
            t.prefill_tokens,
            t.prefill.as_secs_f64(),
            t.prefill_tokens_per_second(),
            t.decode_tokens,
            t.decode.as_secs_f64(),
            t.decode_tokens_per_second(),
            gens[0].finish_reason,
        );
    }
    Ok(())
}
