//! The binary upgraded with every live connection kept (SIGUSR2, or
//! `POST /admin/upgrade`).
//!
//! The old process starts the binary at the path it was started from, with
//! the same arguments (so the configuration file is read as it is now),
//! and a `SOCK_SEQPACKET` socket inherited as `PORTCULLIS_UPGRADE_FD`.
//! Over it, in order:
//!
//! ```text
//! old → new  PREAMBLE  format version, session clock, instance  + listener fds
//! new → old  HELLO     built its gateway on them (config, keys, store)
//!            (old pauses every session: `session::handover`)
//! old → new  FDS …     socket descriptors, ≤ 253 per message
//! old → new  DATA … END   the state stream (`state`)
//! new → old  READY     every session checked and rebuilt, none running
//! old → new  COMMIT    kicks that landed on paused sessions meanwhile
//! new → old  COMMITTED — then, and only then, it touches a socket
//! ```
//!
//! Until COMMITTED the old process still owns everything: its sessions are
//! paused, not gone, and their sockets untouched. Any failure before it
//! (the new process does not start, exits, refuses the format, says nothing
//! within `listen.upgrade_timeout_s`, or is killed mid-transfer) kills the
//! new process and resumes every paused session where it stopped. After
//! it, the old process's sessions end without a byte, its listeners stop,
//! and it drains what could not move (TLS) and exits.
//!
//! The new process answers COMMITTED before any I/O, so a COMMITTED that
//! never arrives means no socket was touched. (One that arrives after the
//! old process gave up on it would be late by the deadline; the old
//! process kills the new one before resuming, so at worst the sessions it
//! had begun are lost, never duplicated silently.)
//!
//! Accepting never stops: the listeners are the same sockets in both
//! processes, so a connection waits in the kernel's queue for whichever
//! accepts it.

pub mod fdpass;
pub mod notify;
pub mod state;

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fdpass::{Channel, MAX_FDS, MAX_MESSAGE};
use state::{Moved, Preamble, StateError, VERSION};

use crate::admit::IpKey;
use crate::client_addr::is_trusted;
use crate::reject::CloseReason;
use crate::session::handover::{self, Parked};
use crate::session::registry::ConnInfo;
use crate::shared::{Shared, UpgradeRefused};

/// The variable naming the inherited hand-over socket.
pub const FD_ENV: &str = "PORTCULLIS_UPGRADE_FD";
/// Fault injection for the test suite only: `kill-after-state` makes the
/// new process kill itself (SIGKILL) once the state has arrived, the
/// middle of a transfer; `newer-format` makes the old process claim the
/// next format version, as a newer binary would. Ignored unless it names
/// a known fault.
pub const FAULT_ENV: &str = "PORTCULLIS_UPGRADE_FAULT";

const PREAMBLE: u8 = b'P';
const HELLO: u8 = b'H';
const FDS: u8 = b'F';
const DATA: u8 = b'D';
const END: u8 = b'E';
const READY: u8 = b'R';
const COMMIT: u8 = b'C';
const COMMITTED: u8 = b'K';
const REFUSED: u8 = b'X';
const QUIT: u8 = b'Q';

/// How long paused sessions may take to answer (each answers at its next
/// poll, at once; this bounds a runtime too busy to poll them).
const PAUSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("starting {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hand-over socket: {0}")]
    Channel(#[from] std::io::Error),
    #[error("the new process exited before taking over")]
    Exited,
    #[error("the new process refused: {0}")]
    Refused(String),
    #[error("not taken over within listen.upgrade_timeout_s ({0} s)")]
    Timeout(u64),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("hand-over protocol: {0}")]
    Protocol(&'static str),
}

/// How this process was started, to start its successor the same way.
#[derive(Clone, Debug)]
pub struct Launch {
    /// By path, not by `/proc/self/exe`: a package upgrade that replaced
    /// the file is picked up (the running image's inode is the old one).
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Launch {
    /// Read at start, before anything can change the working directory:
    /// `argv[0]` when it is a path (made absolute), else the executable
    /// as resolved now.
    pub fn from_start() -> std::io::Result<Launch> {
        let mut argv = std::env::args_os();
        let arg0 = argv.next().map(PathBuf::from).unwrap_or_default();
        let exe = if arg0.components().count() > 1 {
            std::env::current_dir()?.join(arg0)
        } else {
            std::env::current_exe()?
        };
        Ok(Launch { exe, args: argv.collect() })
    }
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(1 + body.len());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// One message before `deadline`: its kind and body. The other side's
/// exit is [`UpgradeError::Exited`]; its refusal, [`UpgradeError::Refused`].
fn recv(
    ch: &Channel,
    deadline: Instant,
    timeout_s: u64,
    fds: &mut Vec<OwnedFd>,
) -> Result<(u8, Vec<u8>), UpgradeError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(UpgradeError::Timeout(timeout_s));
    }
    ch.set_timeout(Some(left))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let n = match ch.recv(&mut buf, fds) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(UpgradeError::Timeout(timeout_s)),
        Err(e) => return Err(e.into()),
    };
    if n == 0 {
        return Err(UpgradeError::Exited);
    }
    buf.truncate(n);
    let kind = buf.remove(0);
    if kind == REFUSED {
        return Err(UpgradeError::Refused(String::from_utf8_lossy(&buf).into_owned()));
    }
    Ok((kind, buf))
}

fn expect(got: (u8, Vec<u8>), kind: u8, what: &'static str) -> Result<Vec<u8>, UpgradeError> {
    if got.0 == kind {
        Ok(got.1)
    } else {
        Err(UpgradeError::Protocol(what))
    }
}

/// Runs in blocking code: the hand-over is a handful of system calls per
/// batch, and blocking threads keep it off the runtime's workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UpgradeError> + Send + 'static,
) -> Result<T, UpgradeError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| UpgradeError::Protocol("hand-over task failed"))?
}

// ---------------------------------------------------------------- old side

/// The old process's upgrader: waits for requests and runs them one at a
/// time, until one commits.
pub async fn serve(shared: Arc<Shared>, launch: Launch, listeners: (RawFd, RawFd)) {
    shared.upgrade.set_available();
    loop {
        shared.upgrade.requested().await;
        if let Some((ch, asked)) = upgrade_once(&shared, &launch, listeners).await {
            // This process stops accepting; connections still on their way
            // to a session here follow in late rounds; then the drain.
            shared.upgrade.commit();
            late_rounds(&shared, &ch, asked).await;
            let _ = ch.send(&[QUIT], &[]);
            shared.upgrade.settle();
            return;
        }
        shared.upgrade.finished();
    }
}

/// Asks for an upgrade (SIGUSR2, `POST /admin/upgrade`); a refusal is logged.
pub fn request(shared: &Shared, from: &'static str) -> Result<(), UpgradeRefused> {
    let r = if shared.draining.load(std::sync::atomic::Ordering::Acquire) {
        Err(UpgradeRefused::Draining)
    } else {
        shared.upgrade.request()
    };
    match r {
        Ok(()) => tracing::info!(event = "upgrade_requested", from, "binary upgrade requested"),
        Err(UpgradeRefused::Running) => {
            tracing::warn!(
                event = "upgrade_refused",
                from,
                reason = "running",
                "upgrade refused: one is already running"
            )
        }
        Err(UpgradeRefused::Draining) => tracing::warn!(
            event = "upgrade_refused",
            from,
            reason = "draining",
            "upgrade refused: the gateway is shutting down"
        ),
        Err(UpgradeRefused::Unavailable) => tracing::warn!(
            event = "upgrade_refused",
            from,
            reason = "unavailable",
            "upgrade refused: this process was not started by the portcullis binary's serve"
        ),
    }
    r
}

/// The sessions of one round: those paused (to move) and how many
/// answered that they cannot move.
#[derive(Default)]
struct Round {
    /// When the sessions were asked to pause: the pause each saw ends at the commit.
    asked_at: Option<Instant>,
    asked: Vec<Arc<ConnInfo>>,
    parked: Vec<Parked>,
    stayed: usize,
}

impl Round {
    /// On any failure: every session asked goes on where it stopped.
    fn resume(&self, shared: &Shared) {
        for c in &self.asked {
            c.resume();
        }
        drop(shared.registry.handover.take());
    }
}

/// Runs one upgrade; once it committed, the channel to the new process and
/// the connections it asked (moved, or staying).
async fn upgrade_once(
    shared: &Arc<Shared>,
    launch: &Launch,
    listeners: (RawFd, RawFd),
) -> Option<(Arc<Channel>, std::collections::HashSet<u64>)> {
    let started = Instant::now();
    let timeout_s = shared.config.load().listen.upgrade_timeout_s;
    let deadline = started + Duration::from_secs(timeout_s);
    let mut round = Round::default();
    let mut child = None;
    let result = attempt(shared, launch, listeners, deadline, timeout_s, &mut child, &mut round).await;
    let ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(ch) => {
            let paused_ms = round.asked_at.map_or(0, |t| t.elapsed().as_millis() as u64);
            // Their sessions end without a byte: the new process has them.
            for p in &round.parked {
                p.info.moved_away();
            }
            shared.metrics.upgrade(true);
            tracing::info!(
                event = "upgrade",
                result = "ok",
                moved = round.parked.len(),
                stayed = round.stayed,
                ms,
                paused_ms,
                pid = child.as_ref().map(|c: &std::process::Child| c.id()),
                "binary upgraded: the new process has the listeners and the moved connections"
            );
            Some((ch, round.asked.iter().map(|c| c.id).collect()))
        }
        Err(e) => {
            // A write to a process that is gone is that process's exit.
            let e = match e {
                UpgradeError::Channel(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                    UpgradeError::Exited
                }
                e => e,
            };
            let mut status = None;
            if let Some(mut c) = child {
                // Dead before anything resumes: it can touch no socket after.
                let _ = c.kill();
                status = tokio::task::spawn_blocking(move || c.wait()).await.ok().and_then(Result::ok);
            }
            let status = status.map(|s| s.to_string()).unwrap_or_default();
            round.resume(shared);
            shared.metrics.upgrade(false);
            tracing::error!(
                event = "upgrade",
                result = "error",
                moved = 0,
                stayed = shared.registry.len(),
                ms,
                error = %e,
                new_process = %status,
                "binary upgrade failed; this process keeps every connection and serves on"
            );
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    shared: &Arc<Shared>,
    launch: &Launch,
    listeners: (RawFd, RawFd),
    deadline: Instant,
    timeout_s: u64,
    child: &mut Option<std::process::Child>,
    round: &mut Round,
) -> Result<Arc<Channel>, UpgradeError> {
    let (mine, theirs) = fdpass::pair()?;
    fdpass::set_cloexec(theirs.raw_fd(), false)?;
    let spawned = std::process::Command::new(&launch.exe)
        .args(&launch.args)
        .env(FD_ENV, theirs.raw_fd().to_string())
        .spawn();
    // Ours closes now: the new process's exit then reads as the end.
    drop(theirs);
    *child = Some(
        spawned.map_err(|source| UpgradeError::Spawn { exe: launch.exe.display().to_string(), source })?,
    );
    let ch = Arc::new(mine);
    // Revocations recorded here from now on: the new process opened the
    // log before them, so they go to it with the commit.
    let mut revocations = shared.store.subscribe();

    let version =
        if std::env::var(FAULT_ENV).as_deref() == Ok("newer-format") { VERSION + 1 } else { VERSION };
    let preamble = state::encode_preamble_as(
        &Preamble {
            clock_ms: shared.registry.clock_ms(),
            wall_ms: crate::clock::unix_ms(),
            instance: shared.registry.instance().to_string(),
            next_id: shared.registry.next_id(),
            node: shared.redis.as_ref().map(|r| r.link().node.clone()).unwrap_or_default(),
        },
        version,
    );
    ch.send(&message(PREAMBLE, &preamble), &[listeners.0, listeners.1])?;
    let c = ch.clone();
    blocking(move || expect(recv(&c, deadline, timeout_s, &mut Vec::new())?, HELLO, "expected HELLO"))
        .await?;

    // Pause every session; each answers at its next poll.
    round.asked_at = Some(Instant::now());
    round.asked = shared.registry.all().into_iter().filter(|c| c.ask_pause()).collect();
    collect(shared, round, deadline, timeout_s).await?;
    send_round(shared, &ch, &round.parked, deadline, timeout_s, &mut revocations).await?;
    Ok(ch)
}

/// Waits until every session of `round` answered (or ended).
async fn collect(
    shared: &Shared,
    round: &mut Round,
    deadline: Instant,
    timeout_s: u64,
) -> Result<(), UpgradeError> {
    let mut waiting: std::collections::HashSet<u64> = round.asked.iter().map(|c| c.id).collect();
    let pause_deadline = deadline.min(Instant::now() + PAUSE_WAIT);
    loop {
        for p in shared.registry.handover.take() {
            waiting.remove(&p.info.id);
            if p.state.is_some() {
                round.parked.push(p);
            } else {
                round.stayed += 1;
            }
        }
        // Ended before answering: nothing to move.
        waiting.retain(|id| shared.registry.contains(*id));
        if waiting.is_empty() {
            // Oldest first: the new registry rebuilds each user's evict order.
            round.parked.sort_by_key(|p| p.info.id);
            return Ok(());
        }
        if Instant::now() >= pause_deadline {
            return Err(UpgradeError::Timeout(timeout_s));
        }
        tokio::select! {
            _ = shared.registry.handover.delivered() => {}
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
}

/// Sends one round of paused sessions and commits it: descriptors, state,
/// READY, COMMIT (with kicks that landed meanwhile), COMMITTED.
#[allow(clippy::too_many_arguments)]
async fn send_round(
    shared: &Shared,
    ch: &Arc<Channel>,
    parked: &[Parked],
    deadline: Instant,
    timeout_s: u64,
    revocations: &mut tokio::sync::broadcast::Receiver<crate::revocation::Revocation>,
) -> Result<(), UpgradeError> {
    let mut fds: Vec<RawFd> = Vec::with_capacity(parked.len() * 2);
    let mut moved = Vec::with_capacity(parked.len());
    for p in parked {
        let Some(s) = &p.state else { continue };
        let client_fd = fds.len() as u32;
        fds.push(p.client_fd);
        let up_fd = p.up_fd.map(|fd| {
            fds.push(fd);
            fds.len() as u32 - 1
        });
        moved.push(Moved {
            client_fd,
            up_fd,
            lease: shared.registry.lease_member(p.info.id),
            state: (**s).clone(),
        });
    }
    let stream = state::encode_stream(&moved);
    drop(moved);
    let c = ch.clone();
    blocking(move || {
        c.set_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
        for (i, batch) in fds.chunks(MAX_FDS).enumerate() {
            c.send(&message(FDS, &(i as u32).to_le_bytes()), batch)?;
        }
        for chunk in stream.chunks(MAX_MESSAGE - 1) {
            c.send(&message(DATA, chunk), &[])?;
        }
        c.send(&[END], &[])?;
        expect(recv(&c, deadline, timeout_s, &mut Vec::new())?, READY, "expected READY")
    })
    .await?;
    // The commit: revocations recorded meanwhile (JSON, length first), then
    // kicks that landed on paused sessions.
    let mut recorded = Vec::new();
    while let Ok(r) = revocations.try_recv() {
        recorded.push(r);
    }
    let recorded = serde_json::to_vec(&recorded).unwrap_or_else(|_| b"[]".to_vec());
    let mut kicks = (recorded.len() as u32).to_le_bytes().to_vec();
    kicks.extend_from_slice(&recorded);
    for p in parked {
        if let Some(r) = p.info.kicked_reason() {
            if let Some(i) = CloseReason::ALL.iter().position(|x| *x == r) {
                kicks.extend_from_slice(&p.info.id.to_le_bytes());
                kicks.push(i as u8);
            }
        }
    }
    let c = ch.clone();
    blocking(move || {
        c.send(&message(COMMIT, &kicks), &[])?;
        expect(recv(&c, deadline, timeout_s, &mut Vec::new())?, COMMITTED, "expected COMMITTED")
    })
    .await?;
    Ok(())
}

/// After the commit, this process no longer accepts; handshakes it had
/// under way still finish here. Each that becomes a session is moved in a
/// round of its own, until none is under way (or their longest deadline
/// passed). A failed late round leaves its sessions here, to the drain.
async fn late_rounds(shared: &Arc<Shared>, ch: &Arc<Channel>, mut seen: std::collections::HashSet<u64>) {
    let cfg = shared.config.load_full();
    let timeout_s = cfg.listen.upgrade_timeout_s;
    let mut revocations = shared.store.subscribe();
    let until = Instant::now()
        + cfg.limits.handshake_timeout()
        + Duration::from_millis(cfg.upstream.connect_timeout_ms)
        + Duration::from_secs(1);
    // Registered after the first round asked (admitted meanwhile): theirs next.
    let (mut moved, mut stayed) = (0, 0);
    loop {
        let mut round = Round::default();
        for c in shared.registry.all() {
            if seen.insert(c.id) && c.ask_pause() {
                round.asked.push(c);
            }
        }
        if !round.asked.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(timeout_s);
            let sent = match collect(shared, &mut round, deadline, timeout_s).await {
                Ok(()) if round.parked.is_empty() => Ok(()),
                Ok(()) => send_round(shared, ch, &round.parked, deadline, timeout_s, &mut revocations).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(()) => {
                    for p in &round.parked {
                        p.info.moved_away();
                    }
                    moved += round.parked.len();
                    stayed += round.stayed;
                }
                Err(e) => {
                    round.resume(shared);
                    tracing::warn!(error = %e, "upgrade: a late round failed; its connections stay and drain");
                    break;
                }
            }
        }
        if shared.slots.total() == 0 && shared.registry.all().iter().all(|c| seen.contains(&c.id)) {
            break;
        }
        if Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if moved + stayed > 0 {
        tracing::info!(
            event = "upgrade_late",
            moved,
            stayed,
            "upgrade: handshakes under way at the switch followed"
        );
    }
}

// ---------------------------------------------------------------- new side

/// A new process's end of the hand-over, from start to take-over.
pub struct Incoming {
    ch: Channel,
    pub preamble: Preamble,
    /// The preamble's arrival, for the session clock's age.
    at_wall_ms: u64,
    pub public: Option<std::net::TcpListener>,
    pub admin: Option<std::net::TcpListener>,
}

impl Incoming {
    /// This process was started by an upgrade: the channel, its preamble
    /// and the listeners. `None` otherwise. Called once, before the
    /// runtime starts (it reads and clears the variable).
    pub fn from_env() -> Option<Result<Incoming, UpgradeError>> {
        let raw = std::env::var_os(FD_ENV)?;
        // Not for any process this one starts later.
        std::env::remove_var(FD_ENV);
        Some(Incoming::open(&raw.to_string_lossy()))
    }

    fn open(raw: &str) -> Result<Incoming, UpgradeError> {
        let fd: RawFd =
            raw.parse().map_err(|_| UpgradeError::Protocol("PORTCULLIS_UPGRADE_FD is not a descriptor"))?;
        let ch = Channel::inherited(fd)?;
        let mut fds = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = expect(recv(&ch, deadline, 10, &mut fds)?, PREAMBLE, "expected PREAMBLE")?;
        let preamble = match state::decode_preamble(&body) {
            Ok(p) => p,
            Err(e) => {
                // Said to the old process, which logs it and keeps everything.
                let _ = ch.send(&message(REFUSED, e.to_string().as_bytes()), &[]);
                return Err(e.into());
            }
        };
        let mut fds = fds.into_iter();
        let (Some(public), Some(admin), None) = (fds.next(), fds.next(), fds.next()) else {
            return Err(UpgradeError::Protocol("expected two listeners"));
        };
        Ok(Incoming {
            ch,
            preamble,
            at_wall_ms: crate::clock::unix_ms(),
            public: Some(std::net::TcpListener::from(public)),
            admin: Some(std::net::TcpListener::from(admin)),
        })
    }

    /// How long ago the old process's session clock started.
    pub fn clock_age(&self) -> Duration {
        let since = self.at_wall_ms.saturating_sub(self.preamble.wall_ms);
        Duration::from_millis(self.preamble.clock_ms.saturating_add(since))
    }

    /// Tells the old process this one cannot take over (and why).
    pub fn refuse(&self, why: &str) {
        let _ = self.ch.send(&message(REFUSED, why.as_bytes()), &[]);
    }

    /// Receives every session, rebuilds them (none running), says READY,
    /// waits for COMMIT, says COMMITTED and only then starts them. Returns
    /// how many moved. On `Err` nothing ran: the caller exits and the old
    /// process keeps everything. Late rounds (handshakes the old process
    /// finishes after the switch) are taken by a task of their own.
    pub async fn take_over(self, shared: &Arc<Shared>) -> Result<usize, UpgradeError> {
        let timeout_s = shared.config.load().listen.upgrade_timeout_s;
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        let ch = Arc::new(self.ch);
        ch.send(&[HELLO], &[])?;
        let Some(n) = take_round(&ch, shared, deadline, timeout_s, true).await? else {
            return Err(UpgradeError::Protocol("the old process ended the hand-over before sending state"));
        };
        shared.metrics.upgrade(true);
        tracing::info!(
            event = "upgrade",
            result = "ok",
            role = "new",
            moved = n,
            "took over from the old process"
        );
        // No upgrade of this process until its predecessor is done with it.
        shared.upgrade.mark_running();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _done = Finished(shared.clone());
            loop {
                let deadline = Instant::now() + Duration::from_secs(timeout_s);
                match take_round(&ch, &shared, deadline, timeout_s, false).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade: a late round was refused; the old process keeps it");
                        return;
                    }
                }
            }
        });
        Ok(n)
    }
}

/// One round on the new side: descriptors and state until END, checked
/// whole, rebuilt, READY; COMMIT; COMMITTED; then the sessions start.
/// `Ok(None)`: the old process has no more (QUIT, or its exit).
async fn take_round(
    ch: &Arc<Channel>,
    shared: &Arc<Shared>,
    deadline: Instant,
    timeout_s: u64,
    first: bool,
) -> Result<Option<usize>, UpgradeError> {
    let c = ch.clone();
    let received = blocking(move || {
        let mut fds = Vec::new();
        let mut stream = Vec::new();
        // Between late rounds the old process may be quiet a while.
        let deadline = if first { deadline } else { Instant::now() + Duration::from_secs(3600) };
        loop {
            let (kind, body) = match recv(&c, deadline, timeout_s, &mut fds) {
                Err(UpgradeError::Exited) if !first && stream.is_empty() => return Ok(None),
                r => r?,
            };
            match kind {
                FDS => {}
                DATA => stream.extend_from_slice(&body),
                END => return Ok(Some((stream, fds))),
                QUIT if stream.is_empty() && fds.is_empty() => return Ok(None),
                _ => return Err(UpgradeError::Protocol("unexpected message in the state stream")),
            }
        }
    })
    .await?;
    let Some((stream, fds)) = received else { return Ok(None) };
    // Where the pause goes (debug level): the transfer, the rebuild, the commit.
    let received_at = Instant::now();
    if first && std::env::var(FAULT_ENV).as_deref() == Ok("kill-after-state") {
        tracing::warn!(fault = "kill-after-state", "test fault injection: killing this process mid-transfer");
        let _ = std::process::Command::new("kill").arg("-9").arg(std::process::id().to_string()).status();
    }
    let moved = match state::decode_stream(&stream, fds.len()) {
        Ok(m) => m,
        Err(e) => {
            let _ = ch.send(&message(REFUSED, e.to_string().as_bytes()), &[]);
            return Err(e.into());
        }
    };
    drop(stream);
    let cfg = shared.config.load_full();
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let mut take =
        |i: u32| fds.get_mut(i as usize).and_then(Option::take).ok_or(UpgradeError::Protocol("descriptor"));
    // Everything rebuilt first; nothing runs before COMMIT. The accounting
    // in id order, here (each user's evict order is the order of its ids);
    // the sockets' registration with the reactor and the sessions, most of
    // the pause, on every worker at once.
    let n = moved.len();
    let mut parts: Vec<Vec<Rebuild>> = Vec::new();
    let workers = tokio::runtime::Handle::current().metrics().num_workers().clamp(1, 8);
    let per = n.div_ceil(workers).max(1);
    for m in moved {
        let client = take(m.client_fd)?;
        let up = m.up_fd.map(&mut take).transpose()?;
        let ip = m.state.ip;
        let slot = shared.registry.restore(&m.state, m.lease);
        // Admitted already: counted, never refused.
        let conn = shared.caps.admit(usize::MAX).map_err(|_| UpgradeError::Protocol("caps"))?;
        let ip_permit = if is_trusted(&cfg.listen.trusted_proxies, ip) {
            None
        } else {
            Some(
                shared
                    .caps
                    .admit_ip(IpKey::new(ip), usize::MAX)
                    .map_err(|_| UpgradeError::Protocol("caps"))?,
            )
        };
        if parts.last().is_none_or(|p| p.len() >= per) {
            parts.push(Vec::with_capacity(per));
        }
        if let Some(p) = parts.last_mut() {
            p.push(Rebuild { state: m.state, client, up, slot, ip: ip_permit, conn });
        }
    }
    let built = parts.into_iter().map(|part| {
        let shared = shared.clone();
        blocking(move || part.into_iter().map(|r| r.build(&shared)).collect::<Result<Vec<_>, _>>())
    });
    let mut ready = Vec::with_capacity(n);
    for part in futures_util::future::join_all(built).await {
        ready.extend(part?);
    }
    let rebuilt_ms = received_at.elapsed().as_millis() as u64;
    ch.send(&message(READY, &(n as u32).to_le_bytes()), &[])?;
    let c = ch.clone();
    let kicks = blocking(move || {
        let kicks = expect(recv(&c, deadline, timeout_s, &mut Vec::new())?, COMMIT, "expected COMMIT")?;
        // Before any socket is touched (see the module notes).
        c.send(&[COMMITTED], &[])?;
        Ok(kicks)
    })
    .await?;
    for task in ready {
        tokio::spawn(task);
    }
    tracing::debug!(
        moved = n,
        rebuilt_ms,
        committed_ms = received_at.elapsed().as_millis() as u64,
        "upgrade round taken"
    );
    let (recorded, kicks) = split_commit(&kicks)?;
    for r in recorded {
        // Persisted here and broadcast: what it covers is kicked.
        if let Err(e) = shared.store.revoke(r).await {
            tracing::error!(error = %e, "upgrade: a revocation recorded during the hand-over was not persisted");
        }
    }
    for k in kicks.chunks_exact(9) {
        let mut id = [0u8; 8];
        id.copy_from_slice(&k[..8]);
        if let Some(r) = CloseReason::ALL.get(usize::from(k[8])) {
            shared.registry.kick_id(u64::from_le_bytes(id), *r);
        }
    }
    Ok(Some(n))
}

/// A COMMIT's body: the revocations recorded during the round, and the kicks.
fn split_commit(body: &[u8]) -> Result<(Vec<crate::revocation::Revocation>, &[u8]), UpgradeError> {
    let bad = || UpgradeError::Protocol("COMMIT body");
    let (len, rest) = body.split_first_chunk::<4>().ok_or_else(bad)?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(bad());
    }
    let (json, kicks) = rest.split_at(len);
    Ok((serde_json::from_slice(json).map_err(|_| bad())?, kicks))
}

/// Marks this process's part in an upgrade over when dropped (however the
/// late-round task ends).
struct Finished(Arc<Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.upgrade.finished();
    }
}

/// One moved connection between its accounting and its session.
struct Rebuild {
    state: handover::SessionState,
    client: OwnedFd,
    up: Option<OwnedFd>,
    slot: crate::session::registry::Slot,
    ip: Option<crate::admit::IpPermit>,
    conn: crate::admit::ConnPermit,
}

type Adopted = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Rebuild {
    /// Registers its sockets with the reactor (runs on a blocking thread,
    /// inside the runtime) and rebuilds its session, not yet running.
    fn build(self, shared: &Arc<Shared>) -> Result<Adopted, UpgradeError> {
        let socket = |fd: OwnedFd| -> Result<tokio::net::TcpStream, UpgradeError> {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            Ok(tokio::net::TcpStream::from_std(s)?)
        };
        let client = socket(self.client)?;
        let up = self.up.map(socket).transpose()?;
        let info = self.slot.info.clone();
        let lease = match &self.state.mode {
            handover::ModeState::Proxy { backend, .. } if !backend.is_empty() => {
                shared.upstream.lease_for(backend, info.id)
            }
            _ => None,
        };
        let session = handover::resume(self.state, client, up, info, shared.metrics.clone(), lease)
            .map_err(|_| UpgradeError::Protocol("session state"))?;
        Ok(Box::pin(crate::pipeline::adopted(shared, Box::pin(session), self.slot, self.ip, self.conn)))
    }
}
