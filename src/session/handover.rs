//! The hook a binary upgrade uses to move a live session to the new
//! process (the orchestration is `crate::upgrade`'s; this is only what the
//! session itself must take part in).
//!
//! The upgrade asks a session to pause ([`ConnInfo::ask_pause`]). At its
//! next poll, before touching a socket, the session writes its whole state
//! into a [`SessionState`] (plain data: no pointers, no clock but the
//! shared timers' milliseconds), hands it to its registry's [`Handover`]
//! with its descriptors, and then does nothing until told either way:
//! `resume` (the upgrade failed: it goes on exactly where it stopped, since
//! nothing touched its sockets meanwhile) or `moved` (the new process has
//! it: the session ends without a byte or a count, and its task drops its
//! copies of the descriptors, which the new process holds too).
//!
//! Nothing is waited for: a frame half relayed is recorded as such (the
//! filters' own state), so a paused session is paused at the byte it had
//! reached. Sessions whose transport cannot move (TLS: rustls's state is
//! in this process, and this kernel has no kTLS to hold it) answer with no
//! state and carry on; they stay with the old process.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::echo::EchoState;
use super::registry::ConnInfo;
use super::timer::Ms;
use crate::relay::FilterState;

/// Pause states of a connection ([`ConnInfo`]'s `pause`).
pub(crate) const NONE: u8 = 0;
pub(crate) const ASKED: u8 = 1;
pub(crate) const PAUSED: u8 = 2;
pub(crate) const RESUME: u8 = 3;
pub(crate) const MOVED: u8 = 4;

/// A client transport the upgrade can move: a plain TCP socket, by its
/// descriptor. Anything else stays (the default).
pub trait Movable {
    fn movable_fd(&self) -> Option<RawFd> {
        None
    }
}

impl Movable for TcpStream {
    fn movable_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

impl Movable for Box<tokio_rustls::server::TlsStream<TcpStream>> {}

/// One socket's side of a session, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SideState {
    /// Bytes queued toward it, not yet written: the new process writes them first.
    pub out: Vec<u8>,
    pub progress: Ms,
    pub drain_until: Ms,
    pub eof: bool,
    pub broken: bool,
    pub got_close: bool,
    pub sent_close: bool,
    pub wait_reply: bool,
}

/// Echo endpoint or proxy relay, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModeState {
    Echo(EchoState),
    /// `backend`: the URL as configured of the backend it counts against
    /// (empty for none), so the new process counts it there too.
    Proxy {
        up: SideState,
        from_client: FilterState,
        from_up: FilterState,
        backend: String,
    },
}

/// Everything a session is, besides its sockets. Times are the shared
/// timers' milliseconds: the new process sets its clock's epoch to the old
/// one's, so every deadline stays where it was in absolute time.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionState {
    // The connection, as the registry knows it.
    pub id: u64,
    pub sub: String,
    pub ip: IpAddr,
    pub since: u64,
    pub jti: Option<String>,
    pub iat: Option<u64>,
    pub last_seen: Ms,
    // The limits it was admitted under (kept: a new configuration applies
    // to new connections, as SIGHUP's does).
    pub ping_interval: u32,
    pub pong_timeout: u32,
    pub idle_timeout: u32,
    pub write_timeout: u32,
    pub max_out: u64,
    pub expires: Ms,
    pub lifetime: Ms,
    pub msgs_per_s: f64,
    // Where its loop stands.
    /// Index in `CloseReason::ALL` once closing.
    pub reason: Option<u8>,
    pub closing_until: Ms,
    pub next_ping: Ms,
    pub ping_sent: Ms,
    pub ping_due: bool,
    pub client_paused: bool,
    pub last_data: Ms,
    pub rate_tokens: f64,
    pub rate_at: Ms,
    pub client: SideState,
    pub mode: ModeState,
}

/// A paused session's answer: its state and descriptors, or `None` for
/// one that cannot move (and goes on in this process).
pub struct Parked {
    pub info: Arc<ConnInfo>,
    pub state: Option<Box<SessionState>>,
    pub client_fd: RawFd,
    pub up_fd: Option<RawFd>,
}

/// Where paused sessions leave their state for the upgrade (one per
/// registry). Empty and unused outside an upgrade.
#[derive(Default)]
pub struct Handover {
    parked: Mutex<Vec<Parked>>,
    notify: Notify,
}

impl Handover {
    /// Takes the answers delivered so far.
    pub fn take(&self) -> Vec<Parked> {
        std::mem::take(&mut *self.lock())
    }

    /// Resolves after the next delivery (or at once if one came meanwhile).
    pub async fn delivered(&self) {
        self.notify.notified().await;
    }

    pub(super) fn deliver(&self, p: Parked) {
        self.lock().push(p);
        self.notify.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        // A push or a take cannot panic half way: the list is whole.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use std::future::Future;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite};

use super::echo::Echo;
use super::{Mode, MsgRate, Outbox, Proxy, Session, Side, Tuning};
use crate::metrics::Metrics;
use crate::reject::CloseReason;
use crate::relay::Filter;

impl<C: AsyncRead + AsyncWrite + Unpin + Movable> Session<C> {
    /// The pause hook, at the top of every poll: `Some` answers the poll
    /// (paused: `Pending`; moved: `Ready`), `None` goes on.
    pub(super) fn pause_point(&mut self) -> Option<Poll<CloseReason>> {
        match self.info.pause_state() {
            NONE => None,
            PAUSED => Some(Poll::Pending),
            RESUME => {
                self.info.set_pause(NONE);
                None
            }
            MOVED => {
                // Its deadline entry goes; its sockets close with the task
                // (this process's copies only). The reason is not counted:
                // the caller sees `moved()`.
                self.disarm();
                Some(Poll::Ready(CloseReason::Drain))
            }
            _ => {
                let client_fd = self.client.io.movable_fd();
                // An echo half-way through inflating a compressed message
                // cannot move either (the inflater's window is not plain
                // data); it stays, as a TLS session does.
                let up_fd = match &self.mode {
                    Mode::Proxy(p) => p.up.io.plain_fd(),
                    Mode::Echo(_) => None,
                };
                let state = client_fd.filter(|_| self.can_move()).map(|_| Box::new(self.snapshot()));
                let movable = state.is_some();
                // Paused before the upgrade can see the answer, so its
                // verdict always finds the session waiting for it.
                self.info.set_pause(if movable { PAUSED } else { NONE });
                let parked =
                    Parked { info: self.info.clone(), state, client_fd: client_fd.unwrap_or(-1), up_fd };
                self.info.handover().deliver(parked);
                movable.then_some(Poll::Pending)
            }
        }
    }

    /// The whole session as plain data.
    /// Whether its state is all plain data now.
    fn can_move(&self) -> bool {
        match &self.mode {
            Mode::Echo(e) => e.movable(),
            // A wss:// backend's TLS state is not plain data either.
            Mode::Proxy(p) => p.up.io.plain_fd().is_some(),
        }
    }

    fn snapshot(&self) -> SessionState {
        let t = &self.t;
        SessionState {
            id: self.info.id,
            sub: self.info.sub.to_string(),
            ip: self.info.ip,
            since: self.info.since,
            jti: self.info.jti.clone(),
            iat: self.info.iat,
            last_seen: self.info.last_seen_ms(),
            ping_interval: t.ping_interval,
            pong_timeout: t.pong_timeout,
            idle_timeout: t.idle_timeout,
            write_timeout: t.write_timeout,
            max_out: t.max_out as u64,
            expires: t.expires,
            lifetime: t.lifetime,
            msgs_per_s: t.msgs_per_s,
            reason: self.reason.and_then(|r| CloseReason::ALL.iter().position(|x| *x == r)).map(|i| i as u8),
            closing_until: self.closing_until,
            next_ping: self.next_ping,
            ping_sent: self.ping_sent,
            ping_due: self.ping_due,
            client_paused: self.client_paused,
            last_data: self.last_data,
            rate_tokens: self.rate.tokens,
            rate_at: self.rate.at,
            client: side_state(&self.client),
            mode: match &self.mode {
                Mode::Echo(e) => ModeState::Echo(e.snapshot()),
                Mode::Proxy(p) => ModeState::Proxy {
                    up: side_state(&p.up),
                    from_client: p.from_client.snapshot(),
                    from_up: p.from_up.snapshot(),
                    backend: p._lease.as_ref().map(|l| l.url().to_string()).unwrap_or_default(),
                },
            },
        }
    }
}

fn side_state<S>(s: &Side<S>) -> SideState {
    SideState {
        out: s.out.buf[s.out.head..].to_vec(),
        progress: s.progress,
        drain_until: s.drain_until,
        eof: s.eof,
        broken: s.broken,
        got_close: s.got_close,
        sent_close: s.sent_close,
        wait_reply: s.wait_reply,
    }
}

fn side_from<S>(io: S, s: SideState) -> Side<S> {
    let mut side = Side::new(io);
    side.out = Outbox { buf: s.out, head: 0 };
    side.progress = s.progress;
    side.drain_until = s.drain_until;
    side.eof = s.eof;
    side.broken = s.broken;
    side.got_close = s.got_close;
    side.sent_close = s.sent_close;
    side.wait_reply = s.wait_reply;
    side
}

/// Whether `s` could have come from a session (checked before anything
/// of a hand-over is applied): the filters' and the endpoint's states,
/// the close reason, and the mode matching the descriptors that came with it.
pub fn check(s: &SessionState, has_up: bool) -> Result<(), &'static str> {
    if s.reason.is_some_and(|i| usize::from(i) >= CloseReason::ALL.len()) {
        return Err("close reason out of range");
    }
    if !(s.msgs_per_s.is_finite() && s.rate_tokens.is_finite()) {
        return Err("message rate not a number");
    }
    match &s.mode {
        ModeState::Echo(e) => {
            if has_up {
                return Err("echo session with a backend socket");
            }
            Echo::restore(e.clone()).ok_or("echo state")?;
        }
        ModeState::Proxy { from_client, from_up, .. } => {
            if !has_up {
                return Err("proxy session without its backend socket");
            }
            Filter::restore(from_client.clone()).ok_or("client filter state")?;
            Filter::restore(from_up.clone()).ok_or("backend filter state")?;
        }
    }
    Ok(())
}

/// A session moved here by a binary upgrade, continued from `state` (which
/// [`check`] passed) on its sockets. `info` is its registry entry
/// (`Registry::restore`).
pub fn resume(
    state: SessionState,
    client: TcpStream,
    up: Option<TcpStream>,
    info: Arc<ConnInfo>,
    metrics: Arc<Metrics>,
    lease: Option<crate::upstream::pool::Lease>,
) -> Result<impl Future<Output = CloseReason> + Send, &'static str> {
    check(&state, up.is_some())?;
    let mode = match (state.mode, up) {
        (ModeState::Echo(e), None) => Mode::Echo(Echo::restore(e).ok_or("echo state")?),
        (ModeState::Proxy { up: us, from_client, from_up, .. }, Some(io)) => Mode::Proxy(Box::new(Proxy {
            up: side_from(crate::upstream::BackendIo::Plain(io), us),
            from_client: Filter::restore(from_client).ok_or("client filter state")?,
            from_up: Filter::restore(from_up).ok_or("backend filter state")?,
            _lease: lease,
        })),
        _ => return Err("mode and descriptors disagree"),
    };
    let reason = state.reason.and_then(|i| CloseReason::ALL.get(usize::from(i)).copied());
    let mut s = Session {
        client: side_from(client, state.client),
        mode,
        info,
        metrics,
        t: Tuning {
            ping_interval: state.ping_interval,
            pong_timeout: state.pong_timeout,
            idle_timeout: state.idle_timeout,
            write_timeout: state.write_timeout,
            max_out: usize::try_from(state.max_out).unwrap_or(usize::MAX),
            expires: state.expires,
            lifetime: state.lifetime,
            msgs_per_s: state.msgs_per_s,
        },
        armed: super::timer::NEVER,
        reason,
        closing_until: state.closing_until,
        next_ping: state.next_ping,
        ping_sent: state.ping_sent,
        ping_due: state.ping_due,
        client_paused: state.client_paused,
        last_data: state.last_data,
        rate: MsgRate { tokens: state.rate_tokens, at: state.rate_at },
    };
    Ok(std::future::poll_fn(move |cx| s.poll(cx)))
}
