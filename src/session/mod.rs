//! Stage 8, the session: relay messages whole and in order between the
//! client and the upstream (or the built-in echo), and end the connection
//! with the first rule that fires (the session table of docs/reference.md).
//!
//! One task per connection runs one `select!` loop over: a kick (revoke,
//! evict, drain), one timer, writes pending each way, and reads each way.
//! All deadlines (heartbeat, idle, token expiry, lifetime, write stall)
//! share that single timer, re-armed to the earliest: tokio's timer wheel
//! holds one entry per connection, not five.
//!
//! Backpressure: each direction has an outbox bounded by
//! `limits.max_outbound_bytes`; while it is full the loop stops reading the
//! side that feeds it, so a slow reader slows its writer instead of growing
//! memory.

pub mod leases;
pub mod registry;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::config::{Heartbeat, Limits};
use crate::metrics::{Direction, Metrics};
use crate::reject::CloseReason;
use registry::{unix_now, ConnInfo};

/// How long the gateway waits for the peer's reply to its close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Best-effort close for peers we no longer trust to read (pong timeout,
/// slow reader).
const BEST_EFFORT_TIMEOUT: Duration = Duration::from_millis(100);

/// The `WebSocketConfig` for both hops, every limit explicit: small read
/// buffer, eager writes, bounded write buffer and message size.
///
/// tungstenite allocates the read buffer up front for every connection and
/// touches all of it at the first read (128 KiB by default), so an idle
/// connection holds it whole. 512 B is one small message or a few control
/// frames per read; a larger message grows the buffer to its size while it
/// arrives. Measured (BENCHMARKS.md): 4 KiB → 512 B took 3.5 KB off every
/// idle connection, for about 8 % more server CPU per 1 KiB message echoed
/// (three reads instead of one).
const READ_BUFFER_BYTES: usize = 512;

pub fn ws_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(limits.max_message_bytes.saturating_add(64 * 1024))
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes))
        .accept_unmasked_frames(false)
}

/// What a session needs to know, fixed at the upgrade.
pub struct Params {
    pub info: Arc<ConnInfo>,
    /// When the token (plus leeway) expires.
    pub expires_at: Option<Instant>,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub metrics: Arc<Metrics>,
}

/// Converts a unix-seconds instant to tokio time.
pub fn instant_at_unix(unix_s: u64) -> Instant {
    let now = unix_now();
    Instant::now() + Duration::from_secs(unix_s.saturating_sub(now))
}

/// Messages waiting to be written one way, and their payload bytes.
struct Outbox {
    msgs: VecDeque<Message>,
    bytes: usize,
    /// Fed to the sink but not yet flushed.
    unflushed: bool,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox { msgs: VecDeque::new(), bytes: 0, unflushed: false }
    }
    fn push(&mut self, m: Message) {
        self.bytes += m.len();
        self.msgs.push_back(m);
    }
    fn pending(&self) -> bool {
        !self.msgs.is_empty() || self.unflushed
    }
    /// Frees the queue's storage once it is empty, so an idle connection
    /// holds none (one allocation per burst instead of one per connection).
    fn release(&mut self) {
        if self.msgs.is_empty() && self.msgs.capacity() > 0 {
            self.msgs = VecDeque::new();
        }
    }
}

/// Writes an outbox out, then flushes. Cancel-safe: a message leaves the
/// outbox only once the sink took it, and a flush resumes where it was.
/// `progress` is set at each message taken and at the final flush.
///
/// A poll function rather than an `async fn`: the future the session loop
/// keeps for it is three references, not a state machine holding a message.
fn pump<'a, S>(
    tx: &'a mut SplitSink<WebSocketStream<S>, Message>,
    out: &'a mut Outbox,
    progress: &'a mut Instant,
) -> impl Future<Output = Result<(), WsError>> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    std::future::poll_fn(move |cx| poll_pump(tx, out, progress, cx))
}

fn poll_pump<S>(
    tx: &mut SplitSink<WebSocketStream<S>, Message>,
    out: &mut Outbox,
    progress: &mut Instant,
    cx: &mut Context<'_>,
) -> Poll<Result<(), WsError>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while !out.msgs.is_empty() {
        ready!(tx.poll_ready_unpin(cx))?;
        if let Some(m) = out.msgs.pop_front() {
            out.bytes -= m.len();
            tx.start_send_unpin(m)?;
        }
        out.unflushed = true;
        *progress = Instant::now();
    }
    ready!(tx.poll_flush_unpin(cx))?;
    out.unflushed = false;
    out.release();
    *progress = Instant::now();
    Poll::Ready(Ok(()))
}

/// The upstream of a session: a backend socket, or nothing for `echo`.
pub type Upstream = Option<WebSocketStream<TcpStream>>;

/// How the loop ended: the reason, and a close frame to carry across.
struct Ending {
    reason: CloseReason,
    frame: Option<CloseFrame>,
}

fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame { code: CloseCode::from(code), reason: reason.into() }
}

/// A peer's close frame as it may be sent on: codes that must never be on
/// the wire (1005, 1006, 1015) become "no code".
fn carried(frame: Option<CloseFrame>) -> Option<CloseFrame> {
    frame.filter(|f| !matches!(u16::from(f.code), 1005 | 1006 | 1015))
}

/// Per-connection message rate: a token bucket of one second's burst.
struct MsgRate {
    per_s: f64,
    tokens: f64,
    at: Instant,
}

impl MsgRate {
    fn allow(&mut self, now: Instant) -> bool {
        if self.per_s <= 0.0 {
            return true;
        }
        let burst = self.per_s.max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs the session to its end and returns why it ended. The caller
/// counts it (exactly once) and releases the connection's permits.
///
/// This future is most of an idle connection's memory, so it is kept
/// small: the streams are split before it exists and moved into an
/// `async move` block (an `async fn` keeps a second copy of every argument
/// for its whole life), the loop's branch futures hold references only,
/// and the close sequence, which runs once, is boxed.
pub fn run<C>(client: WebSocketStream<C>, upstream: Upstream, p: Params) -> impl Future<Output = CloseReason>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ctx, mut crx) = client.split();
    let (mut utx, mut urx) = match upstream {
        Some(u) => {
            let (t, r) = u.split();
            (Some(t), Some(r))
        }
        None => (None, None),
    };
    async move {
        let echo = utx.is_none();
        let info = p.info.clone();
        let m = &p.metrics;
        let lim = &p.limits;
        let max_out = lim.max_outbound_bytes;
        let start = Instant::now();

        let mut to_client = Outbox::new();
        let mut to_up = Outbox::new();
        let mut client_progress = start;
        let mut up_progress = start;

        let ping_every = Duration::from_millis(p.heartbeat.ping_interval_ms);
        let pong_wait = Duration::from_millis(p.heartbeat.pong_timeout_ms);
        let idle =
            (p.heartbeat.idle_timeout_ms > 0).then(|| Duration::from_millis(p.heartbeat.idle_timeout_ms));
        let lifetime_end = (lim.max_lifetime_s > 0).then(|| start + Duration::from_secs(lim.max_lifetime_s));
        let write_timeout = lim.write_timeout();

        // Heartbeat: `ping_sent` is Some while a ping awaits any frame back.
        let mut next_ping = start + ping_every;
        let mut ping_sent: Option<Instant> = None;
        let mut last_data = start;
        let mut rate =
            MsgRate { per_s: lim.per_conn_msgs_per_s, tokens: lim.per_conn_msgs_per_s.max(1.0), at: start };

        let timer = tokio::time::sleep_until(start);
        tokio::pin!(timer);

        let ending: Ending = 'session: loop {
            // The earliest deadline, and what fires there, in table order so a
            // tie goes to the rule listed first. (A block, so the table is
            // not kept in the task across the wait below.)
            let (at, fires) = {
                let deadlines = [
                    (ping_sent.map(|s| s + pong_wait), Some(CloseReason::PongTimeout)),
                    (idle.map(|i| last_data + i), Some(CloseReason::Idle)),
                    (p.expires_at, Some(CloseReason::TokenExpired)),
                    (
                        to_client.pending().then(|| client_progress + write_timeout),
                        Some(CloseReason::SlowReader),
                    ),
                    (lifetime_end, Some(CloseReason::MaxLifetime)),
                    (ping_sent.is_none().then_some(next_ping), None),
                ];
                deadlines
                    .iter()
                    .filter_map(|(d, r)| d.map(|d| (d, *r)))
                    .min_by_key(|(d, _)| *d)
                    .unwrap_or((start + Duration::from_secs(86_400 * 365), None))
            };
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            let read_client = if echo { to_client.bytes < max_out } else { to_up.bytes < max_out };
            let read_up = to_client.bytes < max_out;

            tokio::select! {
                biased;
                reason = info.kicked() => {
                    let code = reason.close_code();
                    break 'session Ending { reason, frame: Some(close_frame(code, reason.label())) };
                }
                _ = &mut timer => {
                    match fires {
                        Some(reason) => {
                            break 'session Ending { reason, frame: Some(close_frame(reason.close_code(), reason.label())) };
                        }
                        None => {
                            // Ping time. Queued behind pending data: a client
                            // that cannot take data cannot take a ping either.
                            to_client.push(Message::Ping(Default::default()));
                            if to_client.msgs.len() == 1 && !to_client.unflushed {
                                client_progress = Instant::now();
                            }
                            ping_sent = Some(Instant::now());
                        }
                    }
                }
                r = pump(&mut ctx, &mut to_client, &mut client_progress), if to_client.pending() => {
                    if let Err(e) = r {
                        break 'session error_ending(e);
                    }
                }
                r = async { match utx.as_mut() { Some(t) => pump(t, &mut to_up, &mut up_progress).await, None => Ok(()) } },
                    if !echo && to_up.pending() => {
                    if r.is_err() {
                        break 'session Ending { reason: CloseReason::UpstreamLost, frame: Some(close_frame(1014, "upstream_lost")) };
                    }
                }
                msg = crx.next(), if read_client => {
                    let now = Instant::now();
                    ping_sent = None;
                    if next_ping <= now {
                        next_ping = now + ping_every;
                    }
                    info.touch(unix_now());
                    match msg {
                        None => break 'session Ending { reason: CloseReason::ClientClose, frame: None },
                        Some(Err(e)) => break 'session error_ending(e),
                        Some(Ok(Message::Close(frame))) => {
                            break 'session Ending { reason: CloseReason::ClientClose, frame: carried(frame) };
                        }
                        Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                            if !rate.allow(now) {
                                break 'session Ending { reason: CloseReason::MsgRate, frame: Some(close_frame(1008, "msg_rate")) };
                            }
                            last_data = now;
                            let len = msg.len();
                            m.relayed(Direction::ClientToUpstream, len);
                            if echo {
                                if !to_client.pending() {
                                    client_progress = now;
                                }
                                m.relayed(Direction::UpstreamToClient, len);
                                to_client.push(msg);
                            } else {
                                if !to_up.pending() {
                                    up_progress = now;
                                }
                                to_up.push(msg);
                            }
                        }
                        // Pings are answered by tungstenite, pongs only prove life.
                        Some(Ok(_)) => {}
                    }
                }
                msg = async { match urx.as_mut() { Some(r) => r.next().await, None => std::future::pending().await } },
                    if !echo && read_up => {
                    match msg {
                        None | Some(Err(_)) => {
                            break 'session Ending { reason: CloseReason::UpstreamLost, frame: Some(close_frame(1014, "upstream_lost")) };
                        }
                        Some(Ok(Message::Close(frame))) => {
                            break 'session Ending { reason: CloseReason::UpstreamClose, frame: carried(frame) };
                        }
                        Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                            let now = Instant::now();
                            last_data = now;
                            m.relayed(Direction::UpstreamToClient, msg.len());
                            if !to_client.pending() {
                                client_progress = now;
                            }
                            to_client.push(msg);
                        }
                        Some(Ok(_)) => {}
                    }
                }
            }
        };

        // Boxed: the close sequence runs once, and inline its state would
        // widen every idle session's future.
        Box::pin(finish(
            ending.reason,
            ending.frame,
            &mut ctx,
            &mut crx,
            utx.as_mut(),
            urx.as_mut(),
            &mut to_client,
            &mut to_up,
        ))
        .await;
        ending.reason
    }
}

/// Maps a client-side read/write error to its reason and close frame.
fn error_ending(e: WsError) -> Ending {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ending { reason: CloseReason::MessageTooBig, frame: Some(close_frame(1009, "message_too_big")) }
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::ConnectionClosed => {
            Ending { reason: CloseReason::ClientClose, frame: None }
        }
        WsError::Protocol(_) | WsError::Utf8(_) => {
            Ending { reason: CloseReason::Error, frame: Some(close_frame(1002, "protocol_error")) }
        }
        _ => Ending { reason: CloseReason::Error, frame: Some(close_frame(1011, "error")) },
    }
}

/// Closes both hops according to how the session ended, each step bounded.
#[allow(clippy::too_many_arguments)]
async fn finish<C>(
    reason: CloseReason,
    frame: Option<CloseFrame>,
    ctx: &mut SplitSink<WebSocketStream<C>, Message>,
    crx: &mut SplitStream<WebSocketStream<C>>,
    utx: Option<&mut SplitSink<WebSocketStream<TcpStream>, Message>>,
    urx: Option<&mut SplitStream<WebSocketStream<TcpStream>>>,
    to_client: &mut Outbox,
    to_up: &mut Outbox,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut progress = Instant::now();
    match reason {
        CloseReason::ClientClose => {
            // tungstenite queued the reply to the client's close: flush it.
            let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, ctx.flush()).await;
            if let (Some(tx), Some(rx)) = (utx, urx) {
                to_up.push(Message::Close(frame));
                let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
                    let _ = pump(tx, to_up, &mut progress).await;
                    while let Some(Ok(_)) = rx.next().await {}
                })
                .await;
            }
        }
        CloseReason::UpstreamClose => {
            // Deliver what the upstream sent before its close, then the close.
            let _ =
                tokio::time::timeout(CLOSE_REPLY_TIMEOUT, ctx_flush_all(ctx, crx, to_client, frame)).await;
            if let Some(tx) = utx {
                let _ = tokio::time::timeout(BEST_EFFORT_TIMEOUT, tx.flush()).await;
            }
        }
        CloseReason::PongTimeout | CloseReason::SlowReader => {
            // The client is not reading: one try, no waiting for a reply.
            let _ = tokio::time::timeout(BEST_EFFORT_TIMEOUT, async {
                let _ = ctx.send(Message::Close(frame.clone())).await;
            })
            .await;
            close_upstream(utx, urx, frame).await;
        }
        _ => {
            to_client.msgs.clear();
            to_client.bytes = 0;
            let up_frame = if reason == CloseReason::UpstreamLost { None } else { Some(frame.clone()) };
            let client = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, ctx_flush_all(ctx, crx, to_client, frame));
            match up_frame {
                Some(f) => {
                    let _ = tokio::join!(client, close_upstream(utx, urx, f));
                }
                None => {
                    let _ = client.await;
                }
            }
        }
    }
}

/// Writes the outbox and a close frame to the client, then waits for the
/// client's close reply (the caller bounds the time).
async fn ctx_flush_all<C>(
    ctx: &mut SplitSink<WebSocketStream<C>, Message>,
    crx: &mut SplitStream<WebSocketStream<C>>,
    out: &mut Outbox,
    frame: Option<CloseFrame>,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut progress = Instant::now();
    out.push(Message::Close(frame));
    if pump(ctx, out, &mut progress).await.is_err() {
        return;
    }
    while let Some(Ok(_)) = crx.next().await {}
}

async fn close_upstream(
    utx: Option<&mut SplitSink<WebSocketStream<TcpStream>, Message>>,
    urx: Option<&mut SplitStream<WebSocketStream<TcpStream>>>,
    frame: Option<CloseFrame>,
) {
    if let (Some(tx), Some(rx)) = (utx, urx) {
        let _ = tokio::time::timeout(CLOSE_REPLY_TIMEOUT, async {
            if tx.send(Message::Close(frame)).await.is_ok() {
                while let Some(Ok(_)) = rx.next().await {}
            }
        })
        .await;
    }
}
