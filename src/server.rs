//! The accept loop and one connection's walk through the pipeline:
//! accept (caps) → client address (PROXY) → rate → handshake → authenticate
//! → user cap → upstream → upgrade → session.
//!
//! Each stage returns `Result<_, Reject>` after writing its own answer;
//! [`connection`] records the verdict exactly once. Permits travel with the
//! connection, so every way out releases every cap it held.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::admit::{ConnPermit, HandshakePermit, IpKey, IpPermit};
use crate::auth::{carrier, AuthRefusal};
use crate::client_addr::{from_forwarded_for, is_trusted, read_proxy_header};
use crate::config::{Carrier, Config};
use crate::events;
use crate::gateway::Shared;
use crate::handshake::{self, answer_and_close, read_head, ReadError};
use crate::reject::{CloseReason, Reject};
use crate::session::{self, instant_at_unix};
use crate::upstream;

/// Accepts until `stop` resolves. Stage 1 runs here, before any task is
/// spawned: a refused socket costs an accept and a close.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut emfile_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE/ENFILE: back off instead of spinning on a full
                // descriptor table; the backlog holds the rest meanwhile.
                let fd_limit = matches!(e.raw_os_error(), Some(24) | Some(23));
                if fd_limit && !emfile_logged {
                    tracing::error!(error = %e, "accept: out of file descriptors; backing off");
                    emfile_logged = true;
                }
                tokio::time::sleep(Duration::from_millis(if fd_limit { 100 } else { 5 })).await;
                continue;
            }
        };
        emfile_logged = false;
        let now = Instant::now();
        let cfg = shared.config.load();
        let l = &cfg.limits;
        let admitted = shared.caps.admit(l.max_connections, l.max_handshakes).and_then(|(c, h)| {
            // A trusted proxy's own address is never limited per IP; its
            // clients are, once PROXY / X-Forwarded-For names them.
            if is_trusted(&cfg.listen.trusted_proxies, peer.ip()) {
                Ok((c, h, None))
            } else {
                let ip = shared.caps.admit_ip(IpKey::new(peer.ip()), l.per_ip_max_connections)?;
                Ok((c, h, Some(ip)))
            }
        });
        match admitted {
            Ok((conn, hs, ip)) => {
                let shared = shared.clone();
                tokio::spawn(connection(shared, tcp, peer, conn, hs, ip, now));
            }
            Err(reason) => {
                // Close at once without reading; linger 0 frees the socket
                // without TIME_WAIT on our side.
                reset_on_close(&tcp);
                drop(tcp);
                events::rejected(&shared.metrics, &shared.log_limiter, reason, peer, None, now.elapsed());
            }
        }
    }
}

/// Makes the coming close an RST: a refused socket leaves no TIME_WAIT
/// entry behind on our side, which a flood would otherwise pile up.
fn reset_on_close(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Where a connection stands while it is walked through the pipeline.
struct Ctx {
    /// The client as far as it is known (peer, PROXY source, or XFF hop).
    client: SocketAddr,
    sub: Option<String>,
    accepted: Instant,
    deadline: Instant,
}

async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    conn: ConnPermit,
    hs: HandshakePermit,
    ip: Option<IpPermit>,
    accepted: Instant,
) {
    let cfg = shared.config.load_full();
    let mut ctx =
        Ctx { client: peer, sub: None, accepted, deadline: accepted + cfg.limits.handshake_timeout() };
    // The stages before the session are boxed (here and in `serve`): their
    // states (PROXY header, TLS, head buffer, authentication, upstream
    // connect) are gone after the upgrade, but inline they would size this
    // task, which lives as long as the connection (8 KB instead of under
    // 2 KB per idle connection; BENCHMARKS.md).
    match Box::pin(front(&shared, &cfg, tcp, peer, ip, &mut ctx)).await {
        Ok(Front::Plain(tcp, ip)) => {
            serve(&shared, &cfg, tcp, peer, &mut ctx, conn, hs, ip).await;
        }
        Ok(Front::Tls(tls, ip)) => {
            serve(&shared, &cfg, tls, peer, &mut ctx, conn, hs, ip).await;
        }
        Err(reason) => {
            events::rejected(
                &shared.metrics,
                &shared.log_limiter,
                reason,
                ctx.client,
                None,
                accepted.elapsed(),
            );
        }
    }
}

/// The transport after stage 1: PROXY header consumed, TLS terminated.
enum Front {
    Plain(TcpStream, Option<IpPermit>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Option<IpPermit>),
}

/// PROXY header (stage 1, when configured) and TLS, both inside the
/// handshake deadline.
async fn front(
    shared: &Shared,
    cfg: &Config,
    mut tcp: TcpStream,
    peer: SocketAddr,
    mut ip: Option<IpPermit>,
    ctx: &mut Ctx,
) -> Result<Front, Reject> {
    let _ = tcp.set_nodelay(true);
    if cfg.listen.proxy_protocol {
        if !is_trusted(&cfg.listen.trusted_proxies, peer.ip()) {
            reset_on_close(&tcp);
            return Err(Reject::ProxyHeader);
        }
        // Exactly the header is consumed: what follows (HTTP head or TLS
        // ClientHello) is still in the socket for the next layer.
        match read_proxy_header(&mut tcp, ctx.deadline).await {
            Ok(addr) => {
                if let Some(a) = addr {
                    ctx.client = a;
                }
            }
            Err(()) => {
                reset_on_close(&tcp);
                return Err(Reject::ProxyHeader);
            }
        }
        if ip.is_none() && !is_trusted(&cfg.listen.trusted_proxies, ctx.client.ip()) {
            ip = Some(shared.caps.admit_ip(IpKey::new(ctx.client.ip()), cfg.limits.per_ip_max_connections)?);
        }
    }
    if let Some(acceptor) = shared.tls.load_full().as_ref().clone() {
        return match tokio::time::timeout_at(ctx.deadline, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Ok(Front::Tls(Box::new(tls), ip)),
            // A failed TLS handshake is a malformed request; a late one a timeout.
            Ok(Err(_)) => Err(Reject::BadRequest),
            Err(_) => Err(Reject::HandshakeTimeout),
        };
    }
    Ok(Front::Plain(tcp, ip))
}

/// Stages 2–8 on an established transport.
#[allow(clippy::too_many_arguments)]
async fn serve<S>(
    shared: &Arc<Shared>,
    cfg: &Config,
    io: S,
    peer: SocketAddr,
    ctx: &mut Ctx,
    conn: ConnPermit,
    hs: HandshakePermit,
    ip: Option<IpPermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let up = match Box::pin(handshake_stages(shared, cfg, io, peer, ctx, ip)).await {
        Ok(Some(up)) => up,
        Ok(None) => return,
        Err(reason) => {
            events::rejected(
                &shared.metrics,
                &shared.log_limiter,
                reason,
                ctx.client,
                ctx.sub.as_deref(),
                ctx.accepted.elapsed(),
            );
            return;
        }
    };
    drop(hs);
    // `up` is taken whole before anything borrows from it (see `start`).
    let (session, slot, ip) = up.start();
    let info = slot.info.clone();
    events::accepted(&shared.metrics, ctx.client, &info.sub, info.id, ctx.accepted.elapsed());
    let open = OpenGuard::new(shared);
    let started = Instant::now();
    let reason = session.await;
    events::disconnected(&shared.metrics, reason, ctx.client, &info.sub, info.id, started.elapsed());
    drop(open);
    drop(slot);
    drop(ip);
    drop(conn);
}

/// Counts an upgraded connection in `portcullis_connections{state="open"}`.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> OpenGuard {
        shared.metrics.open().increment(1.0);
        OpenGuard(shared.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics.open().decrement(1.0);
    }
}

/// An upgraded connection, ready for its session.
struct Upgraded<S> {
    ws: session::Client<S>,
    upstream: session::Upstream,
    params: session::Params,
    slot: session::registry::Slot,
    ip: Option<IpPermit>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Upgraded<S> {
    /// The session's future, and the permits that must outlive it. Taking
    /// `self` whole matters: a struct that is borrowed from, or whose
    /// fields are moved out, inside an async fn stays reserved at full size
    /// (here ~800 B) in the task across every later await.
    fn start(self) -> (impl Future<Output = CloseReason>, session::registry::Slot, Option<IpPermit>) {
        (session::run(self.ws, self.upstream, self.params), self.slot, self.ip)
    }
}

/// Answers a refusal on `io` and returns it, for `?`-style stage code.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, reason: Reject, retry_after: Option<u64>) -> Reject {
    if let Some(status) = reason.status() {
        answer_and_close(io, &handshake::refusal(reason, status, retry_after)).await;
    }
    reason
}

/// Stages 2–7. `Ok(None)`: the request was served otherwise (`/login`).
async fn handshake_stages<S>(
    shared: &Arc<Shared>,
    cfg: &Config,
    mut io: S,
    peer: SocketAddr,
    ctx: &mut Ctx,
    mut ip: Option<IpPermit>,
) -> Result<Option<Upgraded<S>>, Reject>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let l = &cfg.limits;
    let trusted = &cfg.listen.trusted_proxies;
    let client_is_proxy = is_trusted(trusted, ctx.client.ip());

    // Stage 2: the rate, for a client already known. A limited client's
    // head is still read (and discarded) so it sees the 429, not a reset.
    if !client_is_proxy {
        if let Err(retry) = shared.rate.check(IpKey::new(ctx.client.ip())) {
            let _ = read_head(&mut io, Vec::new(), ctx.deadline, l.max_header_bytes).await;
            return Err(refuse(&mut io, Reject::IpRate, Some(retry)).await);
        }
    }

    // Stage 3: the head, under the total deadline.
    let handshake::Head { head, rest } =
        match read_head(&mut io, Vec::new(), ctx.deadline, l.max_header_bytes).await {
            Ok(h) => h,
            Err(e) => {
                let reason = e.reject();
                return Err(match e {
                    ReadError::Timeout { started: false } | ReadError::Closed => reason,
                    _ => refuse(&mut io, reason, None).await,
                });
            }
        };

    // A trusted proxy without PROXY protocol names its client in
    // X-Forwarded-For; per-IP checks for that client run now.
    if client_is_proxy && !cfg.listen.proxy_protocol {
        let client_ip = from_forwarded_for(&head, trusted, ctx.client.ip());
        if !is_trusted(trusted, client_ip) {
            ctx.client = SocketAddr::new(client_ip, 0);
            let key = IpKey::new(client_ip);
            if ip.is_none() {
                match shared.caps.admit_ip(key, l.per_ip_max_connections) {
                    Ok(p) => ip = Some(p),
                    Err(r) => return Err(refuse(&mut io, r, None).await),
                }
            }
            if let Err(retry) = shared.rate.check(key) {
                return Err(refuse(&mut io, Reject::IpRate, Some(retry)).await);
            }
        }
    }

    if head.method == "POST" && head.path() == "/login" && cfg.auth.login.enabled {
        if let Some(login) = shared.login.as_ref() {
            login.serve(shared, &mut io, &head, rest, ctx.client, ctx.deadline).await;
            return Ok(None);
        }
    }
    if !cfg.listen.paths.iter().any(|p| p == head.path()) {
        return Err(refuse(&mut io, Reject::BadPath, None).await);
    }
    let key = match handshake::validate_upgrade(&head) {
        Ok(k) => k.to_string(),
        Err(r) => return Err(refuse(&mut io, r, None).await),
    };
    let live = shared.config.load();
    if !handshake::origin_allowed(&head, &live.auth.allowed_origins) {
        return Err(refuse(&mut io, Reject::Origin, None).await);
    }

    // Stage 4: authenticate.
    let identity = match shared.auth.authenticate(&head, ctx.client).await {
        Ok(id) => id,
        Err(AuthRefusal::Reason(r)) => return Err(refuse(&mut io, r, None).await),
        Err(AuthRefusal::Custom { status, body }) => {
            let bytes = handshake::response(status, &[], "text/plain; charset=utf-8", &body);
            answer_and_close(&mut io, &bytes).await;
            return Err(Reject::InvalidToken);
        }
    };
    ctx.sub = Some(identity.sub.clone());

    // Stage 5: the per-user cap (fleet-wide with the Redis backend; its
    // one round trip is bounded by `revocation.redis_timeout_ms`).
    let admitted = shared
        .registry
        .admit(&identity.sub, ctx.client.ip(), identity.jti.clone(), identity.issued_at, &live.limits)
        .await;
    let slot = match admitted {
        Ok(s) => s,
        Err(r) => return Err(refuse(&mut io, r, None).await),
    };

    // Stage 6: the upstream, before any 101.
    let mut protocol = None;
    let mut extensions = None;
    let upstream = match &shared.upstream {
        None => None,
        Some(url) => {
            let claim_names: Vec<&str> = cfg.upstream.claim_headers.values().map(String::as_str).collect();
            let mut headers: Vec<(String, String)> = head
                .headers
                .iter()
                .filter(|(n, _)| upstream::forwardable(n, &claim_names))
                .cloned()
                .collect();
            headers.push(("X-Portcullis-Sub".into(), identity.sub.clone()));
            headers.extend(identity.forward.iter().cloned());
            let mut xff: Vec<String> = if is_trusted(trusted, peer.ip()) {
                head.headers_named("x-forwarded-for").map(str::to_string).collect()
            } else {
                Vec::new()
            };
            let client_ip = ctx.client.ip().to_string();
            let last_hop = xff.last().and_then(|v| v.rsplit(',').next()).map(str::trim);
            if last_hop != Some(client_ip.as_str()) {
                xff.push(client_ip);
            }
            headers.push(("X-Forwarded-For".into(), xff.join(", ")));
            let target = url.target_for(&carrier::strip_access_token(&head.target));
            let protocols = carrier::other_subprotocols(&head);
            let timeout = Duration::from_millis(cfg.upstream.connect_timeout_ms);
            let offer = head.headers_named("sec-websocket-extensions").collect::<Vec<_>>().join(", ");
            let offer = (!offer.trim().is_empty()).then_some(offer);
            match upstream::connect(url, &target, &headers, &protocols, offer.as_deref(), timeout).await {
                Ok(mut backend) => {
                    protocol = backend.protocol.take();
                    extensions = backend.extensions.clone();
                    Some(backend)
                }
                Err(e) => {
                    tracing::warn!(error = %e, upstream = %url.authority, "upstream unavailable");
                    return Err(refuse(&mut io, Reject::UpstreamUnavailable, None).await);
                }
            }
        }
    };
    if identity.carrier == Some(Carrier::Subprotocol) {
        protocol = Some("bearer".into());
    }

    // Stage 7: the upgrade.
    let answer = handshake::switching_protocols(&key, protocol.as_deref(), extensions.as_deref());
    let wrote = tokio::time::timeout(live.limits.write_timeout(), async {
        io.write_all(&answer).await?;
        io.flush().await
    })
    .await;
    if !matches!(wrote, Ok(Ok(()))) {
        // The client left between its request and our 101.
        return Err(Reject::HandshakeTimeout);
    }
    let ws = session::Client { io, rest };
    let params = session::Params {
        info: slot.info.clone(),
        expires_at: identity.expires_at.map(instant_at_unix),
        limits: live.limits.clone(),
        heartbeat: live.heartbeat.clone(),
        metrics: shared.metrics.clone(),
    };
    Ok(Some(Upgraded { ws, upstream, params, slot, ip }))
}
