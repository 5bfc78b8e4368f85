//! The admin plane, on its own listener (loopback by default):
//! `/metrics`, `/healthz`, `/readyz`, `POST /admin/revoke`,
//! `GET /admin/connections`, `/admin/bans` (list, ban, lift), `POST /admin/upgrade`,
//! `GET /admin/backends`, `POST /admin/backends/drain` and `/undrain`. With `admin.token` set, `/admin/*` requires
//! `Authorization: Bearer <token>`, compared in constant time.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::carrier::query_param;
use crate::clock::unix_now;
use crate::revocation::Revocation;
use crate::shared::Shared;

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

type Resp = Response<Full<Bytes>>;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    let mut r = text(status, value.to_string());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let cfg = shared.config.load();
    let want = cfg.admin.token.as_bytes();
    if want.is_empty() {
        return true;
    }
    let got = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::header::bearer)
        .unwrap_or("");
    bool::from(got.as_bytes().ct_eq(want))
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => {
            if let Some(j) = &shared.jwt {
                j.publish_key_metrics();
            }
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            let ready = shared.ready();
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            let draining = shared.draining.load(std::sync::atomic::Ordering::Acquire);
            json(
                status,
                &serde_json::json!({
                    "ready": ready,
                    "draining": draining,
                    "connections": shared.caps.total(),
                    "handshaking": shared.slots.total(),
                    "store": if shared.store_up() { "up" } else { "down" },
                    "keys": shared.keys_status().label(),
                    // Which process answers: a binary upgrade changes it.
                    "pid": std::process::id(),
                }),
            )
        }
        (_, p) if p.starts_with("/admin/") => {
            if !authorized(shared, &req) {
                let mut r = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
                );
                return r;
            }
            match (req.method(), p) {
                (&Method::POST, "/admin/revoke") => revoke(shared, req).await,
                (&Method::GET, "/admin/bans") => {
                    json(StatusCode::OK, &serde_json::to_value(shared.bans.list()).unwrap_or_default())
                }
                (&Method::POST, "/admin/bans") => ban(shared, req).await,
                (&Method::DELETE, "/admin/bans") => unban(shared, &req),
                (&Method::POST, "/admin/upgrade") => match crate::upgrade::request(shared, "admin") {
                    Ok(()) => json(StatusCode::ACCEPTED, &serde_json::json!({ "upgrade": "started" })),
                    Err(crate::shared::UpgradeRefused::Running) => json(
                        StatusCode::CONFLICT,
                        &serde_json::json!({ "error": "an upgrade is already running" }),
                    ),
                    Err(crate::shared::UpgradeRefused::Draining) => {
                        json(StatusCode::CONFLICT, &serde_json::json!({ "error": "the gateway is draining" }))
                    }
                    Err(crate::shared::UpgradeRefused::Unavailable) => json(
                        StatusCode::NOT_IMPLEMENTED,
                        &serde_json::json!({ "error": "this process cannot upgrade itself (not the portcullis binary)" }),
                    ),
                },
                (&Method::GET, "/admin/backends") => {
                    // Serialised from the struct, so the keys keep their
                    // documented order (a `Value` would sort them).
                    let body = serde_json::to_string(&shared.upstream.list()).unwrap_or_else(|_| "[]".into());
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    r
                }
                (&Method::POST, "/admin/backends/drain") => backend_drain(shared, req, true).await,
                (&Method::POST, "/admin/backends/undrain") => backend_drain(shared, req, false).await,
                (&Method::GET, "/admin/connections") => {
                    // A bad escape matches no subject rather than listing everyone.
                    let sub = req.uri().query().and_then(|q| query_param(q, "sub"));
                    let list = shared.registry.list(sub.as_deref());
                    json(StatusCode::OK, &serde_json::to_value(list).unwrap_or_default())
                }
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    jti: Option<String>,
    sub: Option<String>,
    before: Option<u64>,
}

async fn revoke(shared: &Shared, req: Request<Incoming>) -> Resp {
    let bad = |msg: &str| json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": msg }));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("body too large or unreadable"),
    };
    let Ok(b) = serde_json::from_slice::<RevokeBody>(&body) else {
        return bad("expected {\"jti\": \"…\"} or {\"sub\": \"…\", \"before\": unix_s}");
    };
    let r = match (b.jti, b.sub) {
        (Some(jti), None) if !jti.is_empty() && b.before.is_none() => Revocation::Jti { jti },
        (None, Some(sub)) if !sub.is_empty() => {
            Revocation::Subject { sub, before: b.before.unwrap_or_else(unix_now) }
        }
        _ => {
            return bad(
                "give either a non-empty \"jti\" or a non-empty \"sub\" (with an optional \"before\")",
            )
        }
    };
    // Counted across the store's own broadcast, which may kick first.
    let closed = match shared.registry.revoke_counting(&r, shared.store.revoke(r.clone())).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "revocation not persisted");
            return json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({ "error": e.to_string() }));
        }
    };
    shared.metrics.set_revocations(shared.store.len());
    tracing::info!(
        event = "revoke",
        closed,
        kind = if matches!(r, Revocation::Jti { .. }) { "jti" } else { "sub" }
    );
    json(StatusCode::OK, &serde_json::json!({ "revoked": r, "closed": closed }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    key: String,
    duration_s: Option<u64>,
}

fn bad_request(msg: &str) -> Resp {
    json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": msg }))
}

/// `POST /admin/bans {"key": "CIDR or address", "duration_s": N}`.
async fn ban(shared: &Shared, req: Request<Incoming>) -> Resp {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad_request("body too large or unreadable"),
    };
    let mut de = serde_json::Deserializer::from_slice(&body);
    let b = match serde_path_to_error::deserialize::<_, BanBody>(&mut de) {
        Ok(b) => b,
        Err(e) => {
            let at = e.path().to_string();
            let at = if at == "." { String::new() } else { format!("{at}: ") };
            return bad_request(&format!(
                "expected {{\"key\": \"address or CIDR\", \"duration_s\": N}}: {at}{}",
                e.inner()
            ));
        }
    };
    let key = match crate::ban::BanKey::parse(&b.key) {
        Ok(k) => k,
        Err(e) => return bad_request(&format!("key: {e}")),
    };
    let cfg = shared.config.load();
    let duration = b.duration_s.unwrap_or(cfg.ban.duration_s);
    if duration == 0 || duration > crate::config::MAX_BAN_S {
        return bad_request(&format!("duration_s: must be between 1 and {}", crate::config::MAX_BAN_S));
    }
    match shared.bans.ban_manual(&cfg.ban, key, duration) {
        Ok(listed) => json(StatusCode::OK, &serde_json::to_value(listed).unwrap_or_default()),
        Err(e) => bad_request(&format!("key: {e}")),
    }
}

/// `DELETE /admin/bans?key=…`: 200 when a ban was lifted, 404 when none was in force.
fn unban(shared: &Shared, req: &Request<Incoming>) -> Resp {
    let Some(raw) = req.uri().query().and_then(|q| query_param(q, "key")) else {
        return bad_request("give the ban's key: DELETE /admin/bans?key=203.0.113.7/32");
    };
    match crate::ban::BanKey::parse(&raw) {
        Ok(k) => {
            let lifted = shared.bans.lift(k);
            let status = if lifted { StatusCode::OK } else { StatusCode::NOT_FOUND };
            json(status, &serde_json::json!({ "key": k.to_string(), "lifted": lifted }))
        }
        Err(e) => bad_request(&format!("key: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    url: String,
    /// Seconds the closes are spread over; `listen.drain_timeout_s` when absent.
    over_s: Option<f64>,
}

/// `POST /admin/backends/drain` (`drain`) and `/undrain`: 404 for a URL
/// that is not configured.
async fn backend_drain(shared: &Shared, req: Request<Incoming>, drain: bool) -> Resp {
    let bad = |msg: &str| json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": msg }));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return bad("body too large or unreadable"),
    };
    let Ok(b) = serde_json::from_slice::<DrainBody>(&body) else {
        return bad("expected {\"url\": \"…\", \"over_s\": seconds}");
    };
    let unknown =
        || json(StatusCode::NOT_FOUND, &serde_json::json!({ "error": "no such backend", "url": b.url }));
    if !drain {
        if b.over_s.is_some() {
            return bad("undrain takes only \"url\"");
        }
        return match shared.upstream.undrain(&b.url) {
            Some(()) => json(StatusCode::OK, &serde_json::json!({ "url": b.url, "draining": false })),
            None => unknown(),
        };
    }
    let over_s = b.over_s.unwrap_or(shared.config.load().listen.drain_timeout_s as f64);
    if !(over_s.is_finite() && (0.0..=crate::config::bounds::MAX_DRAIN_S as f64).contains(&over_s)) {
        return bad("over_s must be between 0 and 86400");
    }
    let over = std::time::Duration::from_secs_f64(over_s);
    let registry = shared.registry.clone();
    let kick = std::sync::Arc::new(move |id| {
        registry.kick_id(id, crate::reject::CloseReason::BackendDrain);
    });
    match shared.upstream.drain(&b.url, over, kick) {
        Some(n) => json(
            StatusCode::OK,
            &serde_json::json!({ "url": b.url, "draining": true, "connections": n, "over_s": over_s }),
        ),
        None => unknown(),
    }
}

#[cfg(test)]
mod tests {
    use crate::header::bearer as bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "BeArEr\tt0k"] {
            assert_eq!(bearer_token(v), Some("t0k"), "{v}");
        }
        for v in ["Basic t0k", "Bearer", "t0k", "Bearert0k"] {
            assert_ne!(bearer_token(v), Some("t0k"), "{v}");
        }
    }
}
