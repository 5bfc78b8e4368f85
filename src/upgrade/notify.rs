//! systemd's readiness protocol (`sd_notify`), written directly: one
//! datagram to the socket `NOTIFY_SOCKET` names (a path, or `@name` in the
//! abstract namespace). With `Type=notify` and `NotifyAccess=all`, the
//! process a binary upgrade starts reports `MAINPID=<its pid>` and
//! `READY=1`, so the unit follows the new process and the old one's exit
//! is not the service's. Without `NOTIFY_SOCKET` (not under systemd)
//! nothing is sent.

use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a notify service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=value` lines); `Ok(false)` when
/// not under systemd.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os(NOTIFY_SOCKET) else { return Ok(false) };
    let path = path.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), &path)?;
        }
    }
    Ok(true)
}

/// This process is serving, and it is the service's main process now.
pub fn ready() {
    let state = format!("MAINPID={}\nREADY=1\n", std::process::id());
    if let Err(e) = notify(&state) {
        tracing::warn!(error = %e, "could not tell systemd this process is ready ({NOTIFY_SOCKET})");
    }
}
