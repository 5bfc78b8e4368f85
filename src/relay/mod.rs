//! The proxy-mode relay, one direction at a time: each frame's header is
//! parsed and checked against what the gateway owns (message size summed
//! over fragments, control-frame rules, masking direction, reserved
//! opcodes, RSV bits not negotiated), then the header and payload bytes
//! pass on **unchanged** — client frames stay masked toward the backend,
//! backend frames stay unmasked toward the client. Nothing is unmasked,
//! re-masked or reassembled; a data frame's payload passes in whatever
//! pieces it arrives in, so a large frame is never held whole.
//!
//! What the gateway does not check here is the endpoints' business, as
//! through any tunnel: UTF-8 validity of text, close-frame payloads, and
//! the content of compressed messages. With `permessage-deflate` agreed,
//! sizes count wire (compressed) bytes; the inflated size is bounded by the
//! backend's own message limit.
//!
//! Control frames (at most 125 bytes of payload) are the only thing held
//! whole, so the caller can read a close code or recognise the pong that
//! answers its own ping. A [`Filter`] is pure (no I/O), which is what the
//! fuzz target and the property test drive.

pub mod frame;

use frame::{Header, BINARY, CONTINUATION, MAX_CONTROL_PAYLOAD, MAX_HEADER_BYTES, TEXT};

/// What one direction must obey.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    /// Frames from the client must be masked; from the backend, unmasked.
    pub from_client: bool,
    /// `permessage-deflate` was agreed: RSV1 is allowed on the first frame
    /// of a data message (RFC 7692 §6), and nowhere else.
    pub deflate: bool,
    /// The largest message, payload bytes summed over its frames.
    pub max_message: u64,
}

/// Why a frame was refused. Nothing of a refused frame is forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Protocol(&'static str),
    TooBig,
}

/// What the relay reports while bytes pass, in wire order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The first frame of a data message is about to pass; the caller's
    /// `false` (its rate limit) stops the filter before any of it passes.
    MessageStart,
    /// Bytes to pass on unchanged: a data frame's header, or payload.
    Forward(&'a [u8]),
    /// A whole control frame: `raw` as on the wire, `payload` unmasked.
    /// The caller forwards `raw` or consumes it.
    Control { opcode: u8, raw: &'a [u8], payload: &'a [u8] },
    /// A data message's final frame has passed whole; its payload bytes.
    MessageEnd(u64),
}

/// One direction's relay state. Idle, it holds no allocation.
#[derive(Debug)]
pub struct Filter {
    rules: Rules,
    /// A header or control frame split across reads (only while split).
    pending: Vec<u8>,
    /// Payload bytes of the current data frame still to pass.
    left: u64,
    /// Whether the current data frame ends its message.
    fin: bool,
    /// A fragmented message is open (its final frame not yet seen).
    in_message: bool,
    /// Payload bytes of the current message so far.
    message_bytes: u64,
}

impl Filter {
    pub fn new(rules: Rules) -> Filter {
        Filter { rules, pending: Vec::new(), left: 0, fin: false, in_message: false, message_bytes: 0 }
    }

    /// True between frames: nothing of a data frame is half passed, so the
    /// caller may put a frame of its own into this direction's stream.
    pub fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// Feeds bytes as read. `Ok(true)`: all taken; `Ok(false)`: the caller
    /// stopped it (the rest is not looked at). After an `Err` the stream is
    /// beyond repair: the caller ends the session.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(Event<'_>) -> bool,
    ) -> Result<bool, Refusal> {
        loop {
            if self.left > 0 {
                if input.is_empty() {
                    return Ok(true);
                }
                let n = usize::try_from(self.left).unwrap_or(usize::MAX).min(input.len());
                let (piece, rest) = input.split_at(n);
                input = rest;
                self.left -= n as u64;
                if !on(Event::Forward(piece)) {
                    return Ok(false);
                }
                if self.left == 0 && !self.end_frame(on) {
                    return Ok(false);
                }
                continue;
            }
            if input.is_empty() {
                return Ok(true);
            }
            // A header, or a whole control frame, from `pending` + `input`.
            let old = self.pending.len();
            let joined: &[u8] = if old == 0 {
                input
            } else {
                let take = input.len().min(MAX_HEADER_BYTES + MAX_CONTROL_PAYLOAD - old);
                self.pending.extend_from_slice(&input[..take]);
                &self.pending
            };
            let Some(h) = frame::parse(joined).map_err(Refusal::Protocol)? else {
                self.stash(old, input);
                return Ok(true);
            };
            self.check(&h)?;
            if h.is_control() {
                // Checked above: at most 125 bytes.
                let need = h.size + h.len as usize;
                if joined.len() < need {
                    self.stash(old, input);
                    return Ok(true);
                }
                let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
                let p = &mut payload[..h.len as usize];
                p.copy_from_slice(&joined[h.size..need]);
                if let Some(m) = h.mask {
                    frame::apply_mask(p, m, 0);
                }
                let go = on(Event::Control { opcode: h.opcode, raw: &joined[..need], payload: p });
                input = &input[need - old..];
                self.pending = Vec::new();
                if !go {
                    return Ok(false);
                }
                continue;
            }
            if h.opcode != CONTINUATION && !on(Event::MessageStart) {
                return Ok(false);
            }
            self.message_bytes += h.len;
            self.in_message = !h.fin;
            self.fin = h.fin;
            self.left = h.len;
            let go = on(Event::Forward(&joined[..h.size]));
            input = &input[h.size - old..];
            self.pending = Vec::new();
            if !go {
                return Ok(false);
            }
            if h.len == 0 && !self.end_frame(on) {
                return Ok(false);
            }
        }
    }

    /// Keeps an incomplete header or control frame for the next read.
    fn stash(&mut self, old: usize, input: &[u8]) {
        if old == 0 {
            self.pending = input.to_vec();
        }
        // Otherwise `feed` already appended what it took, which was all of
        // `input`: an incomplete frame here is shorter than 14 + 125 bytes.
    }

    fn end_frame(&mut self, on: &mut impl FnMut(Event<'_>) -> bool) -> bool {
        if !self.fin {
            return true;
        }
        let n = std::mem::take(&mut self.message_bytes);
        on(Event::MessageEnd(n))
    }

    /// Every rule the gateway owns, checked before a byte of the frame passes.
    fn check(&self, h: &Header) -> Result<(), Refusal> {
        if h.rsv & 0b011 != 0 {
            return Err(Refusal::Protocol("RSV2/RSV3 set"));
        }
        if h.rsv & 0b100 != 0 && !(self.rules.deflate && matches!(h.opcode, TEXT | BINARY)) {
            return Err(Refusal::Protocol("RSV1 set without permessage-deflate on a message's first frame"));
        }
        if !matches!(h.opcode, 0x0..=0x2 | 0x8..=0xA) {
            return Err(Refusal::Protocol("reserved opcode"));
        }
        if h.mask.is_some() != self.rules.from_client {
            return Err(Refusal::Protocol(if self.rules.from_client {
                "unmasked frame from the client"
            } else {
                "masked frame from the backend"
            }));
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
        match (h.opcode == CONTINUATION, self.in_message) {
            (true, false) => return Err(Refusal::Protocol("continuation outside a message")),
            (false, true) => return Err(Refusal::Protocol("new message inside a fragmented one")),
            _ => {}
        }
        if self.message_bytes.saturating_add(h.len) > self.rules.max_message {
            return Err(Refusal::TooBig);
        }
        Ok(())
    }
}

/// A [`Filter`] as plain data, for a binary upgrade: the new process
/// continues the direction from exactly the byte the old one stopped at
/// (a frame half passed, a header split across reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterState {
    pub from_client: bool,
    pub deflate: bool,
    pub max_message: u64,
    pub pending: Vec<u8>,
    pub left: u64,
    pub fin: bool,
    pub in_message: bool,
    pub message_bytes: u64,
}

impl Filter {
    /// Its state, as plain data.
    pub fn snapshot(&self) -> FilterState {
        FilterState {
            from_client: self.rules.from_client,
            deflate: self.rules.deflate,
            max_message: self.rules.max_message,
            pending: self.pending.clone(),
            left: self.left,
            fin: self.fin,
            in_message: self.in_message,
            message_bytes: self.message_bytes,
        }
    }

    /// A filter in state `s`; `None` when `s` could not come from a filter
    /// (a split piece longer than a header and a control frame).
    pub fn restore(s: FilterState) -> Option<Filter> {
        if s.pending.len() > MAX_HEADER_BYTES + MAX_CONTROL_PAYLOAD || (s.left > 0 && !s.pending.is_empty()) {
            return None;
        }
        Some(Filter {
            rules: Rules { from_client: s.from_client, deflate: s.deflate, max_message: s.max_message },
            pending: s.pending,
            left: s.left,
            fin: s.fin,
            in_message: s.in_message,
            message_bytes: s.message_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::frame::*;
    use super::*;

    fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = Vec::new();
        put_header(&mut f, fin, opcode, payload.len(), mask);
        f[0] |= rsv << 4;
        let at = f.len();
        f.extend_from_slice(payload);
        if let Some(m) = mask {
            apply_mask(&mut f[at..], m, 0);
        }
        f
    }

    /// Feeds `input` in pieces of `step`; returns the bytes forwarded (data
    /// and control alike), the message sizes seen, and the outcome.
    fn run(rules: Rules, input: &[u8], step: usize) -> (Vec<u8>, Vec<u64>, Result<bool, Refusal>) {
        let mut f = Filter::new(rules);
        let mut out = Vec::new();
        let mut ends = Vec::new();
        let mut r = Ok(true);
        for piece in input.chunks(step.max(1)) {
            r = f.feed(piece, &mut |e| {
                match e {
                    Event::Forward(b) => out.extend_from_slice(b),
                    Event::Control { raw, .. } => out.extend_from_slice(raw),
                    Event::MessageEnd(n) => ends.push(n),
                    Event::MessageStart => {}
                }
                true
            });
            if r != Ok(true) {
                break;
            }
        }
        (out, ends, r)
    }

    const CLIENT: Rules = Rules { from_client: true, deflate: false, max_message: 1000 };
    const BACKEND: Rules = Rules { from_client: false, deflate: false, max_message: 1000 };
    const M: Option<[u8; 4]> = Some([0x11, 0x22, 0x33, 0x44]);

    #[test]
    fn fragments_and_interleaved_control_frames_pass_byte_for_byte_at_any_split() {
        let mut input = frame(false, 0, TEXT, b"hel", M);
        input.extend(frame(true, 0, PING, b"are you there", M));
        input.extend(frame(false, 0, CONTINUATION, &[b'l'; 300], M));
        input.extend(frame(true, 0, CONTINUATION, b"o", M));
        input.extend(frame(true, 0, BINARY, &[], M));
        input.extend(frame(true, 0, CLOSE, &1000u16.to_be_bytes(), M));
        for step in [1, 2, 3, 7, 13, 64, 1000] {
            let (out, ends, r) = run(CLIENT, &input, step);
            assert_eq!(r, Ok(true));
            assert_eq!(out, input, "step {step}");
            assert_eq!(ends, vec![304, 0]);
        }
    }

    #[test]
    fn refuses_before_forwarding_any_byte_of_the_frame() {
        let ok = frame(true, 0, TEXT, b"fine", M);
        let cases: Vec<(Rules, Vec<u8>, Refusal)> = vec![
            (CLIENT, frame(true, 0, TEXT, b"x", None), Refusal::Protocol("unmasked frame from the client")),
            (BACKEND, frame(true, 0, TEXT, b"x", M), Refusal::Protocol("masked frame from the backend")),
            (
                CLIENT,
                frame(true, 0b100, TEXT, b"x", M),
                Refusal::Protocol("RSV1 set without permessage-deflate on a message's first frame"),
            ),
            (CLIENT, frame(true, 0b010, TEXT, b"x", M), Refusal::Protocol("RSV2/RSV3 set")),
            (CLIENT, frame(true, 0, 0x3, b"x", M), Refusal::Protocol("reserved opcode")),
            (CLIENT, frame(true, 0, 0xB, b"x", M), Refusal::Protocol("reserved opcode")),
            (CLIENT, frame(false, 0, PING, b"x", M), Refusal::Protocol("fragmented control frame")),
            (CLIENT, frame(true, 0, PONG, &[0; 126], M), Refusal::Protocol("control frame over 125 bytes")),
            (
                CLIENT,
                frame(true, 0, CONTINUATION, b"x", M),
                Refusal::Protocol("continuation outside a message"),
            ),
            (CLIENT, frame(true, 0, BINARY, &[0; 1001], M), Refusal::TooBig),
        ];
        for (rules, bad, why) in cases {
            let mut input = ok.clone();
            input.extend(&bad);
            for step in [1, 5, 2000] {
                let (out, _, r) = run(rules, &input, step);
                assert_eq!(r, Err(why));
                assert!(out.len() <= ok.len(), "nothing of the refused frame passed");
                assert_eq!(out, input[..out.len()].to_vec());
            }
        }
    }

    #[test]
    fn size_is_summed_over_fragments_and_rsv1_follows_deflate() {
        let mut input = frame(false, 0, BINARY, &[0; 600], M);
        input.extend(frame(true, 0, CONTINUATION, &[0; 401], M));
        let (out, _, r) = run(CLIENT, &input, 100);
        assert_eq!(r, Err(Refusal::TooBig));
        assert_eq!(out.len(), 608, "the first fragment passed, nothing of the second");

        let deflate = Rules { deflate: true, ..CLIENT };
        let mut input = frame(false, 0b100, TEXT, b"abc", M);
        input.extend(frame(true, 0, CONTINUATION, b"d", M));
        assert_eq!(run(deflate, &input, 3).2, Ok(true));
        let bad = frame(true, 0b100, PING, b"", M);
        assert!(run(deflate, &bad, 3).2.is_err(), "RSV1 on a control frame");
        let mut bad = frame(false, 0, TEXT, b"abc", M);
        bad.extend(frame(true, 0b100, CONTINUATION, b"d", M));
        assert!(run(deflate, &bad, 3).2.is_err(), "RSV1 on a continuation");
    }

    #[test]
    fn control_payload_is_unmasked_for_the_caller_and_the_caller_may_stop() {
        let mut input = frame(true, 0, PONG, b"hb-1", M);
        input.extend(frame(true, 0, TEXT, b"after", M));
        let mut f = Filter::new(CLIENT);
        let mut seen = Vec::new();
        let r = f.feed(&input, &mut |e| {
            if let Event::Control { opcode, payload, .. } = e {
                seen.push((opcode, payload.to_vec()));
                return false;
            }
            panic!("nothing after a stop");
        });
        assert_eq!(r, Ok(false));
        assert_eq!(seen, vec![(PONG, b"hb-1".to_vec())]);
    }

    #[test]
    fn large_frames_pass_in_pieces_and_idle_filters_hold_nothing() {
        let payload = vec![7u8; 100_000];
        let input = frame(true, 0, BINARY, &payload, None);
        let mut f = Filter::new(Rules { max_message: 1 << 20, ..BACKEND });
        let mut pieces = 0;
        let mut mid = false;
        for piece in input.chunks(4096) {
            assert_eq!(
                f.feed(piece, &mut |e| {
                    pieces += matches!(e, Event::Forward(_)) as usize;
                    true
                }),
                Ok(true)
            );
            mid |= !f.at_boundary();
        }
        assert!(mid && f.at_boundary());
        assert!(pieces > 20);
        assert_eq!(f.pending.capacity(), 0);
    }
}
