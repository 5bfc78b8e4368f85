//! Stage 8, the session: relay frames between the client and the upstream
//! (or answer them, in echo mode), and end the connection with the first
//! rule that fires (the session table of docs/reference.md).
//!
//! One task per connection owns both sockets (no `split()`, no lock) and
//! runs one loop over: a kick (revoke, evict, drain), one deadline, and the
//! sockets' reads and writes. All deadlines (heartbeat, idle, token expiry,
//! lifetime, write stalls) share that single deadline, re-armed to the
//! earliest, kept as one entry of the gateway's shared [`timer::Timers`]
//! rather than a `Sleep` of its own.
//!
//! Proxy mode relays frames verbatim through a [`relay::Filter`] each way;
//! echo mode answers through an [`echo::Echo`]. The gateway's own frames
//! (its pings, its closes) enter a direction only between frames.
//!
//! Memory: every read lands in a per-thread scratch buffer; a connection
//! keeps only what could not be written yet (its outbox, freed once
//! empty) and a split header or control frame. An idle connection holds no
//! buffer at all, and one that carried a large message returns to that.
//! The session itself is most of what an idle connection costs, so its
//! state is kept in few bytes: times as milliseconds (`timer::Ms`) rather
//! than `Instant`s, only the limits it reads, the proxy half boxed (echo
//! sessions do not carry it), the kick polled rather than awaited, the
//! deadline shared rather than a `Sleep`, and no future of its own: the
//! session is the future.
//!
//! Backpressure: each direction's outbox is bounded by
//! `limits.max_outbound_bytes`; while it is full the loop stops reading the
//! side that feeds it, so a slow reader slows its writer instead of growing
//! memory. While the gateway is not reading the client, the client is
//! never counted silent: a stalled backend is `upstream_stalled`, not the
//! client's `pong_timeout`.

pub mod deflate;
pub mod echo;
pub mod handover;
pub mod leases;
pub mod registry;
mod timer;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::config::{Heartbeat, Limits};
use crate::metrics::{Direction, Metrics};
use crate::reject::CloseReason;
use crate::relay::frame::{self, CLOSE, PING, PONG};
use crate::relay::{Event, Filter, Refusal, Rules};
use crate::upstream::pool::Lease;
use crate::upstream::{Backend, BackendIo};
use echo::{Action, Echo};
use registry::{unix_now, ConnInfo};
use timer::{Ms, NEVER};

/// How long the gateway waits for the peer's reply to a close.
const CLOSE_REPLY_TIMEOUT: Ms = 1000;
/// Best-effort close for clients we no longer trust to read (pong
/// timeout, slow reader).
const BEST_EFFORT_TIMEOUT: Ms = 100;
/// After refusing a peer's stream, how long its bytes are still read (and
/// dropped) so its close reply is taken and the socket closes with a FIN,
/// not a reset that could destroy the close frame in flight.
const DRAIN_GRACE: Ms = 100;
/// An echo answer at least this large is written at once rather than
/// queued behind the next: it would be a write of its own anyway, and an
/// outbox for it is a large allocation per read.
const WRITE_AT_ONCE: usize = 4096;
/// The per-thread read buffer. 64 KiB: a 64 KiB message in one read.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Every read lands here: one buffer per worker thread, not one per
    /// connection. Only bytes that must wait are copied out of it.
    static SCRATCH: RefCell<OffPage> = RefCell::new(OffPage::new(SCRATCH_BYTES));
}

/// A buffer that starts 64 bytes into a page, not on a page boundary.
///
/// The kernel copies between a socket and user memory with `rep movsb`,
/// which, by all appearances, stalls when source and destination sit at
/// the same offset in their pages (4K aliasing): the socket's page
/// fragments start on page boundaries, and mimalloc hands out blocks of
/// 64 KiB page-aligned. From such a buffer a relayed 64 KiB message cost
/// 5 % to 20 % more CPU, depending on the host (BENCHMARKS.md, "Relay CPU
/// against its floor").
pub(crate) struct OffPage {
    mem: Box<[u8]>,
    at: usize,
}

impl OffPage {
    const PAGE: usize = 4096;
    const SKEW: usize = 64;

    pub(crate) fn new(len: usize) -> OffPage {
        let mem = vec![0u8; len + Self::PAGE].into_boxed_slice();
        // Address arithmetic only: where the next page starts, plus the skew.
        let addr = mem.as_ptr() as usize;
        let at = (Self::PAGE + Self::SKEW - addr % Self::PAGE) % Self::PAGE;
        OffPage { mem, at }
    }

    /// The usable `len` bytes.
    pub(crate) fn buf(&mut self) -> &mut [u8] {
        let len = self.mem.len() - Self::PAGE;
        &mut self.mem[self.at..self.at + len]
    }
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
    /// Echo mode agreed `permessage-deflate` with the client (`deflate`).
    pub deflate: bool,
}

/// Converts a unix-seconds instant to tokio time.
pub fn instant_at_unix(unix_s: u64) -> Instant {
    let now = unix_now();
    Instant::now() + Duration::from_secs(unix_s.saturating_sub(now))
}

/// What a session keeps of its [`Params`]: the limits it reads, in its own
/// units. Durations are validated to at most a day (`config::bounds`), so
/// milliseconds fit a `u32`; a larger one (a config built in code, not
/// parsed) is held at `u32::MAX`, about 49 days.
struct Tuning {
    ping_interval: u32,
    pong_timeout: u32,
    /// 0 = off.
    idle_timeout: u32,
    write_timeout: u32,
    max_out: usize,
    /// Token expiry and lifetime end, or `NEVER`.
    expires: Ms,
    lifetime: Ms,
    /// 0 = unlimited.
    msgs_per_s: f64,
}

fn ms32(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// Bytes waiting to be written one way. Empty, it holds no allocation.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    /// How much of `buf` is written.
    head: usize,
}

impl Outbox {
    fn len(&self) -> usize {
        self.buf.len() - self.head
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
    progress: Ms,
    /// Its stream was refused: reads are dropped unparsed until this time
    /// (`NEVER`: not refused).
    drain_until: Ms,
    /// Written but not yet flushed (TLS).
    unflushed: bool,
    /// Nothing more will be read from it (EOF or error).
    eof: bool,
    /// A write failed, or it was abandoned mid-frame: no more I/O to it.
    broken: bool,
    got_close: bool,
    sent_close: bool,
    /// Whether its close reply is worth waiting for.
    wait_reply: bool,
}

impl<S> Side<S> {
    fn new(io: S) -> Side<S> {
        Side {
            io,
            out: Outbox::default(),
            progress: 0,
            drain_until: NEVER,
            unflushed: false,
            eof: false,
            broken: false,
            got_close: false,
            sent_close: false,
            wait_reply: true,
        }
    }

    fn pending(&self) -> bool {
        self.out.len() > 0 || self.unflushed
    }

    fn draining(&self) -> bool {
        self.drain_until != NEVER
    }

    /// Queues bytes; the write-stall clock starts when the outbox does.
    fn push(&mut self, b: &[u8], now: Ms) {
        if self.broken {
            return;
        }
        if !self.pending() {
            self.progress = now;
        }
        self.out.push(b);
    }

    fn readable(&self) -> bool {
        !(self.eof || self.broken || self.got_close)
    }

    /// Closing: nothing left to write, and its reply is in (or not awaited).
    fn done(&self, now: Ms) -> bool {
        if self.broken {
            return true;
        }
        let written = self.sent_close && !self.pending();
        let replied = self.eof || self.got_close || !self.wait_reply || now >= self.drain_until;
        written && replied
    }

    /// Gives up on writing: the outbox goes.
    fn break_off(&mut self) {
        self.broken = true;
        self.out = Outbox::default();
        self.unflushed = false;
    }
}

impl<S: AsyncWrite + Unpin> Side<S> {
    /// Queues bytes, writing them straight from where they lie when
    /// nothing waits before them: only what the socket does not take is
    /// copied into the outbox. Errors are left to `poll_out`, which meets
    /// them again on the queued bytes and handles them in one place.
    fn send(&mut self, b: &[u8], cx: Option<&mut Context<'_>>, now: Ms) {
        let mut b = b;
        if let Some(cx) = cx {
            if !self.broken && !self.pending() && !b.is_empty() {
                if let Poll::Ready(Ok(n)) = Pin::new(&mut self.io).poll_write(cx, b) {
                    if n > 0 {
                        self.unflushed = true;
                        self.progress = now;
                        b = &b[n.min(b.len())..];
                    }
                }
            }
        }
        if !b.is_empty() {
            self.push(b, now);
        }
    }

    /// Writes what it can; true if any byte went. Frees the outbox once
    /// empty. A write error marks the side broken.
    fn poll_out(&mut self, cx: &mut Context<'_>, now: Ms) -> bool {
        if self.broken {
            self.out = Outbox::default();
            return false;
        }
        let mut wrote = false;
        while self.out.len() > 0 {
            match Pin::new(&mut self.io).poll_write(cx, &self.out.buf[self.out.head..]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.out.head += n;
                    self.unflushed = true;
                    self.progress = now;
                    wrote = true;
                }
                Poll::Ready(_) => {
                    self.break_off();
                    return wrote;
                }
                Poll::Pending => return wrote,
            }
        }
        if self.out.buf.capacity() > 0 {
            self.out = Outbox::default();
        }
        if self.unflushed {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => self.break_off(),
                Poll::Pending => {}
            }
        }
        wrote
    }
}

/// Forwarded pieces of one read, gathered into runs: the relay passes a
/// frame as its header and its payload, which lie side by side in the read
/// buffer, so consecutive pieces are sent as one write rather than one per
/// piece, and straight from the buffer rather than through an outbox.
struct Through<'a> {
    data: &'a [u8],
    /// The part of `data` gathered and not yet sent.
    start: usize,
    end: usize,
}

impl<'a> Through<'a> {
    fn new(data: &'a [u8]) -> Through<'a> {
        Through { data, start: 0, end: 0 }
    }

    /// Adds a piece bound for `side`, in order after everything added so far.
    fn add<S: AsyncWrite + Unpin>(
        &mut self,
        side: &mut Side<S>,
        b: &[u8],
        mut cx: Option<&mut Context<'_>>,
        now: Ms,
    ) {
        // Where `b` lies in `data`, if it does (a split header is held
        // elsewhere, in the filter): plain address arithmetic, no unsafe.
        let at = (b.as_ptr() as usize).wrapping_sub(self.data.as_ptr() as usize);
        let inside = at <= self.data.len() && b.len() <= self.data.len() - at;
        if inside && at == self.end {
            self.end += b.len();
            return;
        }
        self.flush(side, cx.as_deref_mut(), now);
        if inside {
            (self.start, self.end) = (at, at + b.len());
        } else {
            side.send(b, cx, now);
        }
    }

    /// Sends what was gathered.
    fn flush<S: AsyncWrite + Unpin>(&mut self, side: &mut Side<S>, cx: Option<&mut Context<'_>>, now: Ms) {
        if self.end > self.start {
            side.send(&self.data[self.start..self.end], cx, now);
        }
        self.start = self.end;
    }
}

/// Per-connection message rate: a token bucket of one second's burst.
struct MsgRate {
    tokens: f64,
    at: Ms,
}

impl MsgRate {
    fn allow(&mut self, per_s: f64, now: Ms) -> bool {
        if per_s <= 0.0 {
            return true;
        }
        let burst = per_s.max(1.0);
        let elapsed_s = now.saturating_sub(self.at) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed_s * per_s).min(burst);
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

/// Proxy mode's half of a session: the backend and a filter each way.
/// Boxed in [`Mode`], so that echo sessions do not carry its room.
struct Proxy {
    up: Side<BackendIo>,
    from_client: Filter,
    from_up: Filter,
    /// Counts the session against its backend until it ends.
    _lease: Option<Lease>,
}

/// How the client's side is handled: relayed to a backend, or answered.
enum Mode {
    Proxy(Box<Proxy>),
    Echo(Echo),
}

/// One upgraded connection.
struct Session<C> {
    client: Side<C>,
    mode: Mode,
    info: Arc<ConnInfo>,
    metrics: Arc<Metrics>,
    t: Tuning,
    /// The deadline its entry in the shared timers stands at (`NEVER`:
    /// none).
    armed: Ms,
    /// Set once the first rule fired; the session is then closing.
    reason: Option<CloseReason>,
    /// While closing, when the closing handshake's time is up.
    closing_until: Ms,
    /// Heartbeat: `ping_sent` is set while the gateway's ping awaits any
    /// frame back; `ping_due` while it waits for a frame boundary. The
    /// ping's payload is the connection id, so the pong answering it is
    /// recognised (and consumed) among the client's pongs to the
    /// backend's pings.
    next_ping: Ms,
    ping_sent: Ms,
    ping_due: bool,
    /// The gateway had stopped reading the client at the last look.
    client_paused: bool,
    last_data: Ms,
    rate: MsgRate,
}

/// Runs the session to its end and returns why it ended. The caller
/// counts it (exactly once) and releases the connection's permits.
///
/// This future is most of an idle connection's memory, so it is the
/// session itself and nothing more: no `async` state machine around it
/// (which would keep a second copy of every argument), no timer of its own.
pub fn run<C>(client: Client<C>, upstream: Upstream, p: Params) -> impl Future<Output = CloseReason>
where
    C: AsyncRead + AsyncWrite + Unpin + handover::Movable,
{
    let mut s = Session::new(client, upstream, p);
    std::future::poll_fn(move |cx| s.poll(cx))
}

impl<C> Drop for Session<C> {
    fn drop(&mut self) {
        // A session dropped unfinished (its task aborted, the runtime
        // shutting down) leaves no entry in the shared timers.
        if self.armed != NEVER {
            self.info.timers().rearm(&self.info, self.armed, NEVER);
        }
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + handover::Movable> Session<C> {
    fn new(client: Client<C>, upstream: Upstream, p: Params) -> Session<C> {
        let Params { info, expires_at, limits, heartbeat, metrics, deflate } = p;
        let start = info.timers().now();
        let Client { io, rest } = client;
        let max_message = limits.max_message_bytes as u64;
        let (mode, up_rest) = match upstream {
            Some(b) => {
                let from_client = Filter::new(Rules { from_client: true, deflate: b.deflate, max_message });
                let from_up = Filter::new(Rules { from_client: false, deflate: b.deflate, max_message });
                let proxy = Proxy { up: Side::new(b.io), from_client, from_up, _lease: b.lease };
                (Mode::Proxy(Box::new(proxy)), b.rest)
            }
            None => (Mode::Echo(Echo::new(max_message, deflate)), Box::default()),
        };
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NEVER - 1);
        let t = Tuning {
            ping_interval: ms32(heartbeat.ping_interval_ms),
            pong_timeout: ms32(heartbeat.pong_timeout_ms),
            idle_timeout: ms32(heartbeat.idle_timeout_ms),
            write_timeout: ms32(limits.write_timeout_ms),
            max_out: limits.max_outbound_bytes,
            expires: expires_at
                .map_or(NEVER, |at| start.saturating_add(ms(at.saturating_duration_since(Instant::now())))),
            lifetime: match limits.max_lifetime_s {
                0 => NEVER,
                s => start.saturating_add(s.saturating_mul(1000)),
            },
            msgs_per_s: limits.per_conn_msgs_per_s,
        };
        let mut s = Session {
            client: Side::new(io),
            mode,
            info,
            metrics,
            next_ping: start + u64::from(t.ping_interval),
            ping_sent: NEVER,
            ping_due: false,
            client_paused: false,
            last_data: start,
            rate: MsgRate { tokens: t.msgs_per_s.max(1.0), at: start },
            t,
            armed: NEVER,
            reason: None,
            closing_until: NEVER,
        };
        // Frames that arrived along with the handshakes.
        if !rest.is_empty() {
            s.client_bytes(&rest, start, None);
        }
        if !up_rest.is_empty() {
            s.up_bytes(&up_rest, start, None);
        }
        s
    }

    fn now(&self) -> Ms {
        self.info.timers().now()
    }

    /// One turn of the session loop, in the order the rules are owed: a
    /// kick, then the deadline, then the sockets. `Ready` once finished.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        // Before the kick and the clock are read: a kick or a due deadline
        // from now on wakes this task.
        self.info.watch(cx.waker());
        // A binary upgrade's pause, before any socket is touched.
        if let Some(paused) = self.pause_point() {
            return paused;
        }
        // One clock read per wake: the loop below runs a few turns at most
        // (the runtime's budget stops the sockets), and a `now` a little
        // behind the wall only makes a deadline fire that much later.
        let now = self.now();
        // Sides whose read came back Pending in this wake: their wakers are
        // registered, so asking again before the next wake only costs the
        // readiness lock.
        let mut parked = Parked::default();
        loop {
            if self.finished(now) {
                self.disarm();
                return Poll::Ready(self.reason.unwrap_or(CloseReason::Error));
            }
            if self.reason.is_none() {
                if let Some(reason) = self.info.kicked_reason() {
                    let g = Goodbye::Close(Some(reason.close_code()), reason.label());
                    self.begin_close(reason, g, g, now);
                    continue;
                }
            }
            let (at, fire) = self.next_deadline(now);
            if at <= now {
                self.on_timer(fire, now);
                continue;
            }
            self.arm(at, now);
            if self.poll_io(cx, now, &mut parked).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// Makes sure the shared timers wake this session by `at`. An entry
    /// due no later is kept as it stands: a deadline that moves later (the
    /// write-stall clock on every write of a long transfer, the next ping
    /// on every read) costs nothing until the entry fires early, and the
    /// session then arms again from where its deadline has got to.
    fn arm(&mut self, at: Ms, now: Ms) {
        if self.armed <= now {
            // Fired (or about to be, by the driver): no longer ours to move.
            self.armed = NEVER;
        }
        if at < self.armed {
            self.info.timers().rearm(&self.info, self.armed, at);
            self.armed = at;
        }
    }

    /// Takes this session's entry out of the shared timers.
    fn disarm(&mut self) {
        if self.armed != NEVER {
            self.info.timers().rearm(&self.info, self.armed, NEVER);
            self.armed = NEVER;
        }
    }

    fn can_read_client(&self) -> bool {
        if !self.client.readable() {
            return false;
        }
        if self.client.draining() {
            return true;
        }
        match &self.mode {
            Mode::Proxy(p) => p.up.out.len() < self.t.max_out || p.up.broken,
            // A paused compressed message is resumed, not read past.
            Mode::Echo(e) => self.client.out.len() < self.t.max_out && !e.paused(),
        }
    }

    /// Echo mode: a compressed message paused for the client's side goes
    /// on once little waits for it. True if it did.
    fn resume_echo(&mut self, now: Ms, cx: &mut Context<'_>) -> bool {
        let Mode::Echo(e) = &self.mode else { return false };
        // A draining client's bytes are dropped unparsed: nothing to resume
        // (and resuming would not clear the pause).
        if !e.paused()
            || self.client.out.len() >= SCRATCH_BYTES
            || !self.client.readable()
            || self.client.draining()
        {
            return false;
        }
        self.client_bytes(&[], now, Some(cx));
        true
    }

    fn can_read_up(&self) -> bool {
        match &self.mode {
            Mode::Proxy(p) => {
                p.up.readable()
                    && (p.up.draining() || self.client.out.len() < self.t.max_out || self.client.broken)
            }
            Mode::Echo(_) => false,
        }
    }

    /// The earliest deadline and what fires there, in table order so a
    /// tie goes to the rule listed first.
    fn next_deadline(&mut self, now: Ms) -> (Ms, Fire) {
        if self.closing_until != NEVER {
            let mut at = self.closing_until;
            for d in [self.client.drain_until, self.up().map_or(NEVER, |u| u.drain_until)] {
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
            if self.ping_sent != NEVER {
                self.ping_sent = now;
            }
        }
        let t = &self.t;
        let wt = u64::from(t.write_timeout);
        let after = |at: Ms, d: u32| at.saturating_add(u64::from(d));
        let deadlines = [
            (
                if self.ping_sent != NEVER && reading {
                    after(self.ping_sent, t.pong_timeout)
                } else {
                    NEVER
                },
                Fire::End(CloseReason::PongTimeout),
            ),
            (
                if t.idle_timeout > 0 { after(self.last_data, t.idle_timeout) } else { NEVER },
                Fire::End(CloseReason::Idle),
            ),
            (t.expires, Fire::End(CloseReason::TokenExpired)),
            (
                if self.client.pending() { self.client.progress.saturating_add(wt) } else { NEVER },
                Fire::End(CloseReason::SlowReader),
            ),
            (
                self.up().filter(|u| u.pending()).map_or(NEVER, |u| u.progress.saturating_add(wt)),
                Fire::End(CloseReason::UpstreamStalled),
            ),
            (t.lifetime, Fire::End(CloseReason::MaxLifetime)),
            (if self.ping_sent == NEVER && !self.ping_due { self.next_ping } else { NEVER }, Fire::Ping),
        ];
        let mut first = (NEVER, Fire::Ping);
        for (at, fire) in deadlines {
            // Strictly earlier: on a tie the rule listed first stays.
            if at < first.0 {
                first = (at, fire);
            }
        }
        first
    }

    fn up(&self) -> Option<&Side<BackendIo>> {
        match &self.mode {
            Mode::Proxy(p) => Some(&p.up),
            Mode::Echo(_) => None,
        }
    }

    fn on_timer(&mut self, fire: Fire, now: Ms) {
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
                if self.closing_until == NEVER || now < self.closing_until {
                    return;
                }
                // The backend never answered the client's close: answer it
                // ourselves, once, briefly.
                if self.client.got_close && !self.client.sent_close && self.toward_client_at_boundary() {
                    self.client.push(&frame::close(None, "", None), now);
                    self.client.sent_close = true;
                    self.client.wait_reply = false;
                    if let Mode::Proxy(p) = &mut self.mode {
                        p.up.broken = true;
                    }
                    self.closing_until = now + BEST_EFFORT_TIMEOUT;
                    return;
                }
                self.closing_until = now;
                self.client.broken = true;
                if let Mode::Proxy(p) = &mut self.mode {
                    p.up.broken = true;
                }
            }
        }
    }

    fn finished(&self, now: Ms) -> bool {
        if self.reason.is_none() {
            return false;
        }
        self.client.done(now) && self.up().is_none_or(|u| u.done(now))
    }

    fn toward_client_at_boundary(&self) -> bool {
        match &self.mode {
            Mode::Proxy(p) => p.from_up.at_boundary(),
            Mode::Echo(echo) => echo.at_boundary(),
        }
    }

    /// Sends the gateway's ping when the stream toward the client is
    /// between frames.
    fn maybe_ping(&mut self, now: Ms) {
        if !self.ping_due || self.reason.is_some() || !self.toward_client_at_boundary() {
            return;
        }
        let f = frame::control(PING, &self.info.id.to_be_bytes(), None);
        self.client.push(&f, now);
        self.ping_due = false;
        self.ping_sent = now;
    }

    /// The first rule fired: say goodbye to each side as `reason` wants and
    /// start closing. Later rules are ignored.
    fn begin_close(&mut self, reason: CloseReason, to_client: Goodbye, to_up: Goodbye, now: Ms) {
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
        self.closing_until = now + wait;
        let client_boundary = self.toward_client_at_boundary();
        goodbye(&mut self.client, to_client, client_boundary, None, now);
        if let Mode::Proxy(p) = &mut self.mode {
            if reason == CloseReason::UpstreamLost {
                p.up.eof = true;
                p.up.broken = true;
            }
            let mask = rand::random::<[u8; 4]>();
            let boundary = p.from_client.at_boundary();
            goodbye(&mut p.up, to_up, boundary, Some(mask), now);
        }
    }

    /// Reads and writes whatever is ready. `Ready` after any progress (the
    /// caller re-evaluates its deadlines), `Pending` once nothing moves.
    fn poll_io(&mut self, cx: &mut Context<'_>, now: Ms, parked: &mut Parked) -> Poll<()> {
        let mut moved = self.poll_writes(cx, now);
        if self.resume_echo(now, cx) {
            self.poll_writes(cx, now);
            moved = true;
        }
        let read = SCRATCH.with(|cell| {
            // Not re-entered: nothing below reads a socket through it.
            let Ok(mut scratch) = cell.try_borrow_mut() else { return false };
            let buf = scratch.buf();
            let mut read = false;
            if !parked.client && self.can_read_client() {
                match poll_read(&mut self.client.io, cx, buf) {
                    Poll::Ready(Some(n)) => {
                        self.client_bytes(&buf[..n], now, Some(cx));
                        read = true;
                    }
                    Poll::Ready(None) => {
                        self.client.eof = true;
                        self.client_gone(now);
                        read = true;
                    }
                    Poll::Pending => parked.client = true,
                }
            }
            if !parked.up && self.can_read_up() {
                let Mode::Proxy(p) = &mut self.mode else { return read };
                match poll_read(&mut p.up.io, cx, buf) {
                    Poll::Ready(Some(n)) => {
                        self.up_bytes(&buf[..n], now, Some(cx));
                        read = true;
                    }
                    Poll::Ready(None) => {
                        p.up.eof = true;
                        self.up_gone(now);
                        read = true;
                    }
                    Poll::Pending => parked.up = true,
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
    fn poll_writes(&mut self, cx: &mut Context<'_>, now: Ms) -> bool {
        let mut moved = false;
        if self.client.pending() && !self.client.broken {
            moved |= self.client.poll_out(cx, now);
            if self.client.broken {
                moved = true;
                self.client_gone(now);
            }
        }
        if let Mode::Proxy(p) = &mut self.mode {
            if p.up.pending() && !p.up.broken {
                moved |= p.up.poll_out(cx, now);
                if p.up.broken {
                    moved = true;
                    self.up_gone(now);
                }
            }
        }
        moved
    }

    /// The client's socket ended (EOF, read or write error).
    fn client_gone(&mut self, now: Ms) {
        self.client.eof = true;
        self.client.sent_close = true;
        if self.reason.is_none() {
            // Tell the backend, with no code: the client gave none.
            self.begin_close(CloseReason::ClientClose, Goodbye::Nothing, Goodbye::Close(None, ""), now);
        } else if let Mode::Proxy(p) = &mut self.mode {
            // Closing and the client left: nobody to relay the backend's reply to.
            if !p.up.sent_close {
                p.up.wait_reply = false;
                p.up.sent_close = true;
            }
        }
    }

    /// The backend's socket ended.
    fn up_gone(&mut self, now: Ms) {
        if let Mode::Proxy(p) = &mut self.mode {
            p.up.eof = true;
            p.up.sent_close = true;
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
    /// With `cx`, relayed bytes are written at once where they can be.
    /// Empty `data`: echo mode resumes a paused compressed message.
    fn client_bytes(&mut self, data: &[u8], now: Ms, mut cx: Option<&mut Context<'_>>) {
        // Any byte proves the client alive.
        if !data.is_empty() {
            self.ping_sent = NEVER;
            if self.next_ping <= now {
                self.next_ping = now + u64::from(self.t.ping_interval);
            }
            self.info.touch(now);
        }
        if self.client.draining() {
            return;
        }
        let open = self.reason.is_none();
        let mut ended: Option<(CloseReason, Goodbye, Goodbye)> = None;
        let client = &mut self.client;
        let rate = &mut self.rate;
        let per_s = self.t.msgs_per_s;
        let metrics = &self.metrics;
        let last_data = &mut self.last_data;
        match &mut self.mode {
            Mode::Proxy(p) => {
                let Proxy { up, from_client, .. } = &mut **p;
                let ours = self.info.id.to_be_bytes();
                let mut through = Through::new(data);
                let r = from_client.feed(data, &mut |e| match e {
                    Event::MessageStart => {
                        if open && !rate.allow(per_s, now) {
                            ended = Some(gateway_close(CloseReason::MsgRate));
                            return false;
                        }
                        true
                    }
                    Event::Forward(b) => {
                        if !up.sent_close {
                            through.add(up, b, cx.as_deref_mut(), now);
                        }
                        true
                    }
                    Event::Control { opcode: PONG, payload, .. } if payload == ours => true,
                    Event::Control { opcode: CLOSE, raw, .. } => {
                        client.got_close = true;
                        if !up.sent_close {
                            through.add(up, raw, cx.as_deref_mut(), now);
                            up.sent_close = true;
                        }
                        if open {
                            ended = Some((CloseReason::ClientClose, Goodbye::Keep, Goodbye::Keep));
                        }
                        false
                    }
                    Event::Control { raw, .. } => {
                        if !up.sent_close {
                            through.add(up, raw, cx.as_deref_mut(), now);
                        }
                        true
                    }
                    Event::MessageEnd(n) => {
                        metrics.relayed(Direction::ClientToUpstream, n as usize);
                        *last_data = now;
                        true
                    }
                });
                // Before any frame of the gateway's own (a refusal's close).
                through.flush(up, cx, now);
                if let Err(refusal) = r {
                    client.drain_until = now + DRAIN_GRACE;
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
                let resume = data.is_empty() && echo.paused();
                let mut on = |a: Action<'_>| match a {
                    Action::MessageStart => {
                        if open && !rate.allow(per_s, now) {
                            ended = Some(gateway_close(CloseReason::MsgRate));
                            return false;
                        }
                        true
                    }
                    Action::Send(b) => {
                        if !client.sent_close {
                            if b.len() >= WRITE_AT_ONCE {
                                client.send(b, cx.as_deref_mut(), now);
                            } else {
                                // Small answers of one read leave in one write.
                                client.push(b, now);
                            }
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
                    // Inflating goes on while little waits for the client.
                    Action::Room => client.out.len() < SCRATCH_BYTES,
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
                };
                let r = if resume { echo.resume(&mut on) } else { echo.feed(data, &mut on) };
                if let Err(refusal) = r {
                    client.drain_until = now + DRAIN_GRACE;
                    let g = |code, text| Goodbye::Close(Some(code), text);
                    ended = Some(match refusal {
                        echo::Refusal::TooBig => gateway_close(CloseReason::MessageTooBig),
                        echo::Refusal::InvalidUtf8 => {
                            (CloseReason::Error, g(1007, "invalid_utf8"), Goodbye::Nothing)
                        }
                        echo::Refusal::BadDeflate => {
                            (CloseReason::Error, g(1007, "invalid_deflate"), Goodbye::Nothing)
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
    fn up_bytes(&mut self, data: &[u8], now: Ms, mut cx: Option<&mut Context<'_>>) {
        let open = self.reason.is_none();
        let mut ended: Option<(CloseReason, Goodbye, Goodbye)> = None;
        let client = &mut self.client;
        let metrics = &self.metrics;
        let last_data = &mut self.last_data;
        let Mode::Proxy(p) = &mut self.mode else { return };
        let Proxy { up, from_up, .. } = &mut **p;
        if up.draining() {
            return;
        }
        let mut through = Through::new(data);
        let r = from_up.feed(data, &mut |e| match e {
            Event::MessageStart => true,
            Event::Forward(b) => {
                if !client.sent_close {
                    through.add(client, b, cx.as_deref_mut(), now);
                }
                true
            }
            Event::Control { opcode: CLOSE, raw, .. } => {
                up.got_close = true;
                if !client.sent_close {
                    through.add(client, raw, cx.as_deref_mut(), now);
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
                    through.add(client, raw, cx.as_deref_mut(), now);
                }
                true
            }
            Event::MessageEnd(n) => {
                metrics.relayed(Direction::UpstreamToClient, n as usize);
                *last_data = now;
                true
            }
        });
        through.flush(client, cx, now);
        if let Err(refusal) = r {
            up.drain_until = now + DRAIN_GRACE;
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
fn goodbye<S>(side: &mut Side<S>, g: Goodbye, at_boundary: bool, mask: Option<[u8; 4]>, now: Ms) {
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

/// Which sides' reads are known to be waiting for the socket, within one wake.
#[derive(Default)]
struct Parked {
    client: bool,
    up: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnUserCap;
    use registry::Registry;
    use tokio::net::TcpStream;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// The read buffers start 64 bytes into a page, whatever the allocator
    /// hands out, and are as long as asked.
    #[test]
    fn off_page_buffers_start_off_a_page_boundary() {
        for len in [1, 4096, SCRATCH_BYTES, SCRATCH_BYTES + 14] {
            let mut b = OffPage::new(len);
            let buf = b.buf();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % 4096, 64);
        }
    }

    /// A relayed read is written straight from the read buffer while
    /// nothing waits, and queued behind what does: the bytes arrive whole
    /// and in order either way.
    #[tokio::test]
    async fn relayed_pieces_are_written_at_once_or_queued_in_order() {
        use tokio::io::AsyncReadExt;
        // 64 bytes of room: the first write is partial, the rest must queue.
        let (a, mut b) = tokio::io::duplex(64);
        let mut side = Side::new(a);
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let elsewhere = b"a split header, held by the filter".to_vec();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut t = Through::new(&data);
        t.add(&mut side, &data[..10], Some(&mut cx), 0);
        t.add(&mut side, &data[10..100], Some(&mut cx), 0);
        assert_eq!(side.out.len(), 0, "adjacent pieces are gathered, not yet sent");
        t.add(&mut side, &elsewhere, Some(&mut cx), 0);
        assert_eq!(side.out.len(), 100 - 64 + elsewhere.len(), "64 bytes went straight to the socket");
        // A gap (a consumed pong) starts a new run.
        t.add(&mut side, &data[200..], Some(&mut cx), 0);
        t.flush(&mut side, Some(&mut cx), 0);
        let mut want = data[..100].to_vec();
        want.extend_from_slice(&elsewhere);
        want.extend_from_slice(&data[200..]);
        assert_eq!(side.out.len(), want.len() - 64);
        let mut got = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while got.len() < want.len() {
                side.poll_out(&mut cx, 0);
                let mut buf = [0u8; 128];
                let n = b.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(drained.is_ok(), "bytes lost: {} of {}", got.len(), want.len());
        assert_eq!(got, want);
        assert_eq!(side.out.buf.capacity(), 0, "the outbox is freed once drained");
    }

    /// The session future is what an idle connection keeps besides its
    /// task and sockets (BENCHMARKS.md, "Memory per connection"): 928 bytes
    /// before it was made compact, about 300 since. A field added without
    /// thought shows here first.
    #[tokio::test]
    async fn an_idle_sessions_state_stays_small() {
        let metrics = Arc::new(Metrics::new());
        let reg = Registry::new(metrics.clone());
        let slot = reg.register("u", "127.0.0.1".parse().unwrap(), None, None, 8, OnUserCap::Reject).unwrap();
        let params = || Params {
            info: slot.info.clone(),
            expires_at: None,
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            metrics: metrics.clone(),
            deflate: false,
        };
        let (a, _b) = pair().await;
        let echo = run(Client { io: a, rest: Vec::new() }, None, params());
        let (c, _d) = pair().await;
        let (e, _f) = pair().await;
        let up = Backend {
            io: BackendIo::Plain(c),
            rest: Box::default(),
            protocol: None,
            extensions: None,
            deflate: false,
            lease: None,
        };
        let proxy = run(Client { io: e, rest: Vec::new() }, Some(up), params());
        assert!(std::mem::size_of_val(&echo) <= 320, "{}", std::mem::size_of_val(&echo));
        assert_eq!(std::mem::size_of_val(&echo), std::mem::size_of_val(&proxy));
        // The proxy half is boxed: an echo session does not carry it.
        assert!(std::mem::size_of::<Mode>() <= std::mem::size_of::<Echo>() + 8);
    }
}
