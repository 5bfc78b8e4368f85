//! Stage 4, authentication: the [`Authenticator`] extension point and the
//! identity it yields.
//!
//! The gateway calls an `Authenticator` after the request head has been
//! parsed and validated (stage 3) and before any upstream connection or 101.
//! The JWT authenticator ([`jwt::JwtAuthenticator`]) is one implementation;
//! `examples/api_key.rs` shows another.

pub mod cache;
pub mod carrier;
pub mod jwt;
pub mod keys;
pub mod sign;

use std::net::SocketAddr;

use crate::config::Carrier;
use crate::handshake::RequestHead;
use crate::reject::Reject;

/// Who a connection belongs to, as an authenticator established it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The subject: per-user caps, revocation by subject and the
    /// `X-Portcullis-Sub` header upstream all key on it.
    pub sub: String,
    /// Unix seconds after which the connection must close (`token_expired`);
    /// the leeway is already added. `None`: never.
    pub expires_at: Option<u64>,
    /// Unix seconds the credential was issued, for revocation by subject.
    pub issued_at: Option<u64>,
    /// The credential's id, for revocation by `jti` on live connections.
    pub jti: Option<String>,
    /// Request headers to send upstream (name, value), e.g. claim headers.
    pub forward: Vec<(String, String)>,
    /// Where the credential came from; `Some(Subprotocol)` makes the 101
    /// answer `Sec-WebSocket-Protocol: bearer`.
    pub carrier: Option<Carrier>,
}

/// A refusal by an authenticator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthRefusal {
    /// One of the pipeline's reasons (normally a token reason, 401).
    Reason(Reject),
    /// A custom answer from a custom authenticator; counted as
    /// `invalid_token` in metrics so label values stay a closed set.
    Custom { status: u16, body: String },
}

impl From<Reject> for AuthRefusal {
    fn from(r: Reject) -> Self {
        AuthRefusal::Reason(r)
    }
}

/// The pluggable check of a handshake, before the upgrade.
///
/// It sees the request head (method, path, every header) and the client
/// address (after PROXY protocol / trusted `X-Forwarded-For`).
#[async_trait::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, head: &RequestHead, client: SocketAddr) -> Result<Identity, AuthRefusal>;
}
