//! Stage 1, the accept loop: caps are taken before any task is spawned,
//! then the head is read once, speculatively, before the socket is
//! registered with the reactor. A head that is already whole is judged on
//! the spot (`early`): a refusal costs accept, read, write and close, with
//! no task, no registration and no allocation. Anything else goes on to
//! `pipeline` in its own task, with the bytes already read.
//!
//! One acceptor per runtime worker shares the listener, so the refusal
//! work spreads over the cores; each owns its read and answer buffers.
//!
//! Out of file descriptors is not out of service: the acceptors share one
//! spare descriptor, and at `EMFILE` the acceptor gives it up to accept the
//! waiting socket and close it at once (counted in
//! `portcullis_fd_exhausted_total`) instead of leaving clients hanging
//! unseen in the backlog.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::Socket;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admit::{ConnPermit, IpKey, IpPermit, SlotLimits};
use crate::client_addr::is_trusted;
use crate::early::{self, Verdict, ANSWER_MAX};
use crate::events;
use crate::handshake::find_head_end;
use crate::pipeline::{self, Admitted, Early};
use crate::reject::Reject;
use crate::shared::Shared;

/// How long the loop pauses when even the reserve descriptor cannot be
/// had back (the table is full of sockets that are not ours to close).
const FD_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts per wake-up before the acceptor yields to other tasks.
const ACCEPT_BATCH: usize = 64;

/// How long a refused socket that sent more than its head is drained
/// before it is closed (see [`linger_close`]).
const LINGER: Duration = Duration::from_secs(1);
/// How many bytes such a socket may make us read and discard.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Accepts until `stop` resolves, with one acceptor per runtime worker.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    let listener = match listener_fd(listener) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            tracing::error!(error = %e, "cannot take the listener over; not accepting");
            return stop.await;
        }
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let reserve = Arc::new(Reserve::new());
    let workers = tokio::runtime::Handle::current().metrics().num_workers().max(1);
    let others: Vec<_> = (1..workers)
        .map(|_| tokio::spawn(accept(shared.clone(), listener.clone(), reserve.clone(), stop_rx.clone())))
        .collect();
    tokio::select! {
        _ = stop => {}
        _ = accept(shared, listener, reserve, stop_rx) => {}
    }
    let _ = stop_tx.send(true);
    for o in others {
        let _ = o.await;
    }
}

/// The listener as a readiness source: accepting through it directly
/// (not through tokio's `accept`) leaves each new socket unregistered.
fn listener_fd(listener: TcpListener) -> std::io::Result<AsyncFd<Socket>> {
    crate::sockopt::listener_readiness(Socket::from(listener.into_std()?))
}

/// One acceptor: its buffers, and the spare descriptor all share.
struct Acceptor {
    shared: Arc<Shared>,
    /// The speculative read's buffer, `limits.max_header_bytes` long.
    head: Vec<u8>,
    answer: [u8; ANSWER_MAX],
    reserve: Arc<Reserve>,
}

async fn accept(
    shared: Arc<Shared>,
    listener: Arc<AsyncFd<Socket>>,
    reserve: Arc<Reserve>,
    mut stop: watch::Receiver<bool>,
) {
    let mut a = Acceptor { shared, head: Vec::new(), answer: [0; ANSWER_MAX], reserve };
    loop {
        let mut ready = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = listener.readable() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "listener failed; not accepting");
                    return;
                }
            },
        };
        for _ in 0..ACCEPT_BATCH {
            let accepted = ready.try_io(|l| a.reserve.accept(l.get_ref(), &a.shared));
            match accepted {
                // Would block: readiness cleared, wait for the next wake-up.
                Err(_would_block) => break,
                Ok(Ok(Accepted::Socket(sock, addr))) => {
                    a.shared.fd_exhausted_logged.store(false, Ordering::Relaxed);
                    match addr.as_socket() {
                        Some(peer) => a.admit(sock, peer),
                        None => drop(sock),
                    }
                }
                Ok(Ok(Accepted::Shed)) => {}
                Ok(Ok(Accepted::NoSpare)) => {
                    drop(ready);
                    tokio::time::sleep(FD_BACKOFF).await;
                    break;
                }
                // ECONNABORTED and the like: that socket is gone, go on.
                Ok(Err(_)) => {}
            }
        }
        // A full batch leaves readiness set: the next `readable` returns
        // at once, after other tasks had their turn.
        tokio::task::yield_now().await;
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

impl Acceptor {
    /// Stage 1 for one accepted socket: the global cap and the per-IP
    /// concurrent cap, then the speculative read and the fast path, then
    /// a fair handshake slot for whatever the pipeline goes on with.
    fn admit(&mut self, sock: Socket, peer: SocketAddr) {
        let shared = &*self.shared;
        let now = Instant::now();
        let cfg = shared.config.load();
        let l = &cfg.limits;
        // A trusted proxy's own address is never limited per IP; its clients
        // are, once PROXY / X-Forwarded-For names them.
        let key = (!is_trusted(&cfg.listen.trusted_proxies, peer.ip())).then(|| IpKey::new(peer.ip()));
        // First of all, and cheapest: nothing read, no cap taken, no log
        // line (a ban is logged when it starts and ends, not per attempt).
        if key.is_some() && shared.bans.is_banned(peer.ip()) {
            let _ = sock.set_linger(Some(Duration::ZERO));
            drop(sock);
            return shared.metrics.handshake_rejected(Reject::Banned, now.elapsed());
        }
        let permits = shared.caps.admit(l.max_connections).and_then(|conn| {
            let ip = key.map(|k| shared.caps.admit_ip(k, l.per_ip_max_connections)).transpose()?;
            Ok((conn, ip))
        });
        let (conn, ip) = match permits {
            Ok(p) => p,
            Err(reason) => return refuse_unread(shared, sock, reason, peer, now),
        };

        // The fast path needs the head in the clear and the client named
        // by the peer address: no PROXY header, no TLS, no trusted proxy.
        let mut early = Early::default();
        if key.is_some() && !cfg.listen.proxy_protocol && shared.tls.load().is_none() {
            if self.head.len() != l.max_header_bytes {
                // Only when the key changed (start-up, reload).
                self.head.resize(l.max_header_bytes, 0);
            }
            match (&sock).read(&mut self.head) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // The client left (or reset) before sending anything: what
                // the pipeline records for a silent socket, without a task.
                Ok(0) | Err(_) => {
                    drop(sock);
                    return events::rejected(
                        &shared.metrics,
                        &shared.log_limiter,
                        Reject::HandshakeTimeout,
                        peer,
                        None,
                        now.elapsed(),
                    );
                }
                Ok(n) => {
                    if let Some(end) = find_head_end(&self.head[..n], 0) {
                        match early::judge(shared, &cfg, peer, &self.head[..end], &mut self.answer) {
                            Verdict::Refuse { reason, len } => {
                                // Bytes past the head (or a full buffer) mean
                                // the client may still be sending.
                                let more = n > end || n == self.head.len();
                                answer(sock, &self.answer[..len], more, (conn, ip));
                                shared.bans.judge(&cfg.ban, peer.ip(), Some(reason.strike()));
                                return events::rejected(
                                    &shared.metrics,
                                    &shared.log_limiter,
                                    reason,
                                    peer,
                                    None,
                                    now.elapsed(),
                                );
                            }
                            Verdict::Continue => early.rate_checked = true,
                        }
                    }
                    early.bytes = self.head[..n].to_vec();
                }
            }
        }

        let handshake = match shared.slots.admit(key, now, SlotLimits::from(l)) {
            Ok(h) => h,
            Err(reason) => return refuse_unread(shared, sock, reason, peer, now),
        };
        handshake.attempt().progress(early.bytes.len());
        if early.rate_checked {
            // The head came whole with the accept: nothing left to shed or
            // expire (a newcomer of the same address must not take it).
            handshake.attempt().head_done();
        }
        let tcp = match TcpStream::from_std(std::net::TcpStream::from(sock)) {
            Ok(t) => t,
            Err(e) => {
                // The reactor refused the registration (out of memory):
                // nothing to answer with.
                tracing::warn!(error = %e, "cannot register an accepted socket");
                return;
            }
        };
        let admitted = Admitted { conn, handshake, ip };
        tokio::spawn(pipeline::connection(self.shared.clone(), tcp, peer, admitted, now, early));
    }
}

/// A stage-1 refusal: closed at once without reading; linger 0 frees the
/// socket without TIME_WAIT on our side.
fn refuse_unread(shared: &Shared, sock: Socket, reason: Reject, peer: SocketAddr, since: Instant) {
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
    events::rejected(&shared.metrics, &shared.log_limiter, reason, peer, None, since.elapsed());
}

/// Writes a fast-path answer and closes.
///
/// A plain close delivers the answer and a FIN when the client has sent
/// nothing we did not read. When it may still be sending (`more`), a close
/// with unread bytes in the receive queue is an RST, and an RST makes the
/// client's kernel drop the answer it has not read yet: such a socket gets
/// a lingering close instead, in a task of its own.
fn answer(sock: Socket, bytes: &[u8], more: bool, permits: (ConnPermit, Option<IpPermit>)) {
    // An empty send buffer takes a few hundred bytes whole; a short write
    // is finished by the lingering close.
    let sent = (&sock).write(bytes).unwrap_or(0);
    if sent == bytes.len() && !more {
        return drop(sock);
    }
    let rest = bytes[sent..].to_vec();
    if let Ok(tcp) = TcpStream::from_std(std::net::TcpStream::from(sock)) {
        tokio::spawn(linger_close(tcp, rest, permits));
    }
}

/// Finishes the answer, sends our FIN, then reads and discards what the
/// client still sends until it closes too, bounded in time and bytes.
/// The socket keeps its caps meanwhile.
async fn linger_close(mut tcp: TcpStream, rest: Vec<u8>, _permits: (ConnPermit, Option<IpPermit>)) {
    let _ = tokio::time::timeout(LINGER, async {
        tcp.write_all(&rest).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_MAX_BYTES {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// What one accept gave.
enum Accepted {
    Socket(Socket, socket2::SockAddr),
    /// Out of descriptors: one waiting socket was accepted and closed.
    Shed,
    /// Out of descriptors, and the spare is gone too (another part of the
    /// gateway took the descriptor it freed): nothing to do until one frees.
    NoSpare,
}

/// The spare descriptor kept for `EMFILE`, one for all acceptors.
struct Reserve(Mutex<Option<File>>);

impl Reserve {
    fn new() -> Reserve {
        Reserve(Mutex::new(File::open("/dev/null").ok()))
    }

    /// Accepts one socket; out of descriptors, frees the spare, accepts the
    /// waiting socket and closes it, then takes the spare back. Every
    /// accept runs under the lock: no other acceptor can take the freed
    /// descriptor in between (else the spare is lost until a connection
    /// ends). Uncontended but for the acceptors, whose accepts the kernel
    /// serialises on the listener anyway.
    fn accept(&self, listener: &Socket, shared: &Shared) -> std::io::Result<Accepted> {
        let mut spare = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // SOCK_NONBLOCK: the socket can be read speculatively now and
        // handed to the reactor later without another system call.
        match listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
            Ok((sock, addr)) => return Ok(Accepted::Socket(sock, addr)),
            Err(e) if !is_fd_exhaustion(&e) => return Err(e),
            Err(_) => {}
        }
        if spare.take().is_none() {
            *spare = File::open("/dev/null").ok();
            return Ok(Accepted::NoSpare);
        }
        let shed = listener.accept4(libc::SOCK_CLOEXEC);
        if let Ok((sock, addr)) = &shed {
            let _ = sock.set_linger(Some(Duration::ZERO));
            shared.metrics.fd_exhausted();
            let first = shared.fd_exhausted_logged.swap(true, Ordering::Relaxed);
            if !first {
                let client = addr.as_socket().map(|a| a.ip().to_string()).unwrap_or_default();
                tracing::error!(
                    event = "fd_exhausted",
                    client,
                    "out of file descriptors: closing new sockets through the reserve descriptor"
                );
            }
        }
        let emptied = matches!(&shed, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        drop(shed);
        *spare = File::open("/dev/null").ok();
        // The kernel claims the descriptor before it looks at the queue: an
        // empty queue answers EMFILE too, and would-block here, which
        // clears the listener's readiness.
        if emptied {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(Accepted::Shed)
    }
}
