//! The refusal fast path: stages 2 to 4 judged on a request head that
//! arrived with its connection, synchronously, without a task and without
//! allocating.
//!
//! The accept loop (`server`) reads once, right after accept, before the
//! socket is registered with the reactor. With `TCP_DEFER_ACCEPT` the head
//! is almost always there already. When it is complete, [`judge`] runs the
//! same checks the pipeline would, in the same order, on a borrowed head:
//! the rate (429), the head itself (400/431), path, upgrade and `Origin`,
//! and the authenticator's early refusals (missing, malformed, forged or
//! expired tokens). A refusal is written from a stack buffer and the socket
//! closed: accept, read, write, close. Anything else (a valid token, an
//! asymmetric signature to verify, `/login`, a custom authenticator)
//! continues in the pipeline with the bytes already read.
//!
//! It must answer exactly what the pipeline would: the checks are the
//! pipeline's own functions, run against [`handshake::Request`].

use std::net::SocketAddr;

use crate::admit::IpKey;
use crate::auth::AuthRefusal;
use crate::config::Config;
use crate::handshake::{self, parse_view, Request};
use crate::pipeline;
use crate::reject::Reject;
use crate::shared::Shared;

/// Room for the longest refusal answer (a token refusal with its
/// challenge and description, or a 429 with `Retry-After`: under 400 bytes).
pub const ANSWER_MAX: usize = 1024;

/// What the fast path decided about a complete head.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer the first `len` bytes of the answer buffer and close.
    Refuse { reason: Reject, len: usize },
    /// The pipeline decides; the rate (stage 2) was already checked.
    Continue,
}

/// Judges `head`, a complete request head (up to and including its blank
/// line) from `client`, a client that is not a trusted proxy. A refusal's
/// answer is written into `answer`.
pub fn judge(shared: &Shared, cfg: &Config, client: SocketAddr, head: &[u8], answer: &mut [u8]) -> Verdict {
    match verdict(shared, cfg, client, head) {
        Ok(()) => Verdict::Continue,
        Err(r) => {
            let status = r.reason.status().unwrap_or(400);
            let mut out = &mut answer[..];
            let room = out.len();
            match handshake::write_refusal(&mut out, r.reason, status, r.retry_after, r.description) {
                Ok(()) => Verdict::Refuse { reason: r.reason, len: room - out.len() },
                // Cannot happen with `ANSWER_MAX` (the longest answer is a
                // fixed text); the pipeline would answer it anyway.
                Err(_) => Verdict::Continue,
            }
        }
    }
}

/// A refusal and what its answer says.
struct Refusal {
    reason: Reject,
    retry_after: Option<u64>,
    description: Option<&'static str>,
}

impl From<Reject> for Refusal {
    fn from(reason: Reject) -> Refusal {
        Refusal { reason, retry_after: None, description: None }
    }
}

/// Stages 2 to 4, in the pipeline's order.
fn verdict(shared: &Shared, cfg: &Config, client: SocketAddr, bytes: &[u8]) -> Result<(), Refusal> {
    // Stage 2. The pipeline reads the head of a limited client before its
    // 429 too; here the head is already read.
    if let Err(retry) = shared.rate.check(IpKey::new(client.ip())) {
        return Err(Refusal { reason: Reject::IpRate, retry_after: Some(retry), description: None });
    }
    // Stage 3.
    let head = parse_view(bytes).map_err(|e| Refusal::from(e.reject()))?;
    if head.method() == "POST" && head.path() == "/login" && cfg.auth.login.enabled {
        return Ok(());
    }
    if crate::demo::is_page_request(shared, &head) {
        return Ok(());
    }
    pipeline::validate(cfg, &head)?;
    // Stage 4: only what the authenticator can refuse without I/O.
    match shared.auth.refuse_early(&head) {
        None => Ok(()),
        Some(AuthRefusal::Reason(reason)) => Err(reason.into()),
        Some(AuthRefusal::Described { reason, description }) => {
            Err(Refusal { reason, retry_after: None, description: Some(description) })
        }
        // A custom answer is the pipeline's to write.
        Some(AuthRefusal::Custom { .. }) => Ok(()),
    }
}
