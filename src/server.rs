//! Stage 1, the accept loop: caps are taken before any task is spawned or
//! any byte read, so a refused socket costs an accept and a close. The
//! rest of a connection's walk is `pipeline`'s.
//!
//! Out of file descriptors is not out of service: the loop keeps one
//! spare descriptor, and at `EMFILE` it gives it up to accept the waiting
//! socket and close it at once (counted in `portcullis_fd_exhausted_total`)
//! instead of leaving clients hanging unseen in the backlog.

use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::admit::{IpKey, SlotLimits};
use crate::client_addr::is_trusted;
use crate::events;
use crate::pipeline::{self, Admitted};
use crate::shared::Shared;
use crate::sockopt::reset_on_close;

/// How long the loop pauses when even the reserve descriptor cannot be
/// had back (the table is full of sockets that are not ours to close).
const FD_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts until `stop` resolves.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut reserve = Reserve::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => {
                shared.fd_exhausted_logged.store(false, std::sync::atomic::Ordering::Relaxed);
                admit(&shared, tcp, peer)
            }
            Err(e) if is_fd_exhaustion(&e) => {
                if !reserve.shed_one(&listener, &shared).await {
                    tokio::time::sleep(FD_BACKOFF).await;
                }
            }
            // ECONNABORTED and the like: that socket is gone, go on.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Stage 1 for one accepted socket: the global cap, the per-IP concurrent
/// cap, then a fair handshake slot.
fn admit(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let now = Instant::now();
    let cfg = shared.config.load();
    let l = &cfg.limits;
    // A trusted proxy's own address is never limited per IP; its clients
    // are, once PROXY / X-Forwarded-For names them.
    let key = (!is_trusted(&cfg.listen.trusted_proxies, peer.ip())).then(|| IpKey::new(peer.ip()));
    let admitted = shared.caps.admit(l.max_connections).and_then(|conn| {
        let ip = key.map(|k| shared.caps.admit_ip(k, l.per_ip_max_connections)).transpose()?;
        let handshake = shared.slots.admit(key, now, SlotLimits::from(l))?;
        Ok(Admitted { conn, handshake, ip })
    });
    match admitted {
        Ok(admitted) => {
            tokio::spawn(pipeline::connection(shared.clone(), tcp, peer, admitted, now));
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

/// The spare descriptor kept for `EMFILE`.
struct Reserve(Option<File>);

impl Reserve {
    fn new() -> Reserve {
        Reserve(File::open("/dev/null").ok())
    }

    /// Frees the spare, accepts one waiting socket and closes it, then
    /// takes the spare back. False when there was nothing to give up.
    async fn shed_one(&mut self, listener: &TcpListener, shared: &Shared) -> bool {
        if self.0.take().is_none() {
            self.0 = File::open("/dev/null").ok();
            return false;
        }
        // The socket is ready (accept just failed for want of a descriptor),
        // so this does not wait; bounded anyway.
        let got = tokio::time::timeout(Duration::from_millis(10), listener.accept()).await;
        if let Ok(Ok((tcp, peer))) = got {
            reset_on_close(&tcp);
            drop(tcp);
            shared.metrics.fd_exhausted();
            let first = shared.fd_exhausted_logged.swap(true, std::sync::atomic::Ordering::Relaxed);
            if !first {
                tracing::error!(
                    event = "fd_exhausted",
                    client = %peer.ip(),
                    "out of file descriptors: closing new sockets through the reserve descriptor"
                );
            }
        }
        self.0 = File::open("/dev/null").ok();
        true
    }
}
