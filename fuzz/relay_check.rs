//! The relay filter's contract, checked on arbitrary bytes: shared by the
//! `relay_frames` fuzz target and the corpus-replay test
//! (`tests/relay_corpus.rs`), so a crash found once stays fixed.
//!
//! Input layout: byte 0 picks the rules (direction, deflate, size limit),
//! byte 1 seeds the split points, the rest is the stream. The filter must
//! never panic, must forward exactly the bytes an independent reference
//! reading of RFC 6455 accepts (byte for byte, whatever the split points),
//! and must refuse where the reference refuses, before a byte of that
//! frame passes.
#![allow(dead_code)]

use portcullis::relay::{Event, Filter, Refusal, Rules};

/// What the reference expects from a whole stream.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    /// Bytes forwarded: whole accepted frames, plus a data frame whose
    /// header is complete (its payload as far as it came).
    forwarded: usize,
    refused: bool,
    message_ends: Vec<u64>,
}

/// An independent reading of the rules, on the whole stream at once.
fn reference(rules: Rules, s: &[u8]) -> Expected {
    let mut pos = 0usize;
    let mut in_message = false;
    let mut message = 0u64;
    let mut ends = Vec::new();
    loop {
        let h = &s[pos..];
        if h.len() < 2 {
            return Expected { forwarded: pos, refused: false, message_ends: ends };
        }
        let (fin, rsv, opcode) = (h[0] >> 7 == 1, (h[0] >> 4) & 7, h[0] & 15);
        let masked = h[1] >> 7 == 1;
        let (len, mut size) = match h[1] & 127 {
            126 if h.len() >= 4 => (u64::from(h[2]) << 8 | u64::from(h[3]), 4),
            127 if h.len() >= 10 => (h[2..10].iter().fold(0u64, |a, b| a << 8 | u64::from(*b)), 10),
            126 | 127 => return Expected { forwarded: pos, refused: false, message_ends: ends },
            n => (u64::from(n), 2),
        };
        let refuse = Expected { forwarded: pos, refused: true, message_ends: ends.clone() };
        if len >> 63 == 1 {
            return refuse;
        }
        if masked {
            size += 4;
        }
        if h.len() < size {
            return Expected { forwarded: pos, refused: false, message_ends: ends };
        }
        let control = opcode >= 8;
        let bad = rsv & 3 != 0
            || (rsv & 4 != 0 && !(rules.deflate && (opcode == 1 || opcode == 2)))
            || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10)
            || masked != rules.from_client
            || (control && (!fin || len > 125))
            || (!control && (opcode == 0) != in_message)
            || (!control && message + len > rules.max_message);
        if bad {
            return refuse;
        }
        let end = (pos + size) as u64 + len;
        if control {
            if end > s.len() as u64 {
                return Expected { forwarded: pos, refused: false, message_ends: ends };
            }
        } else {
            message += len;
            in_message = !fin;
            if end > s.len() as u64 {
                return Expected { forwarded: s.len(), refused: false, message_ends: ends };
            }
            if fin {
                ends.push(message);
                message = 0;
            }
        }
        pos = end as usize;
    }
}

/// Feeds `stream` cut at seed-driven points; returns what passed.
fn run(rules: Rules, stream: &[u8], seed: u8) -> (Vec<u8>, Vec<u64>, Option<Refusal>) {
    let mut f = Filter::new(rules);
    let mut out = Vec::new();
    let mut ends = Vec::new();
    let mut x = u32::from(seed) | 1;
    let mut at = 0;
    while at < stream.len() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let n = if seed == 0 { stream.len() } else { 1 + (x >> 16) as usize % (usize::from(seed) * 3) };
        let piece = &stream[at..(at + n).min(stream.len())];
        at += piece.len();
        let r = f.feed(piece, &mut |e| {
            match e {
                Event::Forward(b) => out.extend_from_slice(b),
                Event::Control { raw, payload, .. } => {
                    assert!(payload.len() <= 125 && raw.len() >= payload.len() + 2);
                    out.extend_from_slice(raw);
                }
                Event::MessageEnd(n) => ends.push(n),
                Event::MessageStart => {}
            }
            true
        });
        match r {
            Ok(true) => {}
            Ok(false) => unreachable!("the callback never stops"),
            Err(e) => return (out, ends, Some(e)),
        }
    }
    (out, ends, None)
}

/// Checks one fuzz input; panics on a broken contract.
pub fn check(data: &[u8]) {
    let [flags, seed, stream @ ..] = data else { return };
    let rules = Rules {
        from_client: flags & 1 != 0,
        deflate: flags & 2 != 0,
        max_message: [0u64, 1, 125, 1000, 1 << 20][usize::from(flags >> 2) % 5],
    };
    let want = reference(rules, stream);
    for s in [*seed, 0, 1] {
        let (out, ends, refused) = run(rules, stream, s);
        assert_eq!(out.len(), want.forwarded, "forwarded length (seed {s}, refused {refused:?})");
        assert_eq!(out, stream[..out.len()], "forwarded bytes are the input's, unchanged");
        assert_eq!(refused.is_some(), want.refused, "refusal (seed {s})");
        assert_eq!(ends, want.message_ends, "message sizes");
    }
}
