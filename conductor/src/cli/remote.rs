//! `tandem generate --cluster FILE`: the same request, sent through a
//! running cluster's prefill and decode nodes instead of this process.

use super::cluster::ClusterConfig;
use anyhow::{bail, Context};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use tandem_decode::wire;
use tandem_model::sampling::SamplingParams;
use tandem_model::tokenizer::Tokenizer;
use tandem_proto::worker as pb;
use tandem_proto::worker::generate_event::Event;
use tandem_proto::worker::prefill_client::PrefillClient;

/// Which nodes to use and how to print.
pub struct Route<'a> {
    pub prefill: Option<&'a str>,
    pub decode: Option<&'a str>,
    pub json: bool,
}

/// The cluster's model (for its tokenizer and chat template).
pub fn cluster_model(path: &Path) -> anyhow::Result<(ClusterConfig, std::path::PathBuf)> {
    let cfg = ClusterConfig::load(path)?;
    let model = tandem_model::fetch::resolve(&cfg.model.path, true)?;
    Ok((cfg, model))
}

pub fn run(
    route: Route<'_>,
    cfg: &ClusterConfig,
    tokenizer: &Tokenizer,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: &SamplingParams,
    stop_ids: Vec<u32>,
) -> anyhow::Result<()> {
    let prefill = match route.prefill {
        Some(name) => cfg.prefill_node(name)?,
        None => cfg.prefill.first().context("the cluster file has no [[prefill]] node")?,
    };
    let decode = match route.decode {
        Some(name) => cfg.decode_node(name)?,
        None => cfg.decode.first().context("the cluster file has no [[decode]] node")?,
    };
    if prefill.listen.port() == 0 || decode.listen.port() == 0 {
        bail!("the chosen nodes listen on port 0 (any port); give them fixed ports in the cluster file");
    }
    let request = pb::GenerateRequest {
        request_id: format!("cli-{}", std::process::id()),
        prompt: prompt.clone(),
        max_tokens: max_tokens.min(u32::MAX as usize) as u32,
        sampling: Some(wire::sampling_to_pb(sampling)),
        stop_ids,
        sampler_step: 0,
        tenant: String::new(),
    };
    let req = pb::PrefillRequest { request: Some(request), decode_addr: decode.listen.to_string(), cached_blocks: 0 };
    let addr = prefill.listen;
    let rt = super::kvstore::runtime()?;
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect_lazy();
        let channel = tandem_proto::cluster_token::authed(channel, cfg.cluster_token.as_ref());
        let started = Instant::now();
        let mut stream = PrefillClient::new(channel)
            .max_decoding_message_size(tandem_proto::handoff::MAX_MESSAGE_BYTES)
            .prefill(req)
            .await
            .with_context(|| format!("prefill node {} at {addr}", prefill.name))?
            .into_inner();
        let mut decoder = tokenizer.decode_stream(true);
        let (mut ids, mut text) = (Vec::new(), String::new());
        let (mut prefilled, mut finished, mut ttft) = (None, None, None);
        let mut stdout = std::io::stdout().lock();
        while let Some(ev) = stream.message().await.context("the request failed")? {
            match ev.event {
                Some(Event::Prefilled(p)) => prefilled = Some(p),
                Some(Event::Tokens(t)) => {
                    ttft.get_or_insert_with(|| started.elapsed());
                    for tok in t.tokens {
                        ids.push(tok.id);
                        let piece = decoder.step(tok.id).ok().flatten().unwrap_or_default();
                        if !route.json {
                            let _ = write!(stdout, "{piece}");
                            let _ = stdout.flush();
                        }
                        text.push_str(&piece);
                    }
                }
                Some(Event::Finished(f)) => finished = Some(f),
                Some(Event::Handoff(_)) | None => {}
            }
        }
        let tail = decoder.flush().ok().flatten().unwrap_or_default();
        text.push_str(&tail);
        let total = started.elapsed();
        let finished = finished.context("the stream ended without a finish event")?;
        let p = prefilled.unwrap_or_default();
        let d = finished.decode.clone().unwrap_or_default();
        if route.json {
            let doc = json!({
                "prompt_ids": prompt,
                "generated_ids": ids,
                "text": text,
                "finish_reason": finished.reason,
                "prefill": { "node": p.node, "cached_blocks": p.cached_blocks, "computed_tokens": p.computed_tokens,
                             "stored_blocks": p.stored_blocks, "queue_us": p.queue_us, "prefill_us": p.prefill_us },
                "decode": { "node": d.node, "fetched_blocks": d.fetched_blocks, "recomputed_tokens": d.recomputed_tokens,
                            "written_back_blocks": d.written_back_blocks, "preemptions": d.preemptions, "fetch_us": d.fetch_us },
                "ttft_seconds": ttft.unwrap_or(total).as_secs_f64(),
                "total_seconds": total.as_secs_f64(),
            });
            println!("{doc}");
        } else {
            let _ = writeln!(stdout, "{tail}");
            eprintln!(
                "\n{} → {} · prompt {} tokens ({} cached blocks, {} computed) · {} tokens · TTFT {:.3} s · total {:.3} s · finish: {}",
                p.node,
                d.node,
                prompt.len(),
                p.cached_blocks,
                p.computed_tokens,
                ids.len(),
                ttft.unwrap_or(total).as_secs_f64(),
                total.as_secs_f64(),
                finished.reason
            );
        }
        Ok(())
    })
}
