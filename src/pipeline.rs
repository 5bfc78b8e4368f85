//! One connection's walk through the pipeline after stage 1 (which runs
//! in the accept loop, `server`, with the refusals it can judge on
//! arrival, `early`): one function per stage, in order. A connection
//! arrives here with whatever the accept loop already read.
//!
//! ```text
//! front      PROXY header (stage 1, when configured), TLS
//! rate       stage 2: per-IP handshake rate
//! head       stage 3: the request head, under the (pressure-scaled) deadline
//! client     trusted X-Forwarded-For names the client; its per-IP checks
//! validate   stage 3: path, RFC 6455 upgrade, Origin
//! authenticate  stage 4
//! user_cap   stage 5
//! upstream   stage 6: the backend, before any 101
//! upgrade    stage 7: the 101
//! session    stage 8 (`session`)
//! ```
//!
//! Each stage returns `Result<_, Reject>` after writing its own answer;
//! the stages record the verdict exactly once. Permits travel with the
//! connection, so every way out releases every cap it held.
//!
//! Memory: a socket waiting for its head is the common case under attack,
//! so that phase keeps little: the head buffer grows with the bytes
//! received, reads go through a stack buffer, and the head deadline is the
//! slot table's (no timer per socket). The whole handshake is one boxed
//! future, freed at the upgrade; inside it the stages after the head are
//! boxed again, allocated only once a head is complete. The session is
//! boxed too, so the task keeps only what the session needs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::admit::slots::{Attempt, Verdict};
use crate::admit::{ConnPermit, HandshakePermit, IpKey, IpPermit};
use crate::auth::{carrier, AuthRefusal, Identity};
use crate::client_addr::{from_forwarded_for, is_trusted, read_proxy_header};
use crate::config::{Carrier, Config};
use crate::events;
use crate::handshake::{self, answer_and_close, read_head, Head, ReadError, Request, RequestHead};
use crate::reject::{CloseReason, Reject};
use crate::session::{self, instant_at_unix};
use crate::shared::Shared;
use crate::sockopt::reset_on_close;
use crate::upstream;

/// What the accept loop's speculative read left for the pipeline.
#[derive(Default)]
pub struct Early {
    /// Bytes already read: the start of the head (or all of it).
    pub bytes: Vec<u8>,
    /// The fast path already checked the rate (stage 2) on this head.
    pub rate_checked: bool,
}

/// The permits stage 1 took, carried to the end of the connection.
pub struct Admitted {
    pub conn: ConnPermit,
    pub handshake: HandshakePermit,
    /// `None` for a trusted proxy's own address (never limited per IP).
    pub ip: Option<IpPermit>,
}

/// Where a connection stands while it is walked through the pipeline.
struct Ctx {
    /// The client as far as it is known (peer, PROXY source, or XFF hop).
    client: SocketAddr,
    peer: SocketAddr,
    sub: Option<String>,
    accepted: Instant,
    /// The full handshake deadline (PROXY header, TLS, login body). The
    /// head itself is timed by the slot table, which may shrink it.
    deadline: Instant,
}

impl Ctx {
    /// Records a refusal, and strikes the client's address for it
    /// (`partial_expired`: a started head ran past its deadline, the only
    /// timeout that strikes). A trusted proxy itself is never struck.
    fn reject(&self, shared: &Shared, reason: Reject, partial_expired: bool) {
        let cfg = shared.config.load();
        if !is_trusted(&cfg.listen.trusted_proxies, self.client.ip()) {
            shared.bans.judge(&cfg.ban, self.client.ip(), Some(crate::ban::weight(reason, partial_expired)));
        }
        events::rejected(
            &shared.metrics,
            &shared.log_limiter,
            reason,
            self.client,
            self.sub.as_deref(),
            self.accepted.elapsed(),
        );
    }
}

/// Runs stages after 1 for an admitted socket, then its session.
///
/// A task's size is that of its largest state, kept for its whole life, so
/// the handshake runs in a box of its own, freed at the upgrade: the task
/// keeps only what the session needs (its box, the permits, the slot).
pub fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    accepted: Instant,
    early: Early,
) -> impl Future<Output = ()> + Send + 'static {
    let handshake = Box::pin(handshake(shared, tcp, peer, admitted, accepted, early));
    async move {
        let Some(live) = handshake.await else { return };
        live.run().await;
    }
}

impl Live {
    /// The session to its end, then its one record; then every permit goes.
    async fn run(self) {
        let Live { session, client, started, open, slot, ip, conn } = self;
        let reason = session.await;
        let info = &slot.info;
        // A session moved to a new process by a binary upgrade did not end.
        if !info.moved() {
            events::disconnected(&open.0.metrics, reason, client, &info.sub, info.id, started.elapsed());
        }
        drop(open);
        drop(slot);
        drop(ip);
        drop(conn);
    }
}

/// A session moved here by a binary upgrade, run to its end as any other:
/// counted open, its permits held, its end recorded once.
pub fn adopted(
    shared: &Arc<Shared>,
    session: Pin<Box<dyn Future<Output = CloseReason> + Send>>,
    slot: session::registry::Slot,
    ip: Option<IpPermit>,
    conn: ConnPermit,
) -> impl Future<Output = ()> + Send + 'static {
    let age = std::time::Duration::from_secs(crate::clock::unix_now().saturating_sub(slot.info.since));
    let live = Live {
        session,
        client: SocketAddr::new(slot.info.ip, 0),
        started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        open: OpenGuard::new(shared),
        slot,
        ip,
        conn,
    };
    live.run()
}

/// An upgraded connection: its session, and what it holds until the end.
struct Live {
    session: Pin<Box<dyn Future<Output = CloseReason> + Send>>,
    client: SocketAddr,
    started: Instant,
    open: OpenGuard,
    slot: session::registry::Slot,
    ip: Option<IpPermit>,
    conn: ConnPermit,
}

/// Stages after 1, up to the upgrade. `None`: refused (and recorded), or
/// served otherwise (`/login`).
async fn handshake(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    accepted: Instant,
    early: Early,
) -> Option<Live> {
    let cfg = shared.config.load_full();
    let mut ctx =
        Ctx { client: peer, peer, sub: None, accepted, deadline: accepted + cfg.limits.handshake_timeout() };
    let Admitted { conn, mut handshake, ip } = admitted;
    match Box::pin(front(&shared, &cfg, tcp, ip, &mut handshake, &mut ctx)).await {
        Ok(Front::Plain(tcp, ip)) => serve(&shared, &cfg, tcp, &mut ctx, conn, handshake, ip, early).await,
        Ok(Front::Tls(tls, ip)) => serve(&shared, &cfg, tls, &mut ctx, conn, handshake, ip, early).await,
        Err(reason) => {
            // PROXY and TLS: a timeout there is no proof of a started head.
            ctx.reject(&shared, reason, false);
            None
        }
    }
}

/// The transport after stage 1: PROXY header consumed, TLS terminated.
enum Front {
    Plain(TcpStream, Option<IpPermit>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Option<IpPermit>),
}

/// PROXY header (stage 1, when configured) and TLS, both inside the
/// handshake deadline, and both given up at once if the slot is shed.
async fn front(
    shared: &Shared,
    cfg: &Config,
    mut tcp: TcpStream,
    mut ip: Option<IpPermit>,
    handshake: &mut HandshakePermit,
    ctx: &mut Ctx,
) -> Result<Front, Reject> {
    if cfg.listen.proxy_protocol {
        if !is_trusted(&cfg.listen.trusted_proxies, ctx.peer.ip()) {
            reset_on_close(&tcp);
            return Err(Reject::ProxyHeader);
        }
        // Exactly the header is consumed: what follows (HTTP head or TLS
        // ClientHello) is still in the socket for the next layer.
        let read = tokio::select! {
            r = read_proxy_header(&mut tcp, ctx.deadline) => r,
            v = handshake.attempt().ended() => return Err(ended(v)),
        };
        match read {
            Ok(Some(a)) => {
                ctx.client = a;
                // The first moment a proxied client is known: a banned one
                // goes now, before anything of its own is read.
                if !is_trusted(&cfg.listen.trusted_proxies, a.ip()) && shared.bans.is_banned(a.ip()) {
                    reset_on_close(&tcp);
                    return Err(Reject::Banned);
                }
            }
            Ok(None) => {}
            Err(()) => {
                reset_on_close(&tcp);
                return Err(Reject::ProxyHeader);
            }
        }
        if !is_trusted(&cfg.listen.trusted_proxies, ctx.client.ip()) {
            let key = IpKey::new(ctx.client.ip());
            handshake.rekey(key, cfg.limits.per_ip_max_handshakes)?;
            if ip.is_none() {
                ip = Some(shared.caps.admit_ip(key, cfg.limits.per_ip_max_connections)?);
            }
        }
    }
    if let Some(acceptor) = shared.tls.load_full().as_ref().clone() {
        return tokio::select! {
            r = tokio::time::timeout_at(ctx.deadline, acceptor.accept(tcp)) => match r {
                Ok(Ok(tls)) => Ok(Front::Tls(Box::new(tls), ip)),
                // A failed TLS handshake is a malformed request; a late one a timeout.
                Ok(Err(_)) => Err(Reject::BadRequest),
                Err(_) => Err(Reject::HandshakeTimeout),
            },
            v = handshake.attempt().ended() => Err(ended(v)),
        };
    }
    Ok(Front::Plain(tcp, ip))
}

/// The reason for an attempt the slot table ended.
fn ended(v: Verdict) -> Reject {
    match v {
        Verdict::Shed => Reject::HandshakeShed,
        _ => Reject::HandshakeTimeout,
    }
}

/// Stages 2–7 on an established transport; the session, ready to run.
#[allow(clippy::too_many_arguments)]
async fn serve<S>(
    shared: &Arc<Shared>,
    cfg: &Config,
    io: S,
    ctx: &mut Ctx,
    conn: ConnPermit,
    handshake: HandshakePermit,
    mut ip: Option<IpPermit>,
    early: Early,
) -> Option<Live>
where
    S: Transport + Send + 'static,
{
    let up = match handshake_stages(shared, cfg, io, ctx, &mut ip, handshake.attempt(), early).await {
        Ok(Some(up)) => up,
        Ok(None) => return None,
        Err(reason) => {
            let a = handshake.attempt();
            ctx.reject(shared, reason, a.verdict() == Verdict::Expired && a.received() > 0);
            return None;
        }
    };
    drop(handshake);
    if !is_trusted(&cfg.listen.trusted_proxies, ctx.client.ip()) {
        shared.bans.judge(&shared.config.load().ban, ctx.client.ip(), None);
    }
    let Upgraded { ws, upstream, params, slot } = up;
    events::accepted(&shared.metrics, ctx.client, &slot.info.sub, slot.info.id, ctx.accepted.elapsed());
    Some(Live {
        session: Box::pin(session::run(ws, upstream, params)),
        client: ctx.client,
        started: Instant::now(),
        open: OpenGuard::new(shared),
        slot,
        ip,
        conn,
    })
}

/// Stages 2 to 7. `Ok(None)`: the request was served otherwise (`/login`).
async fn handshake_stages<S>(
    shared: &Arc<Shared>,
    cfg: &Config,
    mut io: S,
    ctx: &mut Ctx,
    ip: &mut Option<IpPermit>,
    attempt: &Attempt,
    early: Early,
) -> Result<Option<Upgraded<S>>, Reject>
where
    S: Transport,
{
    if !early.rate_checked {
        rate(shared, cfg, &mut io, ctx, attempt, &early.bytes).await?;
    }
    let head = head(&mut io, cfg, attempt, early.bytes).await?;
    // Boxed: a socket waiting for its head holds only the head read.
    Box::pin(after_head(shared, cfg, io, ctx, ip, head)).await
}

/// Answers a refusal on `io` and returns it, for `?`-style stage code.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, reason: Reject, retry_after: Option<u64>) -> Reject {
    if let Some(status) = reason.status() {
        answer_and_close(io, &handshake::refusal(reason, status, retry_after)).await;
    }
    reason
}

/// Stage 2: the rate, for a client already known (a trusted proxy's
/// clients are checked once `X-Forwarded-For` names them). A limited
/// client's head is still read and discarded so that it sees the 429, not
/// a reset, but with the shortest patience: it holds a handshake slot
/// meanwhile.
async fn rate<S>(
    shared: &Shared,
    cfg: &Config,
    io: &mut S,
    ctx: &Ctx,
    attempt: &Attempt,
    early: &[u8],
) -> Result<(), Reject>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if is_trusted(&cfg.listen.trusted_proxies, ctx.client.ip()) {
        return Ok(());
    }
    match shared.rate.check(IpKey::new(ctx.client.ip())) {
        Ok(()) => Ok(()),
        Err(retry) => {
            attempt.limit_patience(cfg.limits.handshake_timeout_min());
            // Whatever the head turns out to be (or not to be), the answer
            // is the 429: the rate is the verdict.
            let _ = read_head(io, attempt, cfg.limits.max_header_bytes, early.to_vec()).await;
            Err(refuse(io, Reject::IpRate, Some(retry)).await)
        }
    }
}

/// Stage 3, first half: the request head, complete within the deadline in
/// force and within `limits.max_header_bytes`.
async fn head<S>(io: &mut S, cfg: &Config, attempt: &Attempt, early: Vec<u8>) -> Result<Head, Reject>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match read_head(io, attempt, cfg.limits.max_header_bytes, early).await {
        Ok(h) => Ok(h),
        Err(e) => Err(read_failed(io, e).await),
    }
}

/// Answers a failed head read: silence for a socket that sent nothing or
/// left, a status for the rest.
async fn read_failed<S: AsyncWrite + Unpin>(io: &mut S, e: ReadError) -> Reject {
    let reason = e.reject();
    match e {
        ReadError::Timeout { started: false } | ReadError::Closed => reason,
        _ => refuse(io, reason, None).await,
    }
}

/// Stages 3 (second half) to 7. `Ok(None)`: the request was served
/// otherwise (`/login`).
async fn after_head<S>(
    shared: &Arc<Shared>,
    cfg: &Config,
    mut io: S,
    ctx: &mut Ctx,
    ip: &mut Option<IpPermit>,
    head: Head,
) -> Result<Option<Upgraded<S>>, Reject>
where
    S: Transport,
{
    let Head { head, rest } = head;
    if let Err(r) = client(shared, cfg, ctx, ip, &head) {
        return Err(refuse(&mut io, r.0, r.1).await);
    }
    if head.method == "POST" && head.path() == "/login" && cfg.auth.login.enabled {
        if let Some(login) = shared.login.as_ref() {
            login.serve(&shared.metrics, &mut io, &head, rest, ctx.client, ctx.deadline).await;
            return Ok(None);
        }
    }
    // The live config: allowed origins and limits may have been reloaded
    // since accept.
    let live = shared.config.load_full();
    if crate::demo::is_page_request(shared.as_ref(), &head) {
        crate::demo::serve(&live, &mut io).await;
        return Ok(None);
    }
    let key = match validate(&live, &head) {
        Ok(k) => k,
        Err(r) => return Err(refuse(&mut io, r, None).await),
    };
    let identity = match authenticate(shared, ctx, &head).await {
        Ok(id) => id,
        Err(Refusal::Answer(r)) => return Err(refuse(&mut io, r, None).await),
        Err(Refusal::Described { reason, description }) => {
            let status = reason.status().unwrap_or(401);
            answer_and_close(&mut io, &handshake::refusal_described(reason, status, None, Some(description)))
                .await;
            return Err(reason);
        }
        Err(Refusal::Custom { status, body }) => {
            let bytes = handshake::response(status, &[], "text/plain; charset=utf-8", &body);
            answer_and_close(&mut io, &bytes).await;
            return Err(Reject::InvalidToken);
        }
    };
    ctx.sub = Some(identity.sub.clone());
    let slot = match user_cap(shared, &live, ctx, &identity).await {
        Ok(s) => s,
        Err(r) => return Err(refuse(&mut io, r, None).await),
    };
    // Echo mode is the endpoint: it answers a `permessage-deflate` offer
    // itself (a backend answers its own in proxy mode).
    let echo_deflate = {
        let set = shared.upstream.load();
        let pick = upstream::route::pick(set.config(), head.path());
        match set.pool(pick.route()) {
            None => session::deflate::negotiate(head.headers_named("sec-websocket-extensions")),
            Some(_) => None,
        }
    };
    // Owned: the head goes to the upstream stage, which drops it early.
    let key = String::from(key);
    let mut upstream = match upstream(shared, cfg, ctx, head, &identity, slot.info.id).await {
        Ok(u) => u,
        Err(r) => return Err(refuse(&mut io, r, None).await),
    };
    let mut protocol = upstream.as_mut().and_then(|b| b.protocol.take());
    let deflate = echo_deflate.is_some();
    let extensions = upstream.as_ref().and_then(|b| b.extensions.clone()).or(echo_deflate.map(Box::from));
    // The subprotocol carrier: the 101 names what the backend chose among
    // the client's other protocols (a browser application checks it), and
    // `bearer` only when it chose none.
    if identity.carrier == Some(Carrier::Subprotocol) && protocol.is_none() {
        protocol = Some("bearer".into());
    }
    let ws = upgrade(io, &key, protocol.as_deref(), extensions.as_deref(), rest, &live).await?;
    let params = session::Params {
        info: slot.info.clone(),
        expires_at: identity.expires_at.map(instant_at_unix),
        limits: live.limits.clone(),
        heartbeat: live.heartbeat.clone(),
        metrics: shared.metrics.clone(),
        deflate,
    };
    Ok(Some(Upgraded { ws, upstream, params, slot }))
}

/// A trusted proxy without PROXY protocol names its client in
/// `X-Forwarded-For`; the per-IP checks for that client run now.
fn client(
    shared: &Shared,
    cfg: &Config,
    ctx: &mut Ctx,
    ip: &mut Option<IpPermit>,
    head: &RequestHead,
) -> Result<(), (Reject, Option<u64>)> {
    let trusted = &cfg.listen.trusted_proxies;
    if cfg.listen.proxy_protocol || !is_trusted(trusted, ctx.client.ip()) {
        return Ok(());
    }
    let client_ip = from_forwarded_for(head, trusted, ctx.client.ip());
    if is_trusted(trusted, client_ip) {
        return Ok(());
    }
    ctx.client = SocketAddr::new(client_ip, 0);
    if shared.bans.is_banned(client_ip) {
        return Err((Reject::Banned, None));
    }
    let key = IpKey::new(client_ip);
    if ip.is_none() {
        *ip = Some(shared.caps.admit_ip(key, cfg.limits.per_ip_max_connections).map_err(|r| (r, None))?);
    }
    shared.rate.check(key).map_err(|retry| (Reject::IpRate, Some(retry)))
}

/// Stage 3, second half: path, RFC 6455 upgrade, `Origin`. Returns the
/// `Sec-WebSocket-Key`. (The refusal fast path runs it too.)
pub(crate) fn validate<'a, R: Request>(cfg: &Config, head: &'a R) -> Result<&'a str, Reject> {
    if !upstream::route::accepts(cfg, head.path()) {
        return Err(Reject::BadPath);
    }
    let key = handshake::validate_upgrade(head)?;
    if !handshake::origin_allowed(head, &cfg.auth.allowed_origins) {
        return Err(Reject::Origin);
    }
    Ok(key)
}

/// How stage 4 refuses: one of the reasons (with what the client may be
/// told of it), or an authenticator's own answer.
enum Refusal {
    Answer(Reject),
    Described { reason: Reject, description: &'static str },
    Custom { status: u16, body: String },
}

/// Stage 4: the authenticator (JWT by default; revocation checked there).
async fn authenticate(shared: &Shared, ctx: &Ctx, head: &RequestHead) -> Result<Identity, Refusal> {
    match crate::auth::authenticate(shared.auth.as_ref(), head, ctx.client).await {
        Ok(id) => Ok(id),
        Err(AuthRefusal::Reason(r)) => Err(Refusal::Answer(r)),
        Err(AuthRefusal::Described { reason, description }) => {
            Err(Refusal::Described { reason, description })
        }
        Err(AuthRefusal::Custom { status, body }) => Err(Refusal::Custom { status, body }),
    }
}

/// Stage 5: the per-user cap (fleet-wide with the Redis backend; its one
/// round trip is bounded by `revocation.redis_timeout_ms`). Then, the
/// connection now being kickable, revocation is looked up once more: one
/// that landed since stage 4's lookup would otherwise be missed.
async fn user_cap(
    shared: &Shared,
    live: &Config,
    ctx: &Ctx,
    identity: &Identity,
) -> Result<session::registry::Slot, Reject> {
    let slot = shared
        .registry
        .admit(&identity.sub, ctx.client.ip(), identity.jti.clone(), identity.issued_at, &live.limits)
        .await?;
    session::registry::recheck(shared.store.as_ref(), &slot.info)?;
    Ok(slot)
}

/// Stage 6: a backend of the request's pool, connected before any 101
/// (others tried when one fails, see `upstream::pool`), offered the
/// client's extensions. Returns it (none in echo mode). It takes the
/// client's head and drops it once the offer's parts are built: a
/// handshake waiting on a busy backend holds a few hundred bytes, not the
/// head and everything built from it.
async fn upstream(
    shared: &Shared,
    cfg: &Config,
    ctx: &Ctx,
    head: RequestHead,
    identity: &Identity,
    conn_id: u64,
) -> Result<session::Upstream, Reject> {
    // One set of pools from the choice to the 101, whatever a reload does.
    let set = shared.upstream.load();
    let pick = upstream::route::pick(set.config(), head.path());
    let Some(pool) = set.pool(pick.route()) else { return Ok(None) };
    let timeout = std::time::Duration::from_millis(set.config().connect_timeout_ms);
    let claims = set.config().claim_headers_of(pick.route());
    let headers = upstream::request_headers(&head, identity, claims, cfg, ctx.peer, ctx.client);
    let target = carrier::strip_access_token(&head.target);
    let protocols = carrier::other_subprotocols(&head);
    let extensions = head.headers_named("sec-websocket-extensions").collect::<Vec<_>>().join(", ");
    let extensions = (!extensions.trim().is_empty()).then_some(extensions);
    drop(head);
    let offer_for = |url: &upstream::UpstreamUrl| {
        let to = upstream::route::target(url, pick, &target);
        upstream::Offer::new(url, &to, &headers, protocols.clone(), extensions.clone())
    };
    match set.connect(pool, &identity.sub, conn_id, offer_for, timeout).await {
        Ok(backend) => Ok(Some(backend)),
        Err(e) => {
            tracing::debug!(route = %pool.name, why = ?e, "no backend for the handshake");
            Err(Reject::UpstreamUnavailable)
        }
    }
}

/// Stage 7: the 101 (naming the subprotocol and the backend's extensions),
/// written within `limits.write_timeout_ms`.
async fn upgrade<S>(
    mut io: S,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    rest: Vec<u8>,
    live: &Config,
) -> Result<session::Client<S>, Reject>
where
    S: Transport,
{
    // Upgraded frames are small and latency-bound; a refused socket never
    // pays for this system call.
    io.set_nodelay();
    let answer = handshake::switching_protocols(key, protocol, extensions);
    let wrote = tokio::time::timeout(live.limits.write_timeout(), async {
        io.write_all(&answer).await?;
        io.flush().await
    })
    .await;
    if !matches!(wrote, Ok(Ok(()))) {
        // The client left between its request and our 101.
        return Err(Reject::HandshakeTimeout);
    }
    Ok(session::Client { io, rest })
}

/// A client transport: TCP, or TLS over it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + session::handover::Movable + 'static {
    fn set_nodelay(&self);
}

impl Transport for TcpStream {
    fn set_nodelay(&self) {
        let _ = TcpStream::set_nodelay(self, true);
    }
}

impl Transport for Box<tokio_rustls::server::TlsStream<TcpStream>> {
    fn set_nodelay(&self) {
        let _ = self.get_ref().0.set_nodelay(true);
    }
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
}
