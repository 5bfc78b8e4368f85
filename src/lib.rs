//! # Portcullis
//!
//! A hardened WebSocket gateway: it refuses zombie connections **before**
//! the HTTP upgrade and reaps the ones that go silent afterwards.
//!
//! # Layout
//!
//! The pipeline (docs/reference.md, section 1), in the order a connection meets it:
//!
//! - [`server`]: the accept loop (stage 1) and its speculative read;
//!   [`early`]: refusals judged on a head that came with the accept;
//!   [`pipeline`]: one connection's walk through the stages.
//! - [`ban`]: automatic bans, enforced first of all at accept (strikes from every verdict).
//! - [`admit`]: stage 1–2, caps as RAII permits and the per-IP GCRA rate.
//! - [`client_addr`]: who the client is (PROXY protocol, trusted `X-Forwarded-For`).
//! - [`tls`]: `wss://` termination.
//! - [`handshake`]: stage 3, the request head under a total deadline, RFC 6455 checks, answers.
//! - [`auth`]: stage 4, the [`auth::Authenticator`] extension point and the JWT implementation.
//! - [`revocation`]: revocation stores (embedded file log; Redis, shared by a fleet).
//! - [`redis_link`]: the one Redis connection the store and the leases share.
//! - [`session::registry`]: stage 5 per-user caps, and live connections to kick;
//!   [`session::leases`]: the same caps fleet-wide (Redis leases).
//! - [`upstream`]: stage 6, the backend connection.
//! - [`session`]: stage 8, relay, heartbeat and every reaping rule;
//!   [`relay`]: proxy mode's frame-level relay (headers checked, bytes verbatim).
//!
//! Around it: [`config`] (every key and default), [`reject`] (every reason),
//! [`metrics`] (every metric name), [`events`] (metric + log line per
//! verdict), [`admin`] (the admin plane), [`login`] (`POST /login`),
//! [`gateway`] (state, start-up, reload, drain), [`upgrade`] (the binary replaced with every
//! live connection kept: `session::handover` pauses, `upgrade` carries them over),
//! [`demo`] (the demo's page), [`connect`] (the `portcullis connect` client).
// `deny`, not `forbid`: `sockopt` and `upgrade::fdpass` hold the audited exceptions.
#![deny(unsafe_code)]

pub mod admin;
pub mod admit;
pub mod auth;
pub mod ban;
pub mod client_addr;
pub mod clock;
pub mod config;
pub mod connect;
pub mod demo;
pub mod early;
pub mod events;
pub mod fdlimit;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod handshake;
pub mod header;
pub mod login;
pub mod metrics;
pub mod pipeline;
pub mod redis_link;
pub mod reject;
pub mod relay;
pub mod revocation;
pub mod server;
pub mod session;
pub mod shared;
mod sockopt;
pub mod tls;
pub mod upgrade;
pub mod upstream;

pub use config::Config;
pub use gateway::{Gateway, StartError};
pub use reject::{CloseReason, Reject};
pub use shared::Shared;
