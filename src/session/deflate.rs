//! `permessage-deflate` (RFC 7692) in echo mode: the client's offer read
//! and answered at the upgrade, and the inflater of its compressed
//! messages.
//!
//! Memory is the design constraint: an idle echo connection costs about
//! 2 KB, and an LZ77 window is 32 KiB. So the answer always says
//! `client_no_context_takeover` (RFC 7692 §7.1.1.2 lets a server ask it of
//! any client): every compressed message is a stream of its own, and the
//! inflater is needed only while a message is open. It is taken when a
//! compressed message starts and given back when it ends, to a spare kept
//! per thread (zeroed before reuse: a back-reference past the start of a
//! message must never read another connection's bytes). An idle
//! connection, compressing or not, holds none.
//!
//! The echo answers uncompressed (§6: compression is per message, the
//! sender's choice): no compressor state at all, and any
//! `server_max_window_bits` or `server_no_context_takeover` the client
//! asks for is honoured trivially, including the 8-bit window zlib cannot
//! produce. Inflated bytes go into a fixed buffer and are counted against
//! `limits.max_message_bytes` as they come out, so a compression bomb is
//! `message_too_big` after at most one buffer of output, never an
//! allocation of its inflated size.

use std::cell::RefCell;

use miniz_oxide::inflate::stream::{inflate, InflateState, ZeroReset};
use miniz_oxide::{DataFormat, MZError, MZFlush, MZStatus};

/// The extension's registered name.
pub const NAME: &str = "permessage-deflate";

/// What a sender removed from the end of every compressed message
/// (RFC 7692 §7.2.1), given back to the inflater at the message's end.
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

thread_local! {
    /// One inflater state kept per worker thread between messages, so a
    /// stream of compressed messages does not allocate 43 KB each.
    static SPARE: RefCell<Option<Box<InflateState>>> = const { RefCell::new(None) };
}

/// The answer to the client's `Sec-WebSocket-Extensions` offers: the
/// first acceptable `permessage-deflate` offer accepted, or `None` (no
/// offer, or none valid: the connection goes on uncompressed).
pub fn negotiate<'a>(offers: impl Iterator<Item = &'a str>) -> Option<String> {
    offers.flat_map(|v| v.split(',')).find_map(answer)
}

/// The answer to one offer (`permessage-deflate; param[=value]; …`), or
/// `None` if it is not ours or not valid (§7.1: an unknown or repeated
/// parameter, or a bad value, declines the offer).
fn answer(offer: &str) -> Option<String> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits = None;
    for p in parts {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (p, None),
        };
        let i = match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if v.is_none() => 0,
            "client_no_context_takeover" if v.is_none() => 1,
            "server_max_window_bits" => {
                server_bits = Some(window_bits(v?)?);
                2
            }
            "client_max_window_bits" => {
                // The client's own limit: any window inflates here.
                if let Some(v) = v {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
    }
    // Every message a stream of its own: no window kept between messages.
    let mut a = format!("{NAME}; client_no_context_takeover");
    if seen[0] {
        a.push_str("; server_no_context_takeover");
    }
    // An offer naming it is accepted only by naming it back (§7.1.2.1);
    // the echo never compresses, so any value is kept.
    if let Some(b) = server_bits {
        a.push_str(&format!("; server_max_window_bits={b}"));
    }
    Some(a)
}

/// A parameter value, possibly a quoted string (RFC 6455 §9.1).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// A window size: 8 to 15, decimal, no leading zero (§7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// The compressed data was not a valid DEFLATE stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt;

/// One compressed message being inflated.
pub struct Inflater {
    state: Option<Box<InflateState>>,
    /// The stream ended (a final block): the rest of the message, the
    /// sender's tail, is ignored.
    pub ended: bool,
    /// A fragment of the echo has been sent: the next is a continuation.
    pub sent: bool,
    /// The echo waits for the client's side; the rest of the input is held.
    pub paused: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").field("ended", &self.ended).field("sent", &self.sent).finish()
    }
}

impl Inflater {
    /// A fresh stream: the thread's spare state, zeroed, or a new one.
    pub fn start() -> Inflater {
        let spare = SPARE.try_with(|s| s.borrow_mut().take()).ok().flatten();
        let state = match spare {
            Some(mut s) => {
                s.reset_as(ZeroReset);
                s
            }
            None => InflateState::new_boxed(DataFormat::Raw),
        };
        Inflater { state: Some(state), ended: false, sent: false, paused: false }
    }

    /// Inflates from `input` into `out`: (bytes consumed, bytes written,
    /// stream ended). `(0, 0, false)`: it needs more input.
    pub fn run(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize, bool), Corrupt> {
        let Some(state) = self.state.as_mut() else { return Err(Corrupt) };
        let r = inflate(state, input, out, MZFlush::None);
        match r.status {
            Ok(MZStatus::StreamEnd) => Ok((r.bytes_consumed, r.bytes_written, true)),
            Ok(_) => Ok((r.bytes_consumed, r.bytes_written, false)),
            // No progress possible without more input.
            Err(MZError::Buf) => Ok((r.bytes_consumed, r.bytes_written, false)),
            Err(_) => Err(Corrupt),
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // Back to the thread's spare (unless one is there already, or the
        // thread is ending); zeroed when it is taken again.
        if let Some(s) = self.state.take() {
            let _ = SPARE.try_with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.is_none() {
                    *spare = Some(s);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(offers: &[&str]) -> Option<String> {
        negotiate(offers.iter().copied())
    }

    #[test]
    fn offers_are_answered_with_no_client_context_and_the_servers_window_named_back() {
        let base = "permessage-deflate; client_no_context_takeover";
        assert_eq!(neg(&["permessage-deflate"]).as_deref(), Some(base));
        assert_eq!(neg(&["permessage-deflate; client_max_window_bits"]).as_deref(), Some(base));
        assert_eq!(
            neg(&["Permessage-Deflate; server_no_context_takeover; server_max_window_bits=\"10\""]).as_deref(),
            Some("permessage-deflate; client_no_context_takeover; server_no_context_takeover; server_max_window_bits=10")
        );
        assert_eq!(
            neg(&["permessage-deflate; server_max_window_bits=8; client_max_window_bits=9"]).as_deref(),
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=8")
        );
        // An invalid offer is declined; the next one is taken.
        assert_eq!(
            neg(&[
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16",
                "permessage-deflate"
            ])
            .as_deref(),
            Some(base)
        );
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
            "deflate-frame",
        ] {
            assert_eq!(neg(&[bad]), None, "{bad}");
        }
        assert_eq!(neg(&[]), None);
    }

    #[test]
    fn a_stream_inflates_across_pieces_and_the_state_is_zeroed_for_the_next() {
        // Longer than the window and nowhere zero: it fills the whole
        // dictionary the next message could look back into.
        let text: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let z = miniz_oxide::deflate::compress_to_vec(&text, 6);
        let mut out = vec![0u8; 64];
        let mut got = Vec::new();
        let mut inf = Inflater::start();
        for piece in z.chunks(7) {
            let mut piece = piece;
            loop {
                let (used, wrote, _) = inf.run(piece, &mut out).unwrap();
                got.extend_from_slice(&out[..wrote]);
                piece = &piece[used..];
                if used == 0 && wrote == 0 {
                    break;
                }
            }
        }
        assert_eq!(got, text);
        drop(inf);
        // The spare is reused, zeroed: a back-reference into the previous
        // message reads zeros, never its bytes.
        let mut inf = Inflater::start();
        // A fixed-Huffman block: literal 'a', then a match of length 3 at
        // distance 100 (before the stream's start), then end of block.
        let mut w = BitWriter::default();
        w.bits(1, 1); // BFINAL
        w.bits(1, 2); // fixed Huffman
        w.rev(0x30 + u32::from(b'a'), 8); // literal 'a'
        w.rev(1, 7); // length code 257: length 3
        w.rev(13, 5); // distance code 13: 97..=128, 5 extra bits
        w.bits(3, 5); // 100
        w.rev(0, 7); // end of block
        let mut out = [0xAAu8; 16];
        // Refused, or zeros: never the previous message's bytes.
        if let Ok((_, wrote, _)) = inf.run(&w.bytes(), &mut out) {
            assert_eq!(&out[..wrote], b"a\0\0\0");
        }
    }

    /// Bits for a hand-made DEFLATE block, least significant first.
    #[derive(Default)]
    struct BitWriter {
        out: Vec<u8>,
        n: u32,
    }

    impl BitWriter {
        fn bit(&mut self, b: u32) {
            if self.n.is_multiple_of(8) {
                self.out.push(0);
            }
            if b != 0 {
                *self.out.last_mut().unwrap() |= 1 << (self.n % 8);
            }
            self.n += 1;
        }
        fn bits(&mut self, v: u32, len: u32) {
            for i in 0..len {
                self.bit((v >> i) & 1);
            }
        }
        /// A Huffman code, most significant bit first.
        fn rev(&mut self, v: u32, len: u32) {
            for i in (0..len).rev() {
                self.bit((v >> i) & 1);
            }
        }
        fn bytes(&self) -> Vec<u8> {
            self.out.clone()
        }
    }
}
