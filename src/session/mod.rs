//! Stage 8, the session: relay frames between the client and the upstream
//! (or answer them, in echo mode), and end the connection with the first
//! rule that fires (the session table of docs/reference.md).
//!
//! One task per connection owns both sockets (no `split()`, no lock) and
//! runs one loop over: a kick (revoke, evict, drain), one timer, and the
//! sockets' reads and writes. All deadlines (heartbeat, idle, token expiry,
//! lifetime, write stalls) share that single timer, re-armed to the
//! earliest: tokio's timer wheel holds one entry per connection.
//!
//! Proxy mode relays frames verbatim through a [`relay::Filter`] each way;
//! echo mode answers through an [`echo::Echo`]. The gateway's own frames
//! (its pings, its closes) enter a direction only between frames.
//!
//! Memory: every read lands in a per-thread scratch buffer; a connection
//! keeps only what could not be written yet (its outbox, freed once
//! empty) and a split header or control frame. An idle connection holds no
//! buffer at all, and one that carried a large message returns to that.
//!
//! Backpressure: each direction's outbox is bounded by
//! `limits.max_outbound_bytes`; while it is full the loop stops reading the
//! side that feeds it, so a slow reader slows its writer instead of growing
//! memory. While the gateway is not reading the client, the client is
//! never counted silent: a stalled backend is `upstream_stalled`, not the
//! client's `pong_timeout`.

pub mod echo;
pub mod leases;
pub mod registry;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::{Heartbeat, Limits};
use crate::metrics::{Direction, Metrics};
use crate::reject::CloseReason;
use crate::relay::frame::{self, CLOSE, PING, PONG};
use crate::relay::{Event, Filter, Refusal, Rules};
use crate::upstream::Backend;
use echo::{Action, Echo};
use registry::{unix_now, ConnInfo};

/// How long the gateway waits for the peer's reply to a close.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Best-effort close for clients we no longer trust to read (pong
/// timeout, slow reader).
const BEST_EFFORT_TIMEOUT: Duration = Duration::from_millis(100);
/// After refusing a peer's stream, how long its bytes are still read (and
/// dropped) so its close reply is taken and the socket closes with a FIN,
/// not a reset that could destroy the close frame in flight.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// The per-thread read buffer. 64 KiB: a 64 KiB message in one read.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Every read lands here: one buffer per worker thread, not one per
    /// connection. Only bytes that must wait are copied out of it.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

/// The client's transport after the 101, and any bytes read past the head.
pub struct Client<S> {
    pub io: S,
    pub rest: Vec<u8>,
}

/// The upstream of a session: a backend socket, or nothing for `echo`.
pub type Upstream = Option<Backend>;

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

/// Bytes waiting to be written one way. Empty, it holds no allocation.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    /// How much of `buf` is written.
    head: usize,
    /// Written but not yet flushed (TLS).
    unflushed: bool,
}

impl Outbox {
    fn len(&self) -> usize {
        self.buf.len() - self.head
    }
    fn pending(&self) -> bool {
        self.len() > 0 || self.unflushed
    }
    fn push(&mut self, b: &[u8]) {
        // Reclaim the written front once it is most of the buffer.
        if self.head >= SCRATCH_BYTES && self.head * 2 >= self.buf.len() {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(b);
    }
}

/// What the gateway sends a side when it ends the session.
#[derive(Clone, Copy)]
enum Goodbye {
    /// Leave it be: the relay carries the closing handshake (a peer's
    /// close frame is on its way through).
    Keep,
    /// Nothing: it is gone, or not worth a frame (a stalled backend).
    Nothing,
    /// A close frame with this code (none for `None`) and reason text.
    Close(Option<u16>, &'static str),
}

/// One socket of the session and where its closing handshake stands.
struct Side<S> {
    io: S,
    out: Outbox,
    /// Last write progress, or when bytes became pending.
    progress: Instant,
    /// Nothing more will be read from it (EOF or error).
    eof: bool,
    /// A write failed, or it was abandoned mid-frame: no more I/O to it.
    broken: bool,
    got_close: bool,
    sent_close: bool,
    /// Its stream was refused: reads are dropped unparsed until this time.
    drain_until: Option<Instant>,
    /// Whether its close reply is worth waiting for.
    wait_reply: bool,
}

impl<S> Side<S> {
    fn new(io: S, now: Instant) -> Side<S> {
        Side {
            io,
            out: Outbox::default(),
            progress: now,
            eof: false,
            broken: false,
            got_close: false,
            sent_close: false,
            drain_until: None,
            wait_reply: true,
        }
    }

    /// Queues bytes; the write-stall clock starts when the outbox does.
    fn push(&mut self, b: &[u8], now: Instant) {
        if self.broken {
            return;
        }
        if !self.out.pending() {
            self.progress = now;
        }
        self.out.push(b);
    }

    fn readable(&self) -> bool {
        !(self.eof || self.broken || self.got_close)
    }

    /// Closing: nothing left to write, and its reply is in (or not awaited).
    fn done(&self, now: Instant) -> bool {
        if self.broken {
            return true;
        }
        let written = self.sent_close && !self.out.pending();
        let replied =
            self.eof || self.got_close || !self.wait_reply || self.drain_until.is_some_and(|t| now >= t);
        written && replied
    }
}

impl<S: AsyncWrite + Unpin> Side<S> {
    /// Writes what it can; true if any byte went. Frees the outbox once
    /// empty. A write error marks the side broken.
    fn poll_out(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        if self.broken {
            self.out = Outbox::default();
            return false;
        }
        let mut wrote = false;
        while self.out.len() > 0 {
            match Pin::new(&mut self.io).poll_write(cx, &self.out.buf[self.out.head..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.out.head += n;
                    self.out.unflushed = true;
                    self.progress = now;
                    wrote = true;
                }
                Poll::Ready(_) => {
                    self.broken = true;
                    self.out = Outbox::default();
                    return wrote;
                }
                Poll::Pending => return wrote,
            }
        }
        if self.out.buf.capacity() > 0 {
            self.out.buf = Vec::new();
            self.out.head = 0;
        }
        if self.out.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.out.unflushed = false,
                Poll::Ready(Err(_)) => {
                    self.broken = true;
                    self.out = Outbox::default();
                }
                Poll::Pending => {}
            }
        }
        wrote
    }
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

/// What the one timer is armed for.
#[derive(Clone, Copy, Debug)]
enum Fire {
    End(CloseReason),
    Ping,
    /// Closing: the handshake's time is up (or a drain grace ended).
    Closing,
}

/// How the client's side is handled: relayed to a backend, or answered.
enum Mode {
    Proxy { up: Side<TcpStream>, from_client: Filter, from_up: Filter },
    Echo(Echo),
}

/// One upgraded connection.
struct Session<C> {
    client: Side<C>,
    mode: Mode,
    p: Params,
    start: Instant,
    /// Set once the first rule fired; the session is then closing.
    reason: Option<CloseReason>,
    closing_until: Option<Instant>,
    /// Heartbeat: `ping_sent` is set while the gateway's ping awaits any
    /// frame back; `ping_due` while it waits for a frame boundary.
    next_ping: Instant,
    ping_sent: Option<Instant>,
    ping_due: bool,
    /// Our ping payload, so the pong answering it is recognised (and
    /// consumed) among the client's pongs to the backend's pings.
    ping_payload: [u8; 8],
    /// The gateway had stopped reading the client at the last look.
    client_paused: bool,
    last_data: Instant,
    rate: MsgRate,
}

/// Runs the session to its end and returns why it ended. The caller
/// counts it (exactly once) and releases the connection's permits.
///
/// This future is most of an idle connection's memory, so it is kept
/// small: the session is built before it exists and moved in whole (an
/// `async fn` would keep a second copy of every argument for its whole
/// life), and its branch futures hold references only.
pub fn run<C>(client: Client<C>, upstream: Upstream, p: Params) -> impl Future<Output = CloseReason>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let info = p.info.clone();
    let mut s = Session::new(client, upstream, p);
    async move {
        let timer = tokio::time::sleep_until(s.start);
        tokio::pin!(timer);
        loop {
            let now = Instant::now();
            if s.finished(now) {
                break;
            }
            let (at, fire) = s.next_deadline(now);
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            let open = s.reason.is_none();
            tokio::select! {
                biased;
                reason = info.kicked(), if open => {
                    let g = Goodbye::Close(Some(reason.close_code()), reason.label());
                    s.begin_close(reason, g, g, Instant::now());
                }
                _ = &mut timer => s.on_timer(fire, Instant::now()),
                _ = std::future::poll_fn(|cx| s.poll_io(cx)) => {}
            }
        }
        s.reason.unwrap_or(CloseReason::Error)
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> Session<C> {
    fn new(client: Client<C>, upstream: Upstream, p: Params) -> Session<C> {
        let start = Instant::now();
        let Client { io, rest } = client;
        let max_message = p.limits.max_message_bytes as u64;
        let (mode, up_rest) = match upstream {
            Some(b) => {
                let from_client = Filter::new(Rules { from_client: true, deflate: b.deflate, max_message });
                let from_up = Filter::new(Rules { from_client: false, deflate: b.deflate, max_message });
                (Mode::Proxy { up: Side::new(b.tcp, start), from_client, from_up }, b.rest)
            }
            None => (Mode::Echo(Echo::new(max_message)), Vec::new()),
        };
        let mut s = Session {
            client: Side::new(io, start),
            mode,
            next_ping: start + Duration::from_millis(p.heartbeat.ping_interval_ms),
            ping_sent: None,
            ping_due: false,
            ping_payload: p.info.id.to_be_bytes(),
            client_paused: false,
            last_data: start,
            rate: MsgRate {
                per_s: p.limits.per_conn_msgs_per_s,
                tokens: p.limits.per_conn_msgs_per_s.max(1.0),
                at: start,
            },
            p,
            start,
            reason: None,
            closing_until: None,
        };
        // Frames that arrived along with the handshakes.
        if !rest.is_empty() {
            s.client_bytes(&rest, start);
        }
        if !up_rest.is_empty() {
            s.up_bytes(&up_rest, start);
        }
        s
    }

    fn max_out(&self) -> usize {
        self.p.limits.max_outbound_bytes
    }

    fn can_read_client(&self) -> bool {
        if !self.client.readable() {
            return false;
        }
        if self.client.drain_until.is_some() {
            return true;
        }
        match &self.mode {
            Mode::Proxy { up, .. } => up.out.len() < self.max_out() || up.broken,
            Mode::Echo(_) => self.client.out.len() < self.max_out(),
        }
    }

    fn can_read_up(&self) -> bool {
        match &self.mode {
            Mode::Proxy { up, .. } => {
                up.readable()
                    && (up.drain_until.is_some()
                        || self.client.out.len() < self.max_out()
                        || self.client.broken)
            }
            Mode::Echo(_) => false,
        }
    }

    /// The earliest deadline and what fires there, in table order so a
    /// tie goes to the rule listed first.
    fn next_deadline(&mut self, now: Instant) -> (Instant, Fire) {
        if let Some(until) = self.closing_until {
            let mut at = until;
            for d in [self.client.drain_until, self.up().and_then(|u| u.drain_until)].into_iter().flatten() {
                if d > now {
                    at = at.min(d);
                }
            }
            return (at, Fire::Closing);
        }
        // The client is never counted silent while the gateway is not
        // reading it: its pong may be queued behind data we refused to take.
        let reading = self.can_read_client();
        if !reading {
            self.client_paused = true;
        } else if self.client_paused {
            self.client_paused = false;
            if self.ping_sent.is_some() {
                self.ping_sent = Some(now);
            }
        }
        let hb = &self.p.heartbeat;
        let lim = &self.p.limits;
        let wt = lim.write_timeout();
        let deadlines = [
            (
                self.ping_sent.filter(|_| reading).map(|s| s + Duration::from_millis(hb.pong_timeout_ms)),
                Fire::End(CloseReason::PongTimeout),
            ),
            (
                (hb.idle_timeout_ms > 0).then(|| self.last_data + Duration::from_millis(hb.idle_timeout_ms)),
                Fire::End(CloseReason::Idle),
            ),
            (self.p.expires_at, Fire::End(CloseReason::TokenExpired)),
            (
                self.client.out.pending().then(|| self.client.progress + wt),
                Fire::End(CloseReason::SlowReader),
            ),
            (
                self.up().filter(|u| u.out.pending()).map(|u| u.progress + wt),
                Fire::End(CloseReason::UpstreamStalled),
            ),
            (
                (lim.max_lifetime_s > 0).then(|| self.start + Duration::from_secs(lim.max_lifetime_s)),
                Fire::End(CloseReason::MaxLifetime),
            ),
            ((self.ping_sent.is_none() && !self.ping_due).then_some(self.next_ping), Fire::Ping),
        ];
        deadlines
            .iter()
            .filter_map(|(d, f)| d.map(|d| (d, *f)))
            .min_by_key(|(d, _)| *d)
            .unwrap_or((self.start + Duration::from_secs(86_400 * 365), Fire::Ping))
    }

    fn up(&self) -> Option<&Side<TcpStream>> {
        match &self.mode {
            Mode::Proxy { up, .. } => Some(up),
            Mode::Echo(_) => None,
        }
    }

    fn on_timer(&mut self, fire: Fire, now: Instant) {
        match fire {
            Fire::End(reason) => {
                let g = Goodbye::Close(Some(reason.close_code()), reason.label());
                let to_up = if reason == CloseReason::UpstreamStalled { Goodbye::Nothing } else { g };
                self.begin_close(reason, g, to_up, now);
            }
            Fire::Ping => {
                self.ping_due = true;
                self.maybe_ping(now);
            }
            Fire::Closing => {
                let Some(until) = self.closing_until else { return };
                if now < until {
                    return;
                }
                // The backend never answered the client's close: answer it
                // ourselves, once, briefly.
                if self.client.got_close && !self.client.sent_close && self.toward_client_at_boundary() {
                    self.client.push(&frame::close(None, "", None), now);
                    self.client.sent_close = true;
                    self.client.wait_reply = false;
                    if let Mode::Proxy { up, .. } = &mut self.mode {
                        up.broken = true;
                    }
                    self.closing_until = Some(now + BEST_EFFORT_TIMEOUT);
                    return;
                }
                self.closing_until = Some(now);
                self.client.broken = true;
                if let Mode::Proxy { up, .. } = &mut self.mode {
                    up.broken = true;
                }
            }
        }
    }

    fn finished(&self, now: Instant) -> bool {
        if self.reason.is_none() {
            return false;
        }
        self.client.done(now) && self.up().is_none_or(|u| u.done(now))
    }

    fn toward_client_at_boundary(&self) -> bool {
        match &self.mode {
            Mode::Proxy { from_up, .. } => from_up.at_boundary(),
            Mode::Echo(echo) => echo.at_boundary(),
        }
    }

    /// Sends the gateway's ping when the stream toward the client is
    /// between frames.
    fn maybe_ping(&mut self, now: Instant) {
        if !self.ping_due || self.reason.is_some() || !self.toward_client_at_boundary() {
            return;
        }
        let f = frame::control(PING, &self.ping_payload, None);
        self.client.push(&f, now);
        self.ping_due = false;
        self.ping_sent = Some(now);
    }

    /// The first rule fired: say goodbye to each side as `reason` wants and
    /// start closing. Later rules are ignored.
    fn begin_close(&mut self, reason: CloseReason, to_client: Goodbye, to_up: Goodbye, now: Instant) {
        if self.reason.is_some() {
            return;
        }
        self.reason = Some(reason);
        let wait = match reason {
            CloseReason::PongTimeout | CloseReason::SlowReader => {
                // The client is not reading: one try, no waiting for a reply.
                self.client.wait_reply = false;
                BEST_EFFORT_TIMEOUT
            }
            _ => CLOSE_REPLY_TIMEOUT,
        };
        self.closing_until = Some(now + wait);
        let client_boundary = self.toward_client_at_boundary();
        goodbye(&mut self.client, to_client, client_boundary, None, now);
        if let Mode::Proxy { up, from_client, .. } = &mut self.mode {
            if reason == CloseReason::UpstreamLost {
                up.eof = true;
                up.broken = true;
            }
            let mask = rand::random::<[u8; 4]>();
            goodbye(up, to_up, from_client.at_boundary(), Some(mask), now);
        }
    }

    /// Reads and writes whatever is ready. `Ready` after any progress (the
    /// caller re-evaluates its deadlines), `Pending` once nothing moves.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        let mut moved = self.poll_writes(cx, now);
        let read = SCRATCH.with(|cell| {
            // Not re-entered: nothing below reads a socket through it.
            let Ok(mut buf) = cell.try_borrow_mut() else { return false };
            let mut read = false;
            if self.can_read_client() {
                match poll_read(&mut self.client.io, cx, &mut buf) {
                    Poll::Ready(Some(n)) => {
                        self.client_bytes(&buf[..n], now);
                        read = true;
                    }
                    Poll::Ready(None) => {
                        self.client.eof = true;
                        self.client_gone(now);
                        read = true;
                    }
                    Poll::Pending => {}
                }
            }
            if self.can_read_up() {
                let Mode::Proxy { up, .. } = &mut self.mode else { return read };
                match poll_read(&mut up.io, cx, &mut buf) {
                    Poll::Ready(Some(n)) => {
                        self.up_bytes(&buf[..n], now);
                        read = true;
                    }
                    Poll::Ready(None) => {
                        up.eof = true;
                        self.up_gone(now);
                        read = true;
                    }
                    Poll::Pending => {}
                }
            }
            read
        });
        if read {
            self.poll_writes(cx, now);
            moved = true;
        }
        if moved {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Writes both outboxes; true if any byte went or a side broke.
    fn poll_writes(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut moved = false;
        if self.client.out.pending() && !self.client.broken {
            moved |= self.client.poll_out(cx, now);
            if self.client.broken {
                moved = true;
                self.client_gone(now);
            }
        }
        if let Mode::Proxy { up, .. } = &mut self.mode {
            if up.out.pending() && !up.broken {
                moved |= up.poll_out(cx, now);
                if up.broken {
                    moved = true;
                    self.up_gone(now);
                }
            }
        }
        moved
    }

    /// The client's socket ended (EOF, read or write error).
    fn client_gone(&mut self, now: Instant) {
        self.client.eof = true;
        self.client.sent_close = true;
        if self.reason.is_none() {
            // Tell the backend, with no code: the client gave none.
            self.begin_close(CloseReason::ClientClose, Goodbye::Nothing, Goodbye::Close(None, ""), now);
        } else if let Mode::Proxy { up, .. } = &mut self.mode {
            // Closing and the client left: nobody to relay the backend's reply to.
            if !up.sent_close {
                up.wait_reply = false;
                up.sent_close = true;
            }
        }
    }

    /// The backend's socket ended.
    fn up_gone(&mut self, now: Instant) {
        if let Mode::Proxy { up, .. } = &mut self.mode {
            up.eof = true;
            up.sent_close = true;
        }
        if self.reason.is_none() {
            let g = Goodbye::Close(
                Some(CloseReason::UpstreamLost.close_code()),
                CloseReason::UpstreamLost.label(),
            );
            self.begin_close(CloseReason::UpstreamLost, g, Goodbye::Nothing, now);
        } else if self.client.got_close && !self.client.sent_close && self.toward_client_at_boundary() {
            // The client's close will get no reply from the backend: give ours.
            self.client.push(&frame::close(None, "", None), now);
            self.client.sent_close = true;
        }
    }

    /// Bytes from the client: parsed, checked, and relayed or answered.
    fn client_bytes(&mut self, data: &[u8], now: Instant) {
        // Any byte proves the client alive.
        self.ping_sent = None;
        if self.next_ping <= now {
            self.next_ping = now + Duration::from_millis(self.p.heartbeat.ping_interval_ms);
        }
        self.p.info.touch(unix_now());
        if self.client.drain_until.is_some() {
            return;
        }
        let open = self.reason.is_none();
        let mut ended: Option<(CloseReason, Goodbye, Goodbye)> = None;
        let client = &mut self.client;
        let rate = &mut self.rate;
        let metrics = &self.p.metrics;
        let last_data = &mut self.last_data;
        match &mut self.mode {
            Mode::Proxy { up, from_client, .. } => {
                let ours = &self.ping_payload;
                let r = from_client.feed(data, &mut |e| match e {
                    Event::MessageStart => {
                        if open && !rate.allow(now) {
                            ended = Some(gateway_close(CloseReason::MsgRate));
                            return false;
                        }
                        true
                    }
                    Event::Forward(b) => {
                        if !up.sent_close {
                            up.push(b, now);
                        }
                        true
                    }
                    Event::Control { opcode: PONG, payload, .. } if payload == ours => true,
                    Event::Control { opcode: CLOSE, raw, .. } => {
                        client.got_close = true;
                        if !up.sent_close {
                            up.push(raw, now);
                            up.sent_close = true;
                        }
                        if open {
                            ended = Some((CloseReason::ClientClose, Goodbye::Keep, Goodbye::Keep));
                        }
                        false
                    }
                    Event::Control { raw, .. } => {
                        if !up.sent_close {
                            up.push(raw, now);
                        }
                        true
                    }
                    Event::MessageEnd(n) => {
                        metrics.relayed(Direction::ClientToUpstream, n as usize);
                        *last_data = now;
                        true
                    }
                });
                if let Err(refusal) = r {
                    client.drain_until = Some(now + DRAIN_GRACE);
                    ended = Some(match refusal {
                        Refusal::TooBig => gateway_close(CloseReason::MessageTooBig),
                        Refusal::Protocol(why) => {
                            tracing::debug!(why, "client protocol error");
                            let g = Goodbye::Close(Some(1002), "protocol_error");
                            (CloseReason::Error, g, g)
                        }
                    });
                }
            }
            Mode::Echo(echo) => {
                let r = echo.feed(data, &mut |a| match a {
                    Action::MessageStart => {
                        if open && !rate.allow(now) {
                            ended = Some(gateway_close(CloseReason::MsgRate));
                            return false;
                        }
                        true
                    }
                    Action::Send(b) => {
                        if !client.sent_close {
                            client.push(b, now);
                        }
                        true
                    }
                    Action::MessageEnd(n) => {
                        metrics.relayed(Direction::ClientToUpstream, n as usize);
                        metrics.relayed(Direction::UpstreamToClient, n as usize);
                        *last_data = now;
                        true
                    }
                    Action::Pong => true,
                    Action::Close(code) => {
                        client.got_close = true;
                        if !client.sent_close {
                            client.push(&frame::close(code, "", None), now);
                            client.sent_close = true;
                        }
                        if open {
                            ended = Some((CloseReason::ClientClose, Goodbye::Keep, Goodbye::Keep));
                        }
                        false
                    }
                });
                if let Err(refusal) = r {
                    client.drain_until = Some(now + DRAIN_GRACE);
                    let g = |code, text| Goodbye::Close(Some(code), text);
                    ended = Some(match refusal {
                        echo::Refusal::TooBig => gateway_close(CloseReason::MessageTooBig),
                        echo::Refusal::InvalidUtf8 => {
                            (CloseReason::Error, g(1007, "invalid_utf8"), Goodbye::Nothing)
                        }
                        echo::Refusal::Protocol(why) => {
                            tracing::debug!(why, "client protocol error");
                            (CloseReason::Error, g(1002, "protocol_error"), Goodbye::Nothing)
                        }
                    });
                }
            }
        }
        if let Some((reason, to_client, to_up)) = ended {
            self.begin_close(reason, to_client, to_up, now);
        }
    }

    /// Bytes from the backend: parsed, checked, relayed to the client.
    fn up_bytes(&mut self, data: &[u8], now: Instant) {
        let open = self.reason.is_none();
        let mut ended: Option<(CloseReason, Goodbye, Goodbye)> = None;
        let client = &mut self.client;
        let metrics = &self.p.metrics;
        let last_data = &mut self.last_data;
        let Mode::Proxy { up, from_up, .. } = &mut self.mode else { return };
        if up.drain_until.is_some() {
            return;
        }
        let r = from_up.feed(data, &mut |e| match e {
            Event::MessageStart => true,
            Event::Forward(b) => {
                if !client.sent_close {
                    client.push(b, now);
                }
                true
            }
            Event::Control { opcode: CLOSE, raw, .. } => {
                up.got_close = true;
                if !client.sent_close {
                    client.push(raw, now);
                    client.sent_close = true;
                }
                if open {
                    ended = Some((CloseReason::UpstreamClose, Goodbye::Keep, Goodbye::Keep));
                }
                false
            }
            // The backend's pings reach the client, whose pongs go back.
            Event::Control { raw, .. } => {
                if !client.sent_close {
                    client.push(raw, now);
                }
                true
            }
            Event::MessageEnd(n) => {
                metrics.relayed(Direction::UpstreamToClient, n as usize);
                *last_data = now;
                true
            }
        });
        if let Err(refusal) = r {
            up.drain_until = Some(now + DRAIN_GRACE);
            ended = Some(match refusal {
                Refusal::TooBig => gateway_close(CloseReason::MessageTooBig),
                Refusal::Protocol(why) => {
                    // The backend broke the protocol, not the client: the
                    // client is told 1011, the backend 1002.
                    tracing::debug!(why, "backend protocol error");
                    (
                        CloseReason::Error,
                        Goodbye::Close(Some(1011), "error"),
                        Goodbye::Close(Some(1002), "protocol_error"),
                    )
                }
            });
        }
        if let Some((reason, to_client, to_up)) = ended {
            self.begin_close(reason, to_client, to_up, now);
        }
        self.maybe_ping(now);
    }
}

/// A close the gateway decides, with the reason's own code both ways.
fn gateway_close(reason: CloseReason) -> (CloseReason, Goodbye, Goodbye) {
    let g = Goodbye::Close(Some(reason.close_code()), reason.label());
    (reason, g, g)
}

/// Queues the gateway's close toward a side, if it still needs one. A
/// side whose stream is mid-frame cannot take a frame of ours: it is
/// abandoned instead (its TCP connection simply closes).
fn goodbye<S>(side: &mut Side<S>, g: Goodbye, at_boundary: bool, mask: Option<[u8; 4]>, now: Instant) {
    if side.sent_close || side.broken {
        return;
    }
    match g {
        Goodbye::Keep => return,
        Goodbye::Nothing => side.broken = true,
        Goodbye::Close(code, text) => {
            if at_boundary {
                side.push(&frame::close(code, text, mask), now);
            } else {
                side.broken = true;
            }
        }
    }
    side.sent_close = true;
}

/// Reads into `buf`. `Ready(None)`: EOF or a read error.
fn poll_read<S: AsyncRead + Unpin>(io: &mut S, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<Option<usize>> {
    let mut rb = ReadBuf::new(buf);
    match Pin::new(io).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) if !rb.filled().is_empty() => Poll::Ready(Some(rb.filled().len())),
        Poll::Ready(_) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}
