//! The hand-over's wire format: the preamble (the old process's clock and
//! instance) and the state stream (every moved session), both opening with
//! a magic and a format version.
//!
//! Hand-written little-endian, field by field, so that nothing but this
//! file decides the format and a reader checks every length before it
//! takes a byte. A stream from another version is refused by its header,
//! before any session is looked at; a truncated one fails while parsing,
//! which finishes before anything is applied (the caller applies only a
//! whole, checked list). The first six bytes (magic, version) stay the same
//! in every version, so an older binary can always say which version it
//! was offered, and refuse it.

use std::net::IpAddr;

use crate::relay::frame::Header;
use crate::relay::FilterState;
use crate::session::echo::EchoState;
use crate::session::handover::{self, ModeState, SessionState, SideState};

/// This binary's format. Bump on any change to what is written below.
pub const VERSION: u16 = 1;
const PREAMBLE_MAGIC: &[u8; 4] = b"PCUP";
const STREAM_MAGIC: &[u8; 4] = b"PCST";
const STREAM_END: &[u8; 4] = b"PCND";
/// No backend descriptor (echo mode).
const NO_FD: u32 = u32::MAX;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a Portcullis upgrade stream")]
    Magic,
    #[error(
        "upgrade state format v{got} is not the one this binary reads (v{VERSION}): \
         a downgrade across formats is a restart with a drain, not an upgrade"
    )]
    Version { got: u16 },
    #[error("upgrade state truncated")]
    Truncated,
    #[error("upgrade state invalid: {0}")]
    Invalid(&'static str),
}

/// What the new process learns first, before it builds its gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// The old process's session clock (milliseconds since its epoch)…
    pub clock_ms: u64,
    /// …read at this wall-clock instant (unix milliseconds).
    pub wall_ms: u64,
    /// The registry's instance name: moved connections keep their ids.
    pub instance: String,
    /// The old registry's next id: the new one hands out ids well above it.
    pub next_id: u64,
    /// The Redis link's node name (empty without Redis): lease names carry over.
    pub node: String,
}

/// One moved session: its state and where its descriptors are in the
/// order they crossed.
#[derive(Clone, Debug, PartialEq)]
pub struct Moved {
    pub client_fd: u32,
    pub up_fd: Option<u32>,
    /// Its fleet lease's name (Redis backend), kept by the new process.
    pub lease: Option<String>,
    pub state: SessionState,
}

pub fn encode_preamble(p: &Preamble) -> Vec<u8> {
    encode_preamble_as(p, VERSION)
}

/// As [`encode_preamble`], claiming format `version` (the test suite's
/// stand-in for a newer binary).
pub fn encode_preamble_as(p: &Preamble, version: u16) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(64));
    w.0.extend_from_slice(PREAMBLE_MAGIC);
    w.u16(version);
    w.u64(p.clock_ms);
    w.u64(p.wall_ms);
    w.str(&p.instance);
    w.u64(p.next_id);
    w.str(&p.node);
    w.0
}

pub fn decode_preamble(b: &[u8]) -> Result<Preamble, StateError> {
    let mut r = R(b);
    r.header(PREAMBLE_MAGIC)?;
    let p = Preamble {
        clock_ms: r.u64()?,
        wall_ms: r.u64()?,
        instance: r.string()?,
        next_id: r.u64()?,
        node: r.string()?,
    };
    r.done()?;
    Ok(p)
}

/// The state stream for `moved`, in order.
pub fn encode_stream(moved: &[Moved]) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(16 + moved.len() * 256));
    w.0.extend_from_slice(STREAM_MAGIC);
    w.u16(VERSION);
    w.u32(moved.len() as u32);
    for m in moved {
        w.u32(m.client_fd);
        w.u32(m.up_fd.unwrap_or(NO_FD));
        w.opt_str(m.lease.as_deref());
        session(&mut w, &m.state);
    }
    w.0.extend_from_slice(STREAM_END);
    w.0
}

/// Parses a whole stream, each session checked as a session could have
/// left it, and every descriptor index below `fds` and used once.
pub fn decode_stream(b: &[u8], fds: usize) -> Result<Vec<Moved>, StateError> {
    let mut r = R(b);
    r.header(STREAM_MAGIC)?;
    let n = r.u32()? as usize;
    // Each record is far longer than 8 bytes: a count the bytes cannot
    // hold is refused before anything is allocated for it.
    if n > b.len() / 8 {
        return Err(StateError::Truncated);
    }
    let mut used = vec![false; fds];
    let mut take = |i: u32| -> Result<u32, StateError> {
        match used.get_mut(i as usize) {
            Some(u) if !*u => {
                *u = true;
                Ok(i)
            }
            _ => Err(StateError::Invalid("descriptor index")),
        }
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let client_fd = take(r.u32()?)?;
        let up_fd = match r.u32()? {
            NO_FD => None,
            i => Some(take(i)?),
        };
        let lease = r.opt_string()?;
        let state = read_session(&mut r)?;
        handover::check(&state, up_fd.is_some()).map_err(StateError::Invalid)?;
        out.push(Moved { client_fd, up_fd, lease, state });
    }
    if r.take(4)? != STREAM_END {
        return Err(StateError::Invalid("stream end"));
    }
    r.done()?;
    Ok(out)
}

fn session(w: &mut W, s: &SessionState) {
    w.u64(s.id);
    w.str(&s.sub);
    match s.ip {
        IpAddr::V4(a) => {
            w.u8(4);
            w.0.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            w.u8(6);
            w.0.extend_from_slice(&a.octets());
        }
    }
    w.u64(s.since);
    w.opt_str(s.jti.as_deref());
    w.opt_u64(s.iat);
    w.u64(s.last_seen);
    w.u32(s.ping_interval);
    w.u32(s.pong_timeout);
    w.u32(s.idle_timeout);
    w.u32(s.write_timeout);
    w.u64(s.max_out);
    w.u64(s.expires);
    w.u64(s.lifetime);
    w.f64(s.msgs_per_s);
    w.u8(s.reason.map_or(0, |r| r + 1));
    w.u64(s.closing_until);
    w.u64(s.next_ping);
    w.u64(s.ping_sent);
    w.bool(s.ping_due);
    w.bool(s.client_paused);
    w.u64(s.last_data);
    w.f64(s.rate_tokens);
    w.u64(s.rate_at);
    side(w, &s.client);
    match &s.mode {
        ModeState::Echo(e) => {
            w.u8(0);
            w.u64(e.max_message);
            w.bytes(&e.buf);
            match &e.frame {
                None => w.u8(0),
                Some(h) => {
                    w.u8(1);
                    header(w, h);
                }
            }
            w.u64(e.got);
            w.bool(e.streaming);
            w.u8(e.message.map_or(0, |m| m + 1));
            w.u64(e.message_bytes);
            w.0.extend_from_slice(&e.utf8_carry);
            w.u8(e.utf8_n);
            w.bool(e.deflate);
        }
        ModeState::Proxy { up, from_client, from_up, backend } => {
            w.u8(1);
            side(w, up);
            filter(w, from_client);
            filter(w, from_up);
            w.bytes(backend.as_bytes());
        }
    }
}

fn side(w: &mut W, s: &SideState) {
    w.bytes(&s.out);
    w.u64(s.progress);
    w.u64(s.drain_until);
    let flags = [s.eof, s.broken, s.got_close, s.sent_close, s.wait_reply];
    w.u8(flags.iter().enumerate().fold(0, |acc, (i, f)| acc | (u8::from(*f) << i)));
}

fn filter(w: &mut W, f: &FilterState) {
    w.bool(f.from_client);
    w.bool(f.deflate);
    w.u64(f.max_message);
    w.bytes(&f.pending);
    w.u64(f.left);
    w.bool(f.fin);
    w.bool(f.in_message);
    w.u64(f.message_bytes);
}

fn header(w: &mut W, h: &Header) {
    w.bool(h.fin);
    w.u8(h.rsv);
    w.u8(h.opcode);
    match h.mask {
        None => w.u8(0),
        Some(m) => {
            w.u8(1);
            w.0.extend_from_slice(&m);
        }
    }
    w.u64(h.len);
    w.u8(h.size as u8);
}

fn read_session(r: &mut R) -> Result<SessionState, StateError> {
    let id = r.u64()?;
    let sub = r.string()?;
    let ip = match r.u8()? {
        4 => IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).map_err(|_| StateError::Truncated)?),
        6 => IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).map_err(|_| StateError::Truncated)?),
        _ => return Err(StateError::Invalid("address family")),
    };
    Ok(SessionState {
        id,
        sub,
        ip,
        since: r.u64()?,
        jti: r.opt_string()?,
        iat: r.opt_u64()?,
        last_seen: r.u64()?,
        ping_interval: r.u32()?,
        pong_timeout: r.u32()?,
        idle_timeout: r.u32()?,
        write_timeout: r.u32()?,
        max_out: r.u64()?,
        expires: r.u64()?,
        lifetime: r.u64()?,
        msgs_per_s: r.f64()?,
        reason: r.u8()?.checked_sub(1),
        closing_until: r.u64()?,
        next_ping: r.u64()?,
        ping_sent: r.u64()?,
        ping_due: r.bool()?,
        client_paused: r.bool()?,
        last_data: r.u64()?,
        rate_tokens: r.f64()?,
        rate_at: r.u64()?,
        client: read_side(r)?,
        mode: match r.u8()? {
            0 => ModeState::Echo(EchoState {
                max_message: r.u64()?,
                buf: r.bytes()?,
                frame: match r.u8()? {
                    0 => None,
                    1 => Some(read_header(r)?),
                    _ => return Err(StateError::Invalid("frame flag")),
                },
                got: r.u64()?,
                streaming: r.bool()?,
                message: r.u8()?.checked_sub(1),
                message_bytes: r.u64()?,
                utf8_carry: <[u8; 4]>::try_from(r.take(4)?).map_err(|_| StateError::Truncated)?,
                utf8_n: r.u8()?,
                deflate: r.bool()?,
            }),
            1 => ModeState::Proxy {
                up: read_side(r)?,
                from_client: read_filter(r)?,
                from_up: read_filter(r)?,
                backend: String::from_utf8(r.bytes()?).map_err(|_| StateError::Invalid("backend url"))?,
            },
            _ => return Err(StateError::Invalid("session mode")),
        },
    })
}

fn read_side(r: &mut R) -> Result<SideState, StateError> {
    let out = r.bytes()?;
    let progress = r.u64()?;
    let drain_until = r.u64()?;
    let f = r.u8()?;
    if f >> 5 != 0 {
        return Err(StateError::Invalid("side flags"));
    }
    let bit = |i: u8| f & (1 << i) != 0;
    Ok(SideState {
        out,
        progress,
        drain_until,
        eof: bit(0),
        broken: bit(1),
        got_close: bit(2),
        sent_close: bit(3),
        wait_reply: bit(4),
    })
}

fn read_filter(r: &mut R) -> Result<FilterState, StateError> {
    Ok(FilterState {
        from_client: r.bool()?,
        deflate: r.bool()?,
        max_message: r.u64()?,
        pending: r.bytes()?,
        left: r.u64()?,
        fin: r.bool()?,
        in_message: r.bool()?,
        message_bytes: r.u64()?,
    })
}

fn read_header(r: &mut R) -> Result<Header, StateError> {
    Ok(Header {
        fin: r.bool()?,
        rsv: r.u8()?,
        opcode: r.u8()?,
        mask: match r.u8()? {
            0 => None,
            1 => Some(<[u8; 4]>::try_from(r.take(4)?).map_err(|_| StateError::Truncated)?),
            _ => return Err(StateError::Invalid("mask flag")),
        },
        len: r.u64()?,
        size: usize::from(r.u8()?),
    })
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u64(v);
            }
        }
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn header(&mut self, magic: &[u8; 4]) -> Result<(), StateError> {
        if self.take(4).map_err(|_| StateError::Magic)? != magic {
            return Err(StateError::Magic);
        }
        match self.u16()? {
            VERSION => Ok(()),
            got => Err(StateError::Version { got }),
        }
    }
    fn done(&self) -> Result<(), StateError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(StateError::Invalid("bytes after the end"))
        }
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Invalid("flag")),
        }
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| StateError::Truncated)?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| StateError::Truncated)?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| StateError::Truncated)?))
    }
    fn f64(&mut self) -> Result<f64, StateError> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, StateError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, StateError> {
        String::from_utf8(self.bytes()?).map_err(|_| StateError::Invalid("text"))
    }
    fn opt_string(&mut self) -> Result<Option<String>, StateError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            _ => Err(StateError::Invalid("option flag")),
        }
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, StateError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(StateError::Invalid("option flag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(out: &[u8]) -> SideState {
        SideState {
            out: out.to_vec(),
            progress: 5,
            drain_until: u64::MAX,
            eof: false,
            broken: true,
            got_close: false,
            sent_close: true,
            wait_reply: true,
        }
    }

    fn sample(id: u64, proxy: bool) -> SessionState {
        let mode = if proxy {
            ModeState::Proxy {
                up: side(b"queued toward the backend"),
                from_client: FilterState {
                    from_client: true,
                    deflate: false,
                    max_message: 1 << 20,
                    pending: vec![],
                    left: 4000,
                    fin: false,
                    in_message: true,
                    message_bytes: 9000,
                },
                from_up: FilterState {
                    from_client: false,
                    deflate: true,
                    max_message: 1 << 20,
                    pending: vec![0x82, 0x7e],
                    left: 0,
                    fin: true,
                    in_message: false,
                    message_bytes: 0,
                },
                backend: "ws://10.0.0.1:8000/ws".into(),
            }
        } else {
            ModeState::Echo(EchoState {
                max_message: 1 << 20,
                buf: b"half a text fra".to_vec(),
                frame: Some(Header {
                    fin: true,
                    rsv: 0,
                    opcode: 1,
                    mask: Some([1, 2, 3, 4]),
                    len: 30,
                    size: 6,
                }),
                got: 15,
                streaming: false,
                message: Some(1),
                message_bytes: 30,
                utf8_carry: [0xe2, 0x82, 0, 0],
                utf8_n: 2,
                deflate: true,
            })
        };
        SessionState {
            id,
            sub: "alice".into(),
            ip: "2001:db8::7".parse().unwrap(),
            since: 1_700_000_000,
            jti: Some("j-1".into()),
            iat: None,
            last_seen: 1234,
            ping_interval: 20_000,
            pong_timeout: 10_000,
            idle_timeout: 0,
            write_timeout: 10_000,
            max_out: 4 << 20,
            expires: 99_000,
            lifetime: u64::MAX,
            msgs_per_s: 2.5,
            reason: None,
            closing_until: u64::MAX,
            next_ping: 21_000,
            ping_sent: u64::MAX,
            ping_due: false,
            client_paused: false,
            last_data: 1000,
            rate_tokens: 1.5,
            rate_at: 900,
            client: side(b"queued toward the client"),
            mode,
        }
    }

    fn stream() -> (Vec<Moved>, Vec<u8>) {
        let moved = vec![
            Moved { client_fd: 0, up_fd: Some(1), lease: Some("0001/node/3".into()), state: sample(3, true) },
            Moved { client_fd: 2, up_fd: None, lease: None, state: sample(7, false) },
        ];
        let bytes = encode_stream(&moved);
        (moved, bytes)
    }

    #[test]
    fn sessions_round_trip_field_for_field() {
        let (moved, bytes) = stream();
        assert_eq!(decode_stream(&bytes, 3).unwrap(), moved);
        let p = Preamble {
            clock_ms: 77,
            wall_ms: 1_700_000_000_123,
            instance: "a1b2c3".into(),
            next_id: 42,
            node: "00ff".into(),
        };
        assert_eq!(decode_preamble(&encode_preamble(&p)).unwrap(), p);
    }

    /// Every cut of the stream is refused, none half read.
    #[test]
    fn a_truncated_stream_is_refused_at_every_length() {
        let (_, bytes) = stream();
        for n in 0..bytes.len() {
            let e = decode_stream(&bytes[..n], 3).unwrap_err();
            assert!(
                matches!(e, StateError::Truncated | StateError::Magic | StateError::Invalid(_)),
                "{n}: {e}"
            );
        }
    }

    #[test]
    fn another_version_is_refused_by_its_header_and_named() {
        let (_, mut bytes) = stream();
        bytes[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = decode_stream(&bytes, 3).unwrap_err();
        assert_eq!(e, StateError::Version { got: VERSION + 1 });
        assert!(e.to_string().contains(&format!("v{}", VERSION + 1)), "{e}");
        let mut p = encode_preamble(&Preamble {
            clock_ms: 1,
            wall_ms: 2,
            instance: "x".into(),
            next_id: 1,
            node: String::new(),
        });
        p[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(decode_preamble(&p).unwrap_err(), StateError::Version { got: 9 });
        assert_eq!(decode_stream(b"GET / HTTP/1.1", 0).unwrap_err(), StateError::Magic);
    }

    proptest::proptest! {
        /// Any byte of a valid stream changed, or any bytes at all: parsed
        /// or refused, never a panic, never a huge allocation.
        #[test]
        fn corrupted_streams_are_refused_not_panicked_on(at in 0usize..2000, to in proptest::prelude::any::<u8>(), junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let (_, mut bytes) = stream();
            let i = at % bytes.len();
            bytes[i] = to;
            let _ = decode_stream(&bytes, 3);
            let _ = decode_stream(&junk, 3);
            let mut framed = b"PCST\x01\x00".to_vec();
            framed.extend_from_slice(&junk);
            let _ = decode_stream(&framed, 3);
            let _ = decode_preamble(&junk);
        }
    }

    #[test]
    fn descriptors_are_named_once_and_within_those_that_came() {
        let (_, bytes) = stream();
        assert_eq!(decode_stream(&bytes, 2).unwrap_err(), StateError::Invalid("descriptor index"));
        let twice = encode_stream(&[
            Moved { client_fd: 0, up_fd: None, lease: None, state: sample(1, false) },
            Moved { client_fd: 0, up_fd: None, lease: None, state: sample(2, false) },
        ]);
        assert_eq!(decode_stream(&twice, 2).unwrap_err(), StateError::Invalid("descriptor index"));
        // An echo session sent with a backend socket is not one a session left.
        let odd =
            encode_stream(&[Moved { client_fd: 0, up_fd: Some(1), lease: None, state: sample(1, false) }]);
        assert!(matches!(decode_stream(&odd, 2).unwrap_err(), StateError::Invalid(_)));
    }
}
