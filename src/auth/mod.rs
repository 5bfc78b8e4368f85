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
mod precheck;
pub mod provider;
mod realm;
pub mod sign;
mod state;

use std::net::SocketAddr;

use crate::config::Carrier;
use crate::handshake::{HeadView, RequestHead};
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
    /// One of the token reasons, with the `error_description` the client
    /// is told (a fixed text: never an echo of the credential).
    Described { reason: Reject, description: &'static str },
}

/// The description of a `sub` that cannot be sent as a header value.
pub const BAD_SUB: &str = "the sub claim is not a valid header value";
/// The description of a forwarded claim that cannot be sent as a header value.
pub const BAD_CLAIM: &str = "a forwarded claim is not a valid header value";
/// The description of identity headers with an invalid name.
pub const BAD_HEADER_NAME: &str = "a forwarded header name is not valid";

/// Can `v` be sent as an HTTP header value? (The rule of the `http` crate,
/// which builds the upstream request: no control character but tab.)
pub fn header_value_ok(v: &str) -> bool {
    tokio_tungstenite::tungstenite::http::HeaderValue::from_str(v).is_ok()
}

/// Stage 4: asks `auth`, then checks that the identity it yields can
/// travel upstream as headers (`X-Portcullis-Sub`, forwarded headers), so
/// a bad one is refused here as `invalid_token`, told why, rather than
/// failing at stage 6 as a 502. Whatever the authenticator.
pub async fn authenticate(
    auth: &dyn Authenticator,
    head: &RequestHead,
    client: SocketAddr,
) -> Result<Identity, AuthRefusal> {
    let id = auth.authenticate(head, client).await?;
    check_identity(&id)?;
    Ok(id)
}

/// The header rules of [`authenticate`] on an identity.
pub fn check_identity(id: &Identity) -> Result<(), AuthRefusal> {
    let refuse = |description| Err(AuthRefusal::Described { reason: Reject::InvalidToken, description });
    if id.sub.is_empty() || !header_value_ok(&id.sub) {
        return refuse(BAD_SUB);
    }
    for (name, value) in &id.forward {
        if tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return refuse(BAD_HEADER_NAME);
        }
        if !header_value_ok(value) {
            return refuse(BAD_CLAIM);
        }
    }
    Ok(())
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

    /// A refusal decided at once, without allocating and without I/O, on
    /// a head that arrived whole with its connection: the accept loop
    /// answers it without spawning a task. `None` (the default): not
    /// decided here, `authenticate` runs. Whatever this returns must be
    /// exactly what `authenticate` would answer.
    fn refuse_early(&self, _head: &HeadView<'_>) -> Option<AuthRefusal> {
        None
    }
}
