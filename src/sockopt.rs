//! Socket options the gateway sets. One of them no safe wrapper offers
//! yet: `TCP_DEFER_ACCEPT` (Linux); std has it only behind an unstable
//! feature and `socket2` not at all, so it is set here, the crate's only
//! `unsafe` code.

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
