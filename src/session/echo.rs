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
//!
//! With `permessage-deflate` agreed (`deflate`), a message whose first
//! frame has RSV1 set is inflated as it arrives, into a per-thread buffer,
//! and echoed uncompressed in fragments of what came out (at most one per
//! read and buffer): its size limit applies to the inflated bytes.

use super::deflate::{Inflater, TAIL};
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
    /// 1007: a compressed message that does not inflate.
    BadDeflate,
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
    /// Has the client's side room for more of a compressed message's
    /// echo (`false` pauses the inflating until the session resumes it)?
    Room,
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
    /// `limits.max_message_bytes` (validated to at most 1 GiB; a larger
    /// one built in code is held at 4 GiB): 4 bytes, so that `deflate`
    /// fits where the other 4 were and an idle echo stays 88 bytes.
    max_message: u32,
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
    /// Payload bytes of the open message so far: as received, or as
    /// inflated for a compressed one.
    message_bytes: u64,
    utf8: Utf8,
    /// `permessage-deflate` was agreed at the upgrade.
    deflate: bool,
    /// The open message is compressed: its inflater, held only while it
    /// is open.
    inflater: Option<Box<Inflater>>,
}

impl Echo {
    pub fn new(max_message: u64, deflate: bool) -> Echo {
        Echo {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            buf: Vec::new(),
            frame: None,
            got: 0,
            streaming: false,
            message: None,
            message_bytes: 0,
            utf8: Utf8::default(),
            deflate,
            inflater: None,
        }
    }

    /// Feeds bytes as read from the client. `Ok(false)`: stopped by the
    /// caller or by a close. After an `Err` the caller fails the connection.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(Action<'_>) -> bool,
    ) -> Result<bool, Refusal> {
        if self.paused() {
            // Not the session's way (it resumes first), but the order holds.
            self.buf.extend_from_slice(input);
            return Ok(true);
        }
        loop {
            if let Some(h) = self.frame {
                if input.is_empty() {
                    return Ok(true);
                }
                if self.inflater.is_some() {
                    let n = usize::try_from(h.len - self.got).unwrap_or(usize::MAX).min(input.len());
                    match self.inflate_piece(&input[..n], h, on)? {
                        Step::Go => input = &input[n..],
                        Step::Stop => return Ok(false),
                        Step::Paused(taken) => return Ok(self.pause(&input[taken..])),
                    }
                    continue;
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
                if h.rsv & RSV1 != 0 {
                    self.inflater = Some(Box::new(Inflater::start()));
                }
            }
            self.frame = Some(h);
            self.got = 0;
            if self.inflater.is_some() {
                // Counted as it inflates; an empty frame ends at once.
                if h.len == 0 {
                    match self.inflate_piece(&[], h, on)? {
                        Step::Go => {}
                        Step::Stop => return Ok(false),
                        Step::Paused(_) => return Ok(self.pause(input)),
                    }
                }
                continue;
            }
            self.message_bytes += h.len;
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

    /// A piece of a compressed frame's payload (masked, as received):
    /// inflated into the per-thread buffer, whatever came out echoed as a
    /// fragment of its own, and the message ended with its last frame.
    /// Paused (with how much of `masked` it took) once the client's side
    /// stops taking the echo.
    fn inflate_piece(
        &mut self,
        masked: &[u8],
        h: Header,
        on: &mut impl FnMut(Action<'_>) -> bool,
    ) -> Result<Step, Refusal> {
        UNMASKED.with(|cell| {
            // Not re-entered: `on` never feeds an echo.
            let Ok(mut out) = cell.try_borrow_mut() else { return Ok(Step::Stop) };
            let out = out.buf();
            // Inflated bytes in `out`, after room for their frame's header.
            let mut filled = 0;
            let mut chunk = [0u8; 4096];
            let mut taken = 0;
            for piece in masked.chunks(chunk.len()) {
                let c = &mut chunk[..piece.len()];
                c.copy_from_slice(piece);
                if let Some(m) = h.mask {
                    frame::apply_mask(c, m, self.got);
                }
                match self.inflate_into(c, out, &mut filled, true, on)? {
                    Inflated::Done => {}
                    Inflated::Stop => return Ok(Step::Stop),
                    Inflated::Paused(used) => {
                        self.got += used as u64;
                        let go = filled == 0 || self.emit(out, filled, false, on)?;
                        return Ok(if go { Step::Paused(taken + used) } else { Step::Stop });
                    }
                }
                self.got += piece.len() as u64;
                taken += piece.len();
            }
            // What the inflater still holds from this input.
            match self.inflate_into(&[], out, &mut filled, true, on)? {
                Inflated::Done => {}
                Inflated::Stop => return Ok(Step::Stop),
                Inflated::Paused(_) => {
                    let go = filled == 0 || self.emit(out, filled, false, on)?;
                    return Ok(if go { Step::Paused(masked.len()) } else { Step::Stop });
                }
            }
            if self.got < h.len || !h.fin {
                if self.got == h.len {
                    self.frame = None;
                }
                let go = filled == 0 || self.emit(out, filled, false, on)?;
                return Ok(if go { Step::Go } else { Step::Stop });
            }
            // The tail's output is what the inflater still holds: not paused.
            if self.inflate_into(&TAIL, out, &mut filled, false, on)? != Inflated::Done
                || !self.emit(out, filled, true, on)?
            {
                return Ok(Step::Stop);
            }
            self.frame = None;
            self.message = None;
            // The inflater goes back to the thread's spare.
            self.inflater = None;
            let go = on(Action::MessageEnd(std::mem::take(&mut self.message_bytes)));
            Ok(if go { Step::Go } else { Step::Stop })
        })
    }

    /// Inflates `input` into `out` after its `filled` bytes, echoing a
    /// fragment each time `out` is full; every byte that comes out is
    /// counted against the limit before more is inflated. With `may_pause`,
    /// it pauses after a full buffer that the client's side did not take.
    fn inflate_into(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        filled: &mut usize,
        may_pause: bool,
        on: &mut impl FnMut(Action<'_>) -> bool,
    ) -> Result<Inflated, Refusal> {
        let room = out.len() - MAX_HEADER_BYTES;
        let mut used = 0;
        loop {
            if *filled == room {
                if !self.emit(out, *filled, false, on)? {
                    return Ok(Inflated::Stop);
                }
                *filled = 0;
                // More may come out of what it took: pause while the
                // client's side is backed up.
                if may_pause && !on(Action::Room) {
                    return Ok(Inflated::Paused(used));
                }
            }
            let Some(inf) = self.inflater.as_mut() else { return Ok(Inflated::Done) };
            if inf.ended {
                // A final block came: what follows is the sender's tail.
                return Ok(Inflated::Done);
            }
            let at = MAX_HEADER_BYTES + *filled;
            let (n, wrote, end) = inf.run(&input[used..], &mut out[at..]).map_err(|_| Refusal::BadDeflate)?;
            inf.ended = end;
            used += n;
            *filled += wrote;
            self.message_bytes += wrote as u64;
            if self.message_bytes > u64::from(self.max_message) {
                return Err(Refusal::TooBig);
            }
            if n == 0 && wrote == 0 {
                return if used == input.len() || end {
                    Ok(Inflated::Done)
                } else {
                    Err(Refusal::BadDeflate)
                };
            }
        }
    }

    /// True while a compressed message's input waits for the client's side
    /// to take more of its echo: the session calls [`Echo::resume`], not
    /// `feed`, and reads nothing more from the client meanwhile.
    pub fn paused(&self) -> bool {
        self.inflater.as_ref().is_some_and(|i| i.paused)
    }

    /// Goes on where a pause stopped: first what the inflater holds (and
    /// the end of its frame), then the input kept.
    pub fn resume(&mut self, on: &mut impl FnMut(Action<'_>) -> bool) -> Result<bool, Refusal> {
        let Some(inf) = self.inflater.as_mut() else { return Ok(true) };
        inf.paused = false;
        let pending = std::mem::take(&mut self.buf);
        if let Some(h) = self.frame {
            match self.inflate_piece(&[], h, on)? {
                Step::Go => {}
                Step::Stop => return Ok(false),
                Step::Paused(_) => return Ok(self.pause(&pending)),
            }
        }
        self.feed(&pending, on)
    }

    /// Keeps `rest`, the input not yet taken, until [`Echo::resume`]: in
    /// the buffer a compressed frame leaves unused.
    fn pause(&mut self, rest: &[u8]) -> bool {
        self.buf = rest.to_vec();
        if let Some(inf) = self.inflater.as_mut() {
            inf.paused = true;
        }
        true
    }

    /// Echoes the `filled` inflated bytes in `out` as one frame: the
    /// message's opcode first, continuations after.
    fn emit(
        &mut self,
        out: &mut [u8],
        filled: usize,
        fin: bool,
        on: &mut impl FnMut(Action<'_>) -> bool,
    ) -> Result<bool, Refusal> {
        let data = &out[MAX_HEADER_BYTES..MAX_HEADER_BYTES + filled];
        if self.message == Some(TEXT) && (!self.utf8.feed(data) || (fin && !self.utf8.complete())) {
            return Err(Refusal::InvalidUtf8);
        }
        let Some(inf) = self.inflater.as_mut() else { return Ok(true) };
        let opcode = if inf.sent { CONTINUATION } else { self.message.unwrap_or(BINARY) };
        inf.sent = true;
        let (head, n) = frame::header(fin, opcode, filled as u64, None);
        let start = MAX_HEADER_BYTES - n;
        out[start..MAX_HEADER_BYTES].copy_from_slice(&head[..n]);
        Ok(on(Action::Send(&out[start..MAX_HEADER_BYTES + filled])))
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
        let compressed_start = h.rsv == RSV1 && self.deflate && matches!(h.opcode, TEXT | BINARY);
        if h.rsv != 0 && !compressed_start {
            return Err(Refusal::Protocol(if self.deflate {
                "RSV bits set other than RSV1 on a message's first frame"
            } else {
                "RSV bits set without an extension"
            }));
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
        if compressed_start || (h.opcode == CONTINUATION && self.inflater.is_some()) {
            // The limit is on what inflates (counted as it does); a frame
            // is refused at once only if even stored blocks (5 bytes of
            // overhead per 64 KiB) could not bring it under the limit.
            let max = u64::from(self.max_message);
            if h.len > max + max / 8192 + 1024 {
                return Err(Refusal::TooBig);
            }
            return Ok(());
        }
        if self.message_bytes.saturating_add(h.len) > u64::from(self.max_message) {
            return Err(Refusal::TooBig);
        }
        Ok(())
    }
}

/// How a compressed frame's piece went.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Go,
    /// The caller (or a close) stopped it.
    Stop,
    /// Paused after taking this many bytes of the piece.
    Paused(usize),
}

/// How inflating one chunk went.
#[derive(Debug, PartialEq, Eq)]
enum Inflated {
    Done,
    Stop,
    /// Paused after this many bytes of the chunk.
    Paused(usize),
}

/// RSV1 in [`Header::rsv`]: a compressed message's first frame.
const RSV1: u8 = 0b100;

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
    /// `permessage-deflate` was agreed (no compressed message is open:
    /// [`Echo::movable`]).
    pub deflate: bool,
}

impl Echo {
    /// Whether its state is plain data: not while a compressed message is
    /// being inflated.
    pub fn movable(&self) -> bool {
        self.inflater.is_none()
    }

    /// Its state, as plain data (see [`Echo::movable`]).
    pub fn snapshot(&self) -> EchoState {
        EchoState {
            max_message: u64::from(self.max_message),
            buf: self.buf.clone(),
            frame: self.frame,
            got: self.got,
            streaming: self.streaming,
            message: self.message,
            message_bytes: self.message_bytes,
            utf8_carry: self.utf8.carry,
            utf8_n: self.utf8.n,
            deflate: self.deflate,
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
            max_message: u32::try_from(s.max_message).unwrap_or(u32::MAX),
            buf: s.buf,
            frame: s.frame,
            got: s.got,
            streaming: s.streaming,
            message: s.message,
            message_bytes: s.message_bytes,
            utf8: Utf8 { carry: s.utf8_carry, n: s.utf8_n },
            deflate: s.deflate,
            inflater: None,
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
        let mut e = Echo::new(1 << 20, false);
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
        let mut e = Echo::new(1 << 20, false);
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
        let mut e = Echo::new(10, false);
        assert_eq!(e.feed(&masked(true, BINARY, &[0; 11]), &mut |_| true), Err(Refusal::TooBig));
    }

    /// A compressed frame as a client sends it: RSV1 on the first frame,
    /// the sender's tail removed (RFC 7692 §7.2.1).
    fn compressed(fin: bool, opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = masked(fin, opcode, payload);
        if rsv1 {
            f[0] |= 0x40;
        }
        f
    }

    /// `data` compressed as one sync-flushed stream, tail removed.
    fn deflated(data: &[u8]) -> Vec<u8> {
        use miniz_oxide::deflate::core::{
            compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
        };
        let mut c = CompressorOxide::new(create_comp_flags_from_zip_params(6, -15, 0));
        let mut out = vec![0u8; data.len() + 1024];
        let (_, _, n) = compress(&mut c, data, &mut out, TDEFLFlush::Sync);
        out.truncate(n);
        assert_eq!(out[n - 4..], TAIL);
        out.truncate(n - 4);
        out
    }

    fn run_with(e: &mut Echo, input: &[u8], step: usize) -> (Vec<u8>, Vec<String>, Result<bool, Refusal>) {
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

    /// Reads the echoed frames back: (fin, opcode, rsv, payload) each.
    fn frames(mut out: &[u8]) -> Vec<(bool, u8, u8, Vec<u8>)> {
        let mut v = Vec::new();
        while let Ok(Some(h)) = frame::parse(out) {
            let end = h.size + h.len as usize;
            v.push((h.fin, h.opcode, h.rsv, out[h.size..end].to_vec()));
            out = &out[end..];
        }
        assert!(out.is_empty(), "trailing bytes");
        v
    }

    #[test]
    fn compressed_messages_are_inflated_and_echoed_uncompressed_at_any_split() {
        let text = "caf\u{e9} ".repeat(5000);
        let z = deflated(text.as_bytes());
        // In two fragments, a ping between them, then an uncompressed message.
        let (a, b) = z.split_at(z.len() / 3);
        let mut input = compressed(false, TEXT, true, a);
        input.extend(masked(true, PING, b"p"));
        input.extend(compressed(true, CONTINUATION, false, b));
        input.extend(masked(true, BINARY, b"plain"));
        for step in [1, 7, 1000, 1 << 20] {
            let mut e = Echo::new(1 << 20, true);
            let (out, log, r) = run_with(&mut e, &input, step);
            assert_eq!(r, Ok(true), "step {step}");
            assert_eq!(
                log,
                vec![
                    "MessageStart".to_string(),
                    format!("MessageEnd({})", text.len()),
                    "MessageStart".into(),
                    "MessageEnd(5)".into()
                ]
            );
            let f = frames(&out);
            assert!(f.iter().all(|(_, _, rsv, _)| *rsv == 0), "echoed uncompressed");
            let mut message = Vec::new();
            let mut pong = false;
            for (i, (fin, op, _, p)) in f.iter().enumerate() {
                match *op {
                    PONG => pong = true,
                    BINARY => assert_eq!((*fin, &p[..]), (true, &b"plain"[..])),
                    TEXT => {
                        assert_eq!(i, 0);
                        message.extend_from_slice(p);
                    }
                    CONTINUATION => message.extend_from_slice(p),
                    _ => panic!("opcode {op}"),
                }
            }
            assert!(pong);
            assert_eq!(String::from_utf8(message).unwrap(), text, "step {step}");
            assert!(e.inflater.is_none() && e.buf.capacity() == 0, "nothing held after the message");
        }
        // A small message in one read is one frame.
        let mut e = Echo::new(1 << 20, true);
        let (out, _, _) = run_with(&mut e, &compressed(true, TEXT, true, &deflated(b"hi")), 100);
        assert_eq!(frames(&out), vec![(true, TEXT, 0, b"hi".to_vec())]);
        // An empty compressed message (RFC 7692 §7.2.3.6: a lone 0x00).
        let (out, _, r) = run_with(&mut e, &compressed(true, BINARY, true, &[0x00]), 100);
        assert_eq!((frames(&out), r), (vec![(true, BINARY, 0, vec![])], Ok(true)));
    }

    #[test]
    fn a_compression_bomb_is_too_big_within_one_buffer() {
        // 64 MiB of zeros in about 64 KiB on the wire, against a 1 MiB limit.
        let bomb = deflated(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100 << 10, "{}", bomb.len());
        let input = compressed(true, BINARY, true, &bomb);
        let mut e = Echo::new(1 << 20, true);
        let (out, _, r) = run_with(&mut e, &input, 16 << 10);
        assert_eq!(r, Err(Refusal::TooBig));
        // Echoed up to the limit (plus at most one buffer), never held.
        assert!(out.len() <= (1 << 20) + UNMASKED_BYTES, "{}", out.len());
        assert_eq!(e.buf.capacity(), 0);
    }

    #[test]
    fn compression_rules_are_enforced() {
        let z = deflated(b"hello");
        // RSV1 without the extension; on a continuation; RSV2 with it.
        assert!(matches!(run(&compressed(true, TEXT, true, &z), 100).2, Err(Refusal::Protocol(_))));
        let mut bad = compressed(false, TEXT, true, &z);
        bad.extend(compressed(true, CONTINUATION, true, b""));
        assert!(matches!(run_with(&mut Echo::new(100, true), &bad, 100).2, Err(Refusal::Protocol(_))));
        let mut rsv2 = masked(true, TEXT, b"x");
        rsv2[0] |= 0x20;
        assert!(matches!(run_with(&mut Echo::new(100, true), &rsv2, 100).2, Err(Refusal::Protocol(_))));
        // RSV1 on a control frame.
        let mut ping = masked(true, PING, b"");
        ping[0] |= 0x40;
        assert!(matches!(run_with(&mut Echo::new(100, true), &ping, 100).2, Err(Refusal::Protocol(_))));
        // Not DEFLATE (block type 3 is reserved).
        let r = run_with(&mut Echo::new(100, true), &compressed(true, BINARY, true, &[0xFF, 0xFF]), 100).2;
        assert_eq!(r, Err(Refusal::BadDeflate));
        // Invalid UTF-8 once inflated.
        let r =
            run_with(&mut Echo::new(100, true), &compressed(true, TEXT, true, &deflated(&[0xC3, 0x28])), 100)
                .2;
        assert_eq!(r, Err(Refusal::InvalidUtf8));
        // Uncompressed messages still pass with the extension agreed.
        let (out, _, r) = run_with(&mut Echo::new(100, true), &masked(true, TEXT, b"plain"), 100);
        assert_eq!((frames(&out), r), (vec![(true, TEXT, 0, b"plain".to_vec())], Ok(true)));
    }

    #[test]
    fn a_backed_up_client_pauses_the_inflating_and_resume_finishes_in_order() {
        // 3 MiB inflating from a few KiB, then a plain message behind it.
        let big: Vec<u8> = (0..3u32 << 20).map(|i| (i / 1000) as u8).collect();
        let mut input = compressed(true, BINARY, true, &deflated(&big));
        input.extend(masked(true, TEXT, b"after"));
        let mut e = Echo::new(4 << 20, true);
        let mut out = Vec::new();
        let mut ends = 0;
        // The client's side never has room: every full buffer pauses.
        let mut on = |a: Action<'_>| match a {
            Action::Send(b) => {
                out.extend_from_slice(b);
                true
            }
            Action::Room => false,
            Action::MessageEnd(_) => {
                ends += 1;
                true
            }
            _ => true,
        };
        assert_eq!(e.feed(&input, &mut on), Ok(true));
        let mut pauses = 0;
        while e.paused() {
            pauses += 1;
            assert!(e.buf.len() <= input.len(), "only the input is kept");
            assert_eq!(e.resume(&mut on), Ok(true));
        }
        // A pause every one or two buffers (64 KiB) echoed: 48 of them.
        assert!((24..=48).contains(&pauses), "{pauses}");
        assert_eq!(ends, 2);
        let f = frames(&out);
        let echoed: Vec<u8> = f[..f.len() - 1].iter().flat_map(|x| x.3.clone()).collect();
        assert_eq!(echoed, big);
        assert_eq!(f.last().unwrap(), &(true, TEXT, 0, b"after".to_vec()));
        assert!(e.inflater.is_none() && e.buf.capacity() == 0);
    }
}
