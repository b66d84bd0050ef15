//! The cluster token: a shared secret every internal call carries, so a
//! process without it can neither call a node's gRPC services nor move KV
//! blocks on the data plane.
//!
//! - gRPC: clients attach it as `x-tandem-cluster-token` metadata
//!   ([`AttachToken`], wrapped around a channel by [`authed`]); servers
//!   refuse calls without it with `UNAUTHENTICATED` ([`RequireToken`]).
//! - The tcp data plane sends it in the first frame of every connection
//!   (`kvstore::transport::frame`), checked with [`ClusterToken::matches`].
//!
//! Comparisons are constant-time over SHA-256 digests, so neither the
//! token's bytes nor its length leak through timing. No token configured
//! means no check (a loopback or otherwise trusted deployment). The token
//! travels in clear: on an untrusted network run the cluster over a
//! private network or a TLS tunnel.

use crate::auth::{digest, digests_equal};
use std::sync::Arc;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::{Interceptor, InterceptorLayer};
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The gRPC metadata key that carries the token.
pub const CLUSTER_TOKEN_HEADER: &str = "x-tandem-cluster-token";
/// Shortest token accepted (a guessable token protects nothing).
pub const MIN_TOKEN_BYTES: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// The cluster's shared secret. Cheap to clone; `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterToken(Arc<Secret>);

struct Secret {
    value: AsciiMetadataValue,
    digest: [u8; 32],
}

impl ClusterToken {
    /// A token from its text (surrounding whitespace, e.g. a file's
    /// trailing newline, is dropped): 16 to 1024 printable ASCII
    /// characters without spaces, so it fits a header.
    pub fn new(text: &str) -> Result<ClusterToken, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_BYTES || t.len() > MAX_TOKEN_BYTES {
            return Err(format!(
                "the cluster token is {} bytes; it must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES}",
                t.len()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the cluster token must be printable ASCII without spaces".into());
        }
        let value = AsciiMetadataValue::try_from(t).map_err(|e| format!("the cluster token: {e}"))?;
        Ok(ClusterToken(Arc::new(Secret { value, digest: digest(t.as_bytes()) })))
    }

    /// The token's bytes, for the data-plane handshake.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.value.as_encoded_bytes()
    }

    /// Whether `presented` is this token (constant-time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        digests_equal(&digest(presented), &self.0.digest)
    }
}

impl PartialEq for ClusterToken {
    fn eq(&self, other: &ClusterToken) -> bool {
        digests_equal(&self.0.digest, &other.0.digest)
    }
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

/// Client side: adds the token (when there is one) to every call.
#[derive(Debug, Clone, Default)]
pub struct AttachToken(Option<ClusterToken>);

impl AttachToken {
    pub fn new(token: Option<ClusterToken>) -> AttachToken {
        AttachToken(token)
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            request.metadata_mut().insert(CLUSTER_TOKEN_HEADER, t.0.value.clone());
        }
        Ok(request)
    }
}

/// A channel to another node of the cluster, carrying the token.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

/// Wraps `channel` so every call on it carries `token`.
pub fn authed(channel: Channel, token: Option<&ClusterToken>) -> AuthChannel {
    InterceptedService::new(channel, AttachToken(token.cloned()))
}

/// The server layer that refuses calls without `token` (none: a layer
/// that lets every call through), for `Server::builder().layer(..)`.
pub fn require_token(token: Option<ClusterToken>) -> InterceptorLayer<RequireToken> {
    InterceptorLayer::new(RequireToken(token))
}

/// Server side: refuses calls that do not carry the token (none
/// configured: every call passes).
#[derive(Debug, Clone, Default)]
pub struct RequireToken(Option<ClusterToken>);

impl RequireToken {
    pub fn new(token: Option<ClusterToken>) -> RequireToken {
        RequireToken(token)
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.0 else { return Ok(request) };
        match request.metadata().get(CLUSTER_TOKEN_HEADER) {
            Some(v) if token.matches(v.as_encoded_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "this node requires the cluster token (x-tandem-cluster-token); see [auth] in the cluster file",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef-token";

    #[test]
    fn tokens_are_checked_for_shape_and_compare_by_value() {
        let t = ClusterToken::new(&format!("  {T}\n")).unwrap();
        assert_eq!(t.as_bytes(), T.as_bytes(), "surrounding whitespace is dropped");
        assert!(t.matches(T.as_bytes()));
        assert!(!t.matches(b"0123456789abcdef-tokeN"));
        assert!(!t.matches(b""));
        assert_eq!(t, ClusterToken::new(T).unwrap());
        assert!(ClusterToken::new("short").unwrap_err().contains("16"));
        assert!(ClusterToken::new("0123456789 abcdef").unwrap_err().contains("printable"));
        assert!(ClusterToken::new(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_err());
        assert!(!format!("{t:?}").contains(T), "Debug never shows the secret");
    }

    #[test]
    fn the_interceptors_agree_and_refuse_what_lacks_the_token() {
        let t = ClusterToken::new(T).unwrap();
        let mut server = RequireToken::new(Some(t.clone()));
        let attached = AttachToken::new(Some(t)).call(Request::new(())).unwrap();
        assert!(server.call(attached).is_ok());
        let bare = server.call(Request::new(())).unwrap_err();
        assert_eq!(bare.code(), tonic::Code::Unauthenticated);
        let other = ClusterToken::new("another-token-of-enough-length").unwrap();
        let wrong = AttachToken::new(Some(other)).call(Request::new(())).unwrap();
        assert_eq!(server.call(wrong).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(RequireToken::default().call(Request::new(())).is_ok(), "no token configured: no check");
    }
}
