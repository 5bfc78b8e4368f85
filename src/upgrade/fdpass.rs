//! Descriptors between the old and the new process: a `SOCK_SEQPACKET`
//! Unix socket pair (message boundaries kept, so each batch of descriptors
//! arrives with exactly its own message), `SCM_RIGHTS` in batches of at most
//! [`MAX_FDS`], and `MSG_CTRUNC` treated as fatal (the kernel dropped
//! descriptors: the hand-over cannot be whole).
//!
//! Written on `libc` rather than a crate: `nix` would be a large dependency
//! for four calls, and the small `sendfd`/`passfd` crates neither report
//! `MSG_CTRUNC` nor speak `SOCK_SEQPACKET`. This is the crate's second
//! audited `unsafe` module (after `sockopt`): each call says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The most descriptors one `SCM_RIGHTS` message may carry on Linux
/// (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;
/// The largest message sent or received (payload bytes): well under the
/// socket's default send buffer, which bounds a `SOCK_SEQPACKET` message.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// One end of the hand-over channel (a `UnixStream` only for ownership and
/// timeouts; every message goes through [`Channel::send`] / [`Channel::recv`]).
pub struct Channel {
    sock: UnixStream,
}

/// A connected `SOCK_SEQPACKET` pair, both ends close-on-exec.
pub fn pair() -> io::Result<(Channel, Channel)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a live array of two c_ints, which socketpair fills.
    let rc = unsafe {
        libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are new and ours alone.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((Channel { sock: UnixStream::from(a) }, Channel { sock: UnixStream::from(b) }))
}

/// Sets or clears close-on-exec on `fd` (cleared on the end the new
/// process inherits, for exactly the one spawn).
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags; an
    // invalid descriptor is reported as EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on { flags | libc::FD_CLOEXEC } else { flags & !libc::FD_CLOEXEC };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Channel {
    /// The end a new process inherited, by its number: checked to be an
    /// open Unix socket, and made close-on-exec so it goes no further.
    pub fn inherited(fd: RawFd) -> io::Result<Channel> {
        set_cloexec(fd, true)?;
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one c_int into `ty` and its size into `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 || ty != libc::SOCK_SEQPACKET {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not the upgrade's socket"));
        }
        // SAFETY: the descriptor is open (fcntl succeeded), a seqpacket
        // socket, and handed to this process for it alone (the variable
        // naming it is read once, at start).
        Ok(Channel { sock: UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }) })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Bounds every following receive (`None`: wait for ever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        // A zero timeout would mean "for ever" to the socket option.
        let t = t.map(|d| d.max(Duration::from_millis(1)));
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t)
    }

    /// Sends one message with up to [`MAX_FDS`] descriptors (duplicated
    /// into the receiver; ours stay open).
    pub fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.len() > MAX_FDS || data.len() > MAX_MESSAGE || data.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "message or descriptor batch too large"));
        }
        let payload = std::mem::size_of_val(fds) as libc::c_uint;
        // SAFETY: CMSG_SPACE is arithmetic on its argument.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // u64s: the control buffer must be aligned for `cmsghdr`.
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: `msg` points at `control`, which is large enough for
            // one header and `fds` (CMSG_SPACE); the first header is inside
            // it, and CMSG_DATA points at its payload, `payload` bytes long.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                let at = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for (i, fd) in fds.iter().enumerate() {
                    at.add(i).write_unaligned(*fd);
                }
            }
        }
        loop {
            // SAFETY: `msg` and everything it points at live across the call.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                // A seqpacket message goes whole or not at all.
                return if n as usize == data.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "short send"))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(timed_out(e));
            }
        }
    }

    /// Receives one message into `buf`, its descriptors appended to `fds`
    /// (close-on-exec). `Ok(0)`: the other end closed. Descriptors or bytes
    /// cut off by the kernel (`MSG_CTRUNC`, `MSG_TRUNC`) are an error.
    pub fn recv(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let payload = (MAX_FDS * std::mem::size_of::<libc::c_int>()) as libc::c_uint;
        // SAFETY: arithmetic.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            // SAFETY: `msg` points at `buf` and `control`, both live and as
            // long as it says.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(timed_out(e));
            }
        };
        // Descriptors first: owned (and closed on any error below) before
        // anything else is judged.
        // SAFETY: the kernel filled `msg_control` with well-formed headers
        // (CMSG_FIRSTHDR / CMSG_NXTHDR walk only within `msg_controllen`);
        // an SCM_RIGHTS payload is that many c_ints, each a new descriptor
        // of this process, owned by nobody else yet.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let at = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                        fds.push(OwnedFd::from_raw_fd(at.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("descriptors lost in transit (MSG_CTRUNC)"));
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Err(io::Error::other("message cut short (MSG_TRUNC)"));
        }
        Ok(n)
    }
}

/// A receive or send timeout surfaces as `EAGAIN`: named for what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "the other process did not answer in time")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More descriptors than one message carries go in batches; each batch
    /// arrives with its own message, in order, each a working descriptor.
    #[test]
    fn descriptors_cross_in_batches_with_their_messages() {
        let (a, b) = pair().unwrap();
        let files: Vec<std::fs::File> = (0..300).map(|_| tempfile::tempfile().unwrap()).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        for (i, chunk) in raw.chunks(MAX_FDS).enumerate() {
            a.send(&[i as u8], chunk).unwrap();
        }
        a.send(b"end", &[]).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        assert_eq!(b.recv(&mut buf, &mut got).unwrap(), 1);
        assert_eq!((buf[0], got.len()), (0, MAX_FDS));
        assert_eq!(b.recv(&mut buf, &mut got).unwrap(), 1);
        assert_eq!((buf[0], got.len()), (1, 300));
        assert_eq!(b.recv(&mut buf, &mut got).unwrap(), 3);
        assert_eq!(got.len(), 300);
        // The same open files: a write through one shows in the other.
        use std::io::{Seek, Write};
        let mut mine = files[299].try_clone().unwrap();
        mine.write_all(b"x").unwrap();
        let mut theirs = std::fs::File::from(got.pop().unwrap());
        assert_eq!(theirs.stream_position().unwrap(), 1);
        assert!(a.send(b"", &[]).is_err(), "an empty message would read as the end");
        assert!(a.send(b"x", &raw[..MAX_FDS + 1]).is_err());
        drop(a);
        assert_eq!(b.recv(&mut buf, &mut got).unwrap(), 0, "end of the channel");
    }

    /// A receiver with no room for the message's bytes reports it rather
    /// than reading a part as the whole.
    #[test]
    fn a_cut_message_is_an_error() {
        let (a, b) = pair().unwrap();
        a.send(b"twelve bytes", &[]).unwrap();
        let mut small = [0u8; 4];
        assert!(b.recv(&mut small, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = pair().unwrap();
        b.set_timeout(Some(Duration::from_millis(20))).unwrap();
        let e = b.recv(&mut [0u8; 4], &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
