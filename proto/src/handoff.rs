//! Structural validation of the worker messages (`tandem.worker.v1`) at
//! the boundary, before any work: sizes, counts and the shape of a
//! handoff. What depends on the model (vocabulary, context length, block
//! bytes) is checked by the worker that knows it.

use crate::worker as pb;

/// Longest request id accepted.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Most prompt tokens in one request.
pub const MAX_PROMPT_TOKENS: usize = 1 << 20;
/// Most stop token ids in one request.
pub const MAX_STOP_IDS: usize = 64;
/// Longest tenant name.
pub const MAX_TENANT_BYTES: usize = 64;
/// Largest gRPC message a worker accepts (a handoff carries one block).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Checks a request's shape; the error says what is wrong.
pub fn validate_request(r: &pb::GenerateRequest) -> Result<(), String> {
    if r.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(format!("request_id is {} bytes; the limit is {MAX_REQUEST_ID_BYTES}", r.request_id.len()));
    }
    if r.tenant.len() > MAX_TENANT_BYTES {
        return Err(format!("tenant is {} bytes; the limit is {MAX_TENANT_BYTES}", r.tenant.len()));
    }
    if r.prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    if r.prompt.len() > MAX_PROMPT_TOKENS {
        return Err(format!("the prompt has {} tokens; the limit is {MAX_PROMPT_TOKENS}", r.prompt.len()));
    }
    if r.max_tokens == 0 {
        return Err("max_tokens must be at least 1".into());
    }
    if r.stop_ids.len() > MAX_STOP_IDS {
        return Err(format!("{} stop ids; the limit is {MAX_STOP_IDS}", r.stop_ids.len()));
    }
    // The sampled tokens a resumed request carries are the prompt's tail,
    // after at least one token of the original prompt.
    if r.sampler_step >= r.prompt.len() as u64 {
        return Err(format!(
            "sampler_step is {} but the prompt has {} tokens: it counts sampled tokens the prompt ends with",
            r.sampler_step,
            r.prompt.len()
        ));
    }
    let s = r.sampling.as_ref().ok_or("sampling parameters are missing")?;
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(format!("temperature must be a finite number ≥ 0, got {}", s.temperature));
    }
    if !(s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(format!("top_p must be in (0, 1], got {}", s.top_p));
    }
    Ok(())
}

/// Checks a handoff's shape: a valid request, block keys for exactly the
/// prompt's full blocks, a partial block exactly when the prompt ends
/// mid-block, and a first token.
pub fn validate_handoff(h: &pb::Handoff) -> Result<(), String> {
    let r = h.request.as_ref().ok_or("the handoff has no request")?;
    validate_request(r)?;
    let bt = h.block_tokens as usize;
    if bt == 0 {
        return Err("block_tokens must be at least 1".into());
    }
    if h.block_keys.len() != r.prompt.len() / bt {
        return Err(format!(
            "{} block keys for a prompt of {} tokens in blocks of {bt} (expected {})",
            h.block_keys.len(),
            r.prompt.len(),
            r.prompt.len() / bt
        ));
    }
    if h.partial_tokens as usize != r.prompt.len() % bt {
        return Err(format!(
            "partial_tokens is {} but the prompt leaves {} tokens in its last block",
            h.partial_tokens,
            r.prompt.len() % bt
        ));
    }
    if (h.partial_tokens == 0) != h.partial_block.is_empty() {
        return Err("partial_block must be present exactly when partial_tokens > 0".into());
    }
    if h.first_token.is_none() {
        return Err("the handoff has no first token".into());
    }
    // The prefill node drew the first token at the request's step.
    if h.sampler_step != r.sampler_step + 1 {
        return Err(format!(
            "the handoff's sampler_step is {} but the request resumes at step {}: it must count the first token",
            h.sampler_step, r.sampler_step
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: Vec<u32>) -> pb::GenerateRequest {
        pb::GenerateRequest {
            request_id: "r".into(),
            prompt,
            max_tokens: 4,
            sampling: Some(pb::SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, logprobs: None }),
            stop_ids: vec![],
            sampler_step: 0,
            tenant: String::new(),
        }
    }

    fn handoff(prompt_len: u32, bt: u32) -> pb::Handoff {
        pb::Handoff {
            request: Some(request((0..prompt_len).collect())),
            model_fingerprint: "m".into(),
            kv_dtype: "f32".into(),
            block_tokens: bt,
            block_keys: vec![1; (prompt_len / bt) as usize],
            partial_block: if !prompt_len.is_multiple_of(bt) { vec![0; 8] } else { vec![] },
            partial_tokens: prompt_len % bt,
            first_token: Some(pb::Token { id: 1, logprob: None, top: vec![] }),
            sampler_step: 1,
            prefill: None,
        }
    }

    #[test]
    fn well_formed_messages_pass() {
        validate_request(&request(vec![1, 2, 3])).unwrap();
        validate_handoff(&handoff(37, 16)).unwrap();
        validate_handoff(&handoff(32, 16)).unwrap();
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        let mut r = request(vec![]);
        assert!(validate_request(&r).unwrap_err().contains("empty"));
        r.prompt = vec![1];
        r.max_tokens = 0;
        assert!(validate_request(&r).unwrap_err().contains("max_tokens"));
        r.max_tokens = 1;
        r.request_id = "x".repeat(129);
        assert!(validate_request(&r).is_err());
        r.request_id.clear();
        r.sampling.as_mut().unwrap().temperature = f32::NAN;
        assert!(validate_request(&r).unwrap_err().contains("temperature"));
        r.sampling.as_mut().unwrap().temperature = 1.0;
        r.sampling.as_mut().unwrap().top_p = 0.0;
        assert!(validate_request(&r).unwrap_err().contains("top_p"));
        r.sampling = None;
        assert!(validate_request(&r).is_err());
        r = request(vec![1]);
        r.stop_ids = vec![0; 65];
        assert!(validate_request(&r).is_err());
        r = request(vec![1, 2, 3]);
        r.sampler_step = 2;
        validate_request(&r).unwrap();
        r.sampler_step = 3;
        assert!(validate_request(&r).unwrap_err().contains("sampler_step"));
        r = request(vec![1]);
        r.tenant = "t".repeat(MAX_TENANT_BYTES);
        validate_request(&r).unwrap();
        r.tenant.push('t');
        assert!(validate_request(&r).unwrap_err().contains("tenant"));
    }

    #[test]
    fn malformed_handoffs_are_refused_with_a_reason() {
        let mut h = handoff(37, 16);
        h.block_keys.push(9);
        assert!(validate_handoff(&h).unwrap_err().contains("block keys"));
        let mut h = handoff(37, 16);
        h.partial_tokens = 4;
        assert!(validate_handoff(&h).unwrap_err().contains("partial_tokens"));
        let mut h = handoff(37, 16);
        h.partial_block.clear();
        assert!(validate_handoff(&h).is_err());
        let mut h = handoff(32, 16);
        h.partial_block = vec![1];
        assert!(validate_handoff(&h).is_err());
        let mut h = handoff(37, 16);
        h.block_tokens = 0;
        assert!(validate_handoff(&h).is_err());
        let mut h = handoff(37, 16);
        h.first_token = None;
        assert!(validate_handoff(&h).is_err());
        let mut h = handoff(37, 16);
        h.sampler_step = 0;
        assert!(validate_handoff(&h).unwrap_err().contains("sampler_step"));
        let mut h = handoff(37, 16);
        h.request.as_mut().unwrap().sampler_step = 5;
        assert!(validate_handoff(&h).unwrap_err().contains("sampler_step"), "the first token is one step on");
        h.sampler_step = 6;
        validate_handoff(&h).unwrap();
        let mut h = handoff(37, 16);
        h.request = None;
        assert!(validate_handoff(&h).is_err());
    }
}
