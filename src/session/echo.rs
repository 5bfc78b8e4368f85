//! Echo mode: the gateway is the WebSocket endpoint, so it validates
//! fully (RFC 6455 §5, §7.4, §8.1) and answers each data frame with the
//! same frame unmasked, fragments as fragments, pings with pongs, a close
//! with a close.
//!
//! Text is checked for UTF-8 as its bytes arrive, so an invalid sequence
//! fails the connection (1007) in the fragment, even the read, that
//! carries it. A text frame is echoed once whole (the 1007 close may have
//! to follow it, and a frame cannot be cut); its buffer is released as soon
//! as it is handed to the writer. A binary frame cannot fail half way, so
//! it streams back as it arrives and is never held whole: memory returns
//! after a large message either way.

use crate::relay::frame::{
    self, Header, BINARY, CLOSE, CONTINUATION, MAX_CONTROL_PAYLOAD, MAX_HEADER_BYTES, PING, PONG, TEXT,
};

/// The per-thread buffer streamed binary frames are unmasked into: a whole
/// read fits, so it leaves as one piece, written at once when nothing waits.
const UNMASKED_BYTES: usize = 64 * 1024 + MAX_HEADER_BYTES;

thread_local! {
    /// Off a page boundary for the same reason as the read buffer.
    static UNMASKED: std::cell::RefCell<super::OffPage> =
        std::cell::RefCell::new(super::OffPage::new(UNMASKED_BYTES));
}

/// Why the endpoint fails the connection, with its close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 1002.
    Protocol(&'static str),
    /// 1007: invalid UTF-8 in a text message or a close reason.
    InvalidUtf8,
    /// 1009.
    TooBig,
}

/// What the endpoint asks of the session, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// A data message begins (the rate limit; `false` refuses it).
    MessageStart,
    /// Bytes for the client.
    Send(&'a [u8]),
    /// A data message was echoed whole; its payload bytes.
    MessageEnd(u64),
    /// A pong arrived (life).
    Pong,
    /// The client closed with this code (or none); the reply is the
    /// session's to send. Nothing after it is read.
    Close(Option<u16>),
}

/// Incremental UTF-8 validation across reads and fragments.
#[derive(Debug, Default)]
pub struct Utf8 {
    /// The start of a sequence cut by the end of the last piece.
    carry: [u8; 4],
    n: u8,
}

impl Utf8 {
    /// False as soon as the bytes so far cannot be the start of valid UTF-8.
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        while self.n > 0 {
            let Some((&b, rest)) = data.split_first() else { return true };
            data = rest;
            self.carry[usize::from(self.n)] = b;
            self.n += 1;
            match std::str::from_utf8(&self.carry[..usize::from(self.n)]) {
                Ok(_) => self.n = 0,
                Err(e) if e.error_len().is_some() => return false,
                // Still incomplete; at most 3 bytes wait (a 4th completes or fails).
                Err(_) => {}
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                let tail = &data[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.n = tail.len() as u8;
                true
            }
        }
    }

    /// True when no sequence is left open.
    pub fn complete(&self) -> bool {
        self.n == 0
    }
}

/// The endpoint's state. Idle, it holds no allocation.
#[derive(Debug)]
pub struct Echo {
    max_message: u64,
    /// Between frames, a header or control frame split across reads; in a
    /// text frame, its payload so far, unmasked. One buffer serves both:
    /// they are never held at once.
    buf: Vec<u8>,
    /// The data frame being received and its payload bytes so far.
    frame: Option<Header>,
    got: u64,
    /// The current frame streams back as it arrives (binary).
    streaming: bool,
    /// Opcode of the open message (TEXT or BINARY), if one is open.
    message: Option<u8>,
    message_bytes: u64,
    utf8: Utf8,
}

impl Echo {
    pub fn new(max_message: u64) -> Echo {
        Echo {
            max_message,
            buf: Vec::new(),
            frame: None,
            got: 0,
            streaming: false,
            message: None,
            message_bytes: 0,
            utf8: Utf8::default(),
        }
    }

    /// Feeds bytes as read from the client. `Ok(false)`: stopped by the
    /// caller or by a close. After an `Err` the caller fails the connection.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(Action<'_>) -> bool,
    ) -> Result<bool, Refusal> {
        loop {
            if let Some(h) = self.frame {
                if input.is_empty() {
                    return Ok(true);
                }
                if self.streaming {
                    let n = usize::try_from(h.len - self.got).unwrap_or(usize::MAX).min(input.len());
                    let go = UNMASKED.with(|cell| {
                        // Not re-entered: `on` never feeds an echo.
                        let Ok(mut unmasked) = cell.try_borrow_mut() else { return false };
                        let buf = unmasked.buf();
                        // The frame's header goes out with its first bytes:
                        // one piece, so one write, per read.
                        let mut at = 0;
                        if self.got == 0 {
                            let (head, n) = echo_header(&h);
                            buf[..n].copy_from_slice(&head[..n]);
                            at = n;
                        }
                        for piece in input[..n].chunks(UNMASKED_BYTES - MAX_HEADER_BYTES) {
                            let b = &mut buf[at..at + piece.len()];
                            b.copy_from_slice(piece);
                            if let Some(m) = h.mask {
                                frame::apply_mask(b, m, self.got);
                            }
                            self.got += piece.len() as u64;
                            if !on(Action::Send(&buf[..at + piece.len()])) {
                                return false;
                            }
                            at = 0;
                        }
                        true
                    });
                    if !go {
                        return Ok(false);
                    }
                    input = &input[n..];
                    if self.got == h.len && !self.stream_done(h, on) {
                        return Ok(false);
                    }
                    continue;
                }
                let got = self.buf.len() as u64;
                let n = usize::try_from(h.len - got).unwrap_or(usize::MAX).min(input.len());
                let at = self.buf.len();
                self.buf.extend_from_slice(&input[..n]);
                input = &input[n..];
                if let Some(m) = h.mask {
                    frame::apply_mask(&mut self.buf[at..], m, got);
                }
                if self.message == Some(TEXT) && !self.utf8.feed(&self.buf[at..]) {
                    return Err(Refusal::InvalidUtf8);
                }
                if self.buf.len() as u64 == h.len && !self.frame_done(h, on)? {
                    return Ok(false);
                }
                continue;
            }
            if input.is_empty() {
                return Ok(true);
            }
            let old = self.buf.len();
            let joined: &[u8] = if old == 0 {
                input
            } else {
                let take = input.len().min(MAX_HEADER_BYTES + MAX_CONTROL_PAYLOAD - old);
                self.buf.extend_from_slice(&input[..take]);
                &self.buf
            };
            let Some(h) = frame::parse(joined).map_err(Refusal::Protocol)? else {
                if old == 0 {
                    self.buf = input.to_vec();
                }
                return Ok(true);
            };
            self.check(&h)?;
            if h.is_control() {
                let need = h.size + h.len as usize;
                if joined.len() < need {
                    if old == 0 {
                        self.buf = input.to_vec();
                    }
                    return Ok(true);
                }
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let p = &mut payload[..h.len as usize];
                p.copy_from_slice(&joined[h.size..need]);
                if let Some(m) = h.mask {
                    frame::apply_mask(p, m, 0);
                }
                input = &input[need - old..];
                self.buf = Vec::new();
                if !control(h.opcode, p, on)? {
                    return Ok(false);
                }
                continue;
            }
            input = &input[h.size - old..];
            self.buf = Vec::new();
            if h.opcode != CONTINUATION {
                if !on(Action::MessageStart) {
                    return Ok(false);
                }
                self.message = Some(h.opcode);
                self.utf8 = Utf8::default();
            }
            self.message_bytes += h.len;
            self.frame = Some(h);
            self.got = 0;
            if self.message == Some(BINARY) {
                self.streaming = true;
                // The header leaves with the first payload bytes; an empty
                // frame has none to wait for.
                if h.len == 0 {
                    let (head, n) = echo_header(&h);
                    if !(on(Action::Send(&head[..n])) && self.stream_done(h, on)) {
                        return Ok(false);
                    }
                }
                continue;
            }
            // Grown as bytes arrive, not reserved at the declared length:
            // a client announcing 1 MiB and sending nothing costs nothing.
            self.buf = Vec::with_capacity(usize::try_from(h.len).unwrap_or(usize::MAX).min(16 * 1024));
            if h.len == 0 && !self.frame_done(h, on)? {
                return Ok(false);
            }
        }
    }

    /// True between echoed frames: the session may put a frame of its own
    /// into the stream toward the client.
    pub fn at_boundary(&self) -> bool {
        !self.streaming
    }

    /// A streamed frame has passed whole.
    fn stream_done(&mut self, h: Header, on: &mut impl FnMut(Action<'_>) -> bool) -> bool {
        self.frame = None;
        self.streaming = false;
        if h.fin {
            self.message = None;
            return on(Action::MessageEnd(std::mem::take(&mut self.message_bytes)));
        }
        true
    }

    /// Echoes a whole data frame and frees its buffer.
    fn frame_done(&mut self, h: Header, on: &mut impl FnMut(Action<'_>) -> bool) -> Result<bool, Refusal> {
        if h.fin && self.message == Some(TEXT) && !self.utf8.complete() {
            return Err(Refusal::InvalidUtf8);
        }
        self.frame = None;
        let payload = std::mem::take(&mut self.buf);
        let mut head = Vec::with_capacity(MAX_HEADER_BYTES);
        frame::put_header(&mut head, h.fin, h.opcode, payload.len(), None);
        if !(on(Action::Send(&head)) && on(Action::Send(&payload))) {
            return Ok(false);
        }
        if h.fin {
            self.message = None;
            return Ok(on(Action::MessageEnd(std::mem::take(&mut self.message_bytes))));
        }
        Ok(true)
    }

    fn check(&self, h: &Header) -> Result<(), Refusal> {
        if h.rsv != 0 {
            return Err(Refusal::Protocol("RSV bits set without an extension"));
        }
        if !matches!(h.opcode, 0x0..=0x2 | 0x8..=0xA) {
            return Err(Refusal::Protocol("reserved opcode"));
        }
        if h.mask.is_none() {
            return Err(Refusal::Protocol("unmasked frame from the client"));
        }
        if h.is_control() {
            if !h.fin {
                return Err(Refusal::Protocol("fragmented control frame"));
            }
            if h.len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(Refusal::Protocol("control frame over 125 bytes"));
            }
            return Ok(());
        }
        match (h.opcode == CONTINUATION, self.message.is_some()) {
            (true, false) => return Err(Refusal::Protocol("continuation outside a message")),
            (false, true) => return Err(Refusal::Protocol("new message inside a fragmented one")),
            _ => {}
        }
        debug_assert!(h.opcode == CONTINUATION || h.opcode == TEXT || h.opcode == BINARY);
        if self.message_bytes.saturating_add(h.len) > self.max_message {
            return Err(Refusal::TooBig);
        }
        Ok(())
    }
}

/// The echo's header for a client frame: same FIN, opcode and length, no mask.
fn echo_header(h: &Header) -> ([u8; MAX_HEADER_BYTES], usize) {
    frame::header(h.fin, h.opcode, h.len, None)
}

/// Answers a whole control frame.
fn control(opcode: u8, payload: &[u8], on: &mut impl FnMut(Action<'_>) -> bool) -> Result<bool, Refusal> {
    match opcode {
        PING => Ok(on(Action::Send(&frame::control(PONG, payload, None)))),
        PONG => Ok(on(Action::Pong)),
        CLOSE => {
            let code = match payload {
                [] => None,
                [_] => return Err(Refusal::Protocol("close payload of one byte")),
                [_, _, reason @ ..] => {
                    let code = frame::close_code(payload).unwrap_or(0);
                    if !frame::close_code_valid(code) {
                        return Err(Refusal::Protocol("invalid close code"));
                    }
                    if std::str::from_utf8(reason).is_err() {
                        return Err(Refusal::InvalidUtf8);
                    }
                    Some(code)
                }
            };
            on(Action::Close(code));
            Ok(false)
        }
        _ => Ok(true),
    }
}

/// An [`Echo`] as plain data, for a binary upgrade (a text frame half
/// received, a binary frame half streamed back, a UTF-8 sequence cut by a
/// read all continue in the new process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoState {
    pub max_message: u64,
    pub buf: Vec<u8>,
    pub frame: Option<Header>,
    pub got: u64,
    pub streaming: bool,
    pub message: Option<u8>,
    pub message_bytes: u64,
    pub utf8_carry: [u8; 4],
    pub utf8_n: u8,
}

impl Echo {
    /// Its state, as plain data.
    pub fn snapshot(&self) -> EchoState {
        EchoState {
            max_message: self.max_message,
            buf: self.buf.clone(),
            frame: self.frame,
            got: self.got,
            streaming: self.streaming,
            message: self.message,
            message_bytes: self.message_bytes,
            utf8_carry: self.utf8.carry,
            utf8_n: self.utf8.n,
        }
    }

    /// An endpoint in state `s`; `None` when `s` could not come from one.
    pub fn restore(s: EchoState) -> Option<Echo> {
        let sane = s.utf8_n <= 3
            && s.buf.len() as u64 <= s.max_message.max((MAX_HEADER_BYTES + MAX_CONTROL_PAYLOAD) as u64)
            && s.frame.is_none_or(|h| s.got <= h.len && !h.is_control())
            && (!s.streaming || s.frame.is_some())
            && s.message.is_none_or(|m| m == TEXT || m == BINARY);
        if !sane {
            return None;
        }
        Some(Echo {
            max_message: s.max_message,
            buf: s.buf,
            frame: s.frame,
            got: s.got,
            streaming: s.streaming,
            message: s.message,
            message_bytes: s.message_bytes,
            utf8: Utf8 { carry: s.utf8_carry, n: s.utf8_n },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let m = [5, 6, 7, 8];
        let mut f = Vec::new();
        frame::put_header(&mut f, fin, opcode, payload.len(), Some(m));
        let at = f.len();
        f.extend_from_slice(payload);
        frame::apply_mask(&mut f[at..], m, 0);
        f
    }

    fn run(input: &[u8], step: usize) -> (Vec<u8>, Vec<String>, Result<bool, Refusal>) {
        let mut e = Echo::new(1 << 20);
        let mut out = Vec::new();
        let mut log = Vec::new();
        let mut r = Ok(true);
        for piece in input.chunks(step) {
            r = e.feed(piece, &mut |a| {
                match a {
                    Action::Send(b) => out.extend_from_slice(b),
                    other => log.push(format!("{other:?}")),
                }
                true
            });
            if r != Ok(true) {
                break;
            }
        }
        (out, log, r)
    }

    #[test]
    fn echoes_fragments_unmasked_and_answers_pings_at_any_split() {
        let mut input = masked(false, TEXT, "h\u{e9}".as_bytes());
        input.extend(masked(true, PING, b"p"));
        input.extend(masked(true, CONTINUATION, b"llo"));
        let mut want = vec![0x01, 3, b'h', 0xC3, 0xA9, 0x8A, 1, b'p', 0x80, 3, b'l', b'l', b'o'];
        input.extend(masked(true, CLOSE, &1000u16.to_be_bytes()));
        for step in [1, 2, 5, 100] {
            let (out, log, r) = run(&input, step);
            assert_eq!(r, Ok(false), "stopped at the close");
            assert_eq!(out, want, "step {step}");
            assert_eq!(log, vec!["MessageStart", "MessageEnd(6)", "Close(Some(1000))"]);
        }
        want.clear();
    }

    #[test]
    fn invalid_utf8_fails_in_the_piece_that_carries_it() {
        // Valid start, then a byte that can never follow: refused at that
        // byte even though the frame is not complete.
        let mut input = masked(true, TEXT, &[b'a', 0xF4, 0x90, 0x80, 0x80, b'z', b'z']);
        input.truncate(6 + 3);
        let (_, _, r) = run(&input, 1);
        assert_eq!(r, Err(Refusal::InvalidUtf8));
        // A sequence left open at the end of the message.
        let (_, _, r) = run(&masked(true, TEXT, &[0xE2, 0x82]), 100);
        assert_eq!(r, Err(Refusal::InvalidUtf8));
        // Split across fragments, valid.
        let mut input = masked(false, TEXT, &[0xE2, 0x82]);
        input.extend(masked(true, CONTINUATION, &[0xAC]));
        assert_eq!(run(&input, 1).2, Ok(true));
        // Close reasons too; close codes and lengths.
        assert_eq!(run(&masked(true, CLOSE, &[0x03, 0xE8, 0xFF]), 9).2, Err(Refusal::InvalidUtf8));
        assert!(matches!(run(&masked(true, CLOSE, &[0x03]), 9).2, Err(Refusal::Protocol(_))));
        assert!(matches!(run(&masked(true, CLOSE, &1005u16.to_be_bytes()), 9).2, Err(Refusal::Protocol(_))));
    }

    #[test]
    fn binary_frames_stream_back_without_being_held() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let input = masked(true, BINARY, &payload);
        let mut e = Echo::new(1 << 20);
        let mut out = Vec::new();
        let mut mid = false;
        for piece in input.chunks(3000) {
            assert_eq!(
                e.feed(piece, &mut |a| {
                    if let Action::Send(b) = a {
                        out.extend_from_slice(b)
                    }
                    true
                }),
                Ok(true)
            );
            mid |= !e.at_boundary();
            assert_eq!(e.buf.capacity(), 0, "nothing held");
        }
        assert!(mid && e.at_boundary());
        let mut want = Vec::new();
        frame::put_header(&mut want, true, BINARY, payload.len(), None);
        want.extend_from_slice(&payload);
        assert_eq!(out, want);
    }

    #[test]
    fn refuses_what_an_endpoint_must() {
        let cases = [
            vec![0x81, 0x00],                 // unmasked
            masked(true, 0x3, b""),           // reserved opcode
            masked(false, PING, b""),         // fragmented control
            masked(true, CONTINUATION, b"x"), // nothing to continue
            {
                let mut f = masked(true, TEXT, b"x");
                f[0] |= 0x40;
                f
            },
        ];
        for c in cases {
            assert!(matches!(run(&c, 3).2, Err(Refusal::Protocol(_))), "{c:?}");
        }
        let mut e = Echo::new(10);
        assert_eq!(e.feed(&masked(true, BINARY, &[0; 11]), &mut |_| true), Err(Refusal::TooBig));
    }
}
