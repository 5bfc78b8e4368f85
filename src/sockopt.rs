//! Socket options the gateway sets, and the listener's registration with
//! the reactor: the crate's only `unsafe` code, two calls no safe wrapper
//! offers. `TCP_DEFER_ACCEPT` (Linux): std has it only behind an unstable
//! feature and `socket2` not at all. Registering a raw listener with tokio
//! (`AsyncFd`): its safe constructors are deprecated as unsound for types
//! whose descriptor could change, which an owned `socket2::Socket` cannot.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Sets `TCP_DEFER_ACCEPT` on a listening socket: the kernel keeps a
/// connection that has sent no byte out of the accept queue for about
/// `period` (it retransmits its SYN-ACK meanwhile). When the period ends,
/// Linux hands over a connection whose client still answers (since 2.6.32),
/// so a connect-only socket reaches the process after the period, and then
/// meets the handshake deadline like any other.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn set_defer_accept(socket: &impl AsRawFd, period: Duration) -> std::io::Result<()> {
    let secs: libc::c_int = period.as_secs().try_into().unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid descriptor borrowed for the call, a pointer to a live
    // c_int and its exact size; setsockopt reads nothing else.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Elsewhere the option does not exist; the handshake deadline alone
/// applies.
#[cfg(not(target_os = "linux"))]
pub fn set_defer_accept(_socket: &impl AsRawFd, _period: Duration) -> std::io::Result<()> {
    Ok(())
}

/// Makes the coming close an RST: a refused socket leaves no TIME_WAIT
/// entry behind on our side, which a flood would otherwise pile up.
pub fn reset_on_close(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// The listener as a readiness source for the accept loop, which accepts
/// through it directly so that new sockets stay out of the reactor until
/// they need it.
#[allow(unsafe_code)]
pub fn listener_readiness(
    socket: socket2::Socket,
) -> std::io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    // SAFETY: `Socket` owns its descriptor: it stays open, and
    // `as_raw_fd` returns that same descriptor, until the `AsyncFd` drops
    // the socket.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}
