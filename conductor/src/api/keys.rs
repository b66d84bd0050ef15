//! API keys on the `/v1` routes (see [`crate::auth`]): 401 without a
//! configured key, 429 beyond the key's limits, both in OpenAI's error
//! shape. The admitted request learns its tenant from [`Tenant`]; the key's
//! in-flight slot is held until the answer is out (to the end of the event
//! stream for a streaming one).

use super::openai::ApiError;
use crate::auth::Denied;
use crate::service::Conductor;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tokio_stream::StreamExt;

/// The tenant of the request's API key (empty: the default tenant).
#[derive(Debug, Clone, Default)]
pub struct Tenant(pub String);

/// The axum middleware.
pub async fn require_key(State(c): State<Arc<Conductor>>, mut req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    let permit = match c.keys.admit(presented) {
        Ok(p) => p,
        Err(d) => return refusal(d).into_response(),
    };
    req.extensions_mut().insert(Tenant(permit.tenant.clone()));
    let resp = next.run(req).await;
    let streaming =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(body))
}

fn refusal(d: Denied) -> ApiError {
    match d {
        Denied::Unauthenticated(why) => {
            ApiError { code: Some("invalid_api_key"), ..ApiError::new(401, "invalid_request_error", why) }
        }
        Denied::NotAdmin => ApiError::new(403, "permission_error", "this API key may not do that"),
        Denied::Limited { message, retry_after_s } => ApiError {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after_s),
            ..ApiError::new(429, "rate_limit_exceeded", message)
        },
    }
}
