//! A minimal RFC 6455 frame codec: enough for a client that masks what it
//! sends, reads unmasked server frames, and answers pings.
//!
//! It works on plain byte slices so that a connection keeps no codec state
//! and no buffer between frames (see `client.rs`).

use std::fmt;

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// A binary message.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;

    /// True for close, ping and pong.
    pub fn is_control(op: u8) -> bool {
        op & 0x8 != 0
    }
}

/// The longest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why a byte sequence is not a frame we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// RSV1-3 set without a negotiated extension.
    ReservedBits,
    /// An opcode RFC 6455 does not define.
    BadOpcode(u8),
    /// A control frame longer than 125 bytes.
    ControlTooLong,
    /// A control frame without FIN.
    FragmentedControl,
    /// A payload over the caller's limit.
    TooLarge(u64),
    /// A 64-bit length with the top bit set, or a non-minimal length.
    BadLength,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ReservedBits => f.write_str("reserved bits set"),
            FrameError::BadOpcode(op) => write!(f, "bad opcode {op:#x}"),
            FrameError::ControlTooLong => f.write_str("control frame over 125 bytes"),
            FrameError::FragmentedControl => f.write_str("fragmented control frame"),
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes over the limit"),
            FrameError::BadLength => f.write_str("bad payload length encoding"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Final fragment of a message.
    pub fin: bool,
    /// One of [`opcode`].
    pub opcode: u8,
    /// The masking key, when the sender masked (clients must, servers must not).
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub len: u64,
    /// Bytes the header itself took.
    pub header_len: usize,
}

/// Parses a frame header from the start of `buf`; `Ok(None)` means more bytes
/// are needed. Payloads over `max_payload` are refused before any is read.
pub fn parse_header(buf: &[u8], max_payload: u64) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let op = b0 & 0x0F;
    if !matches!(
        op,
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY | opcode::CLOSE | opcode::PING | opcode::PONG
    ) {
        return Err(FrameError::BadOpcode(op));
    }
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    let (len, mut at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let n = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if n < 126 {
                return Err(FrameError::BadLength);
            }
            (n, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 || n <= u16::MAX as u64 {
                return Err(FrameError::BadLength);
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode::is_control(op) {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::ControlTooLong);
        }
    }
    if len > max_payload {
        return Err(FrameError::TooLarge(len));
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[at..at + 4]);
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin, opcode: op, mask, len, header_len: at }))
}

/// A whole frame with its payload unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Final fragment of a message.
    pub fin: bool,
    /// One of [`opcode`].
    pub opcode: u8,
    /// True when the sender masked it (a server must not).
    pub masked: bool,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

/// Decodes one complete frame from the start of `buf`, returning it and the
/// bytes consumed, or `Ok(None)` when the frame is not complete yet.
pub fn decode(buf: &[u8], max_payload: u64) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(h) = parse_header(buf, max_payload)? else {
        return Ok(None);
    };
    // `len <= max_payload`, which the caller keeps within memory (usize).
    let len = h.len as usize;
    let total = h.header_len + len;
    if buf.len() < total {
        return Ok(None);
    }
    let mut payload = buf[h.header_len..total].to_vec();
    if let Some(mask) = h.mask {
        apply_mask(&mut payload, mask);
    }
    Ok(Some((Frame { fin: h.fin, opcode: h.opcode, masked: h.mask.is_some(), payload }, total)))
}

/// XORs `data` with the 4-byte masking key (its own inverse).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends a frame to `out`: masked with `mask` when given (client frames),
/// unmasked otherwise (used by tests playing the server).
pub fn encode(out: &mut Vec<u8>, fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(if fin { 0x80 } else { 0 } | (op & 0x0F));
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mbit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mbit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            let start = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[start..], m);
        }
        None => out.extend_from_slice(payload),
    }
}

/// A masked client frame as a fresh buffer, with a random masking key.
pub fn client_frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    encode(&mut out, true, op, payload, Some(rand::random()));
    out
}

/// The payload of a close frame: the code, then a UTF-8 reason (cut to fit).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    let mut r = reason;
    while r.len() > MAX_CONTROL_PAYLOAD - 2 {
        let mut cut = MAX_CONTROL_PAYLOAD - 2;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r = &r[..cut];
    }
    p.extend_from_slice(r.as_bytes());
    p
}

/// Splits a close payload into its code (if any) and reason.
pub fn parse_close(payload: &[u8]) -> (Option<u16>, String) {
    if payload.len() < 2 {
        return (None, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (Some(code), String::from_utf8_lossy(&payload[2..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(len: usize, mask: Option<[u8; 4]>) {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut buf = Vec::new();
        encode(&mut buf, true, opcode::BINARY, &payload, mask);
        let expected_header = match len {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        } + if mask.is_some() { 4 } else { 0 };
        assert_eq!(buf.len(), expected_header + len);
        // Every strict prefix is incomplete, never an error.
        for cut in [0, 1, expected_header - 1, buf.len() - 1] {
            if cut < buf.len() {
                assert_eq!(decode(&buf[..cut], u64::MAX >> 1).unwrap(), None, "cut {cut}");
            }
        }
        let (f, used) = decode(&buf, u64::MAX >> 1).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert!(f.fin);
        assert_eq!(f.opcode, opcode::BINARY);
        assert_eq!(f.masked, mask.is_some());
        assert_eq!(f.payload, payload);
    }

    #[test]
    fn roundtrip_all_length_forms() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            roundtrip(len, None);
            roundtrip(len, Some([1, 2, 3, 4]));
        }
    }

    #[test]
    fn rfc6455_examples() {
        // §5.7: a single-frame unmasked text message "Hello".
        let unmasked = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (f, n) = decode(&unmasked, 1024).unwrap().unwrap();
        assert_eq!((n, f.opcode, f.payload.as_slice()), (7, opcode::TEXT, &b"Hello"[..]));
        // §5.7: the masked "Hello".
        let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (f, _) = decode(&masked, 1024).unwrap().unwrap();
        assert!(f.masked);
        assert_eq!(f.payload, b"Hello");
        let mut enc = Vec::new();
        encode(&mut enc, true, opcode::TEXT, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(enc, masked);
        // §5.7: an unmasked ping with "Hello".
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (f, _) = decode(&ping, 1024).unwrap().unwrap();
        assert_eq!(f.opcode, opcode::PING);
        // §5.7: 256 bytes binary uses the 16-bit length.
        let mut big = vec![0x82, 0x7E, 0x01, 0x00];
        big.extend(std::iter::repeat_n(0u8, 256));
        assert_eq!(decode(&big, 1024).unwrap().unwrap().1, 260);
    }

    #[test]
    fn fragments_keep_fin_and_continuation() {
        let mut buf = Vec::new();
        encode(&mut buf, false, opcode::TEXT, b"Hel", None);
        encode(&mut buf, true, opcode::CONTINUATION, b"lo", None);
        let (a, n) = decode(&buf, 100).unwrap().unwrap();
        assert!(!a.fin);
        let (b, m) = decode(&buf[n..], 100).unwrap().unwrap();
        assert!(b.fin);
        assert_eq!(b.opcode, opcode::CONTINUATION);
        assert_eq!(n + m, buf.len());
    }

    #[test]
    fn protocol_errors() {
        assert_eq!(decode(&[0xC1, 0x00], 10), Err(FrameError::ReservedBits));
        assert_eq!(decode(&[0x83, 0x00], 10), Err(FrameError::BadOpcode(3)));
        assert_eq!(decode(&[0x09, 0x00], 10), Err(FrameError::FragmentedControl));
        assert_eq!(decode(&[0x89, 0x7E, 0, 200], 1000), Err(FrameError::ControlTooLong));
        assert_eq!(decode(&[0x82, 0x7E, 0, 5], 1000), Err(FrameError::BadLength));
        let mut huge = vec![0x82, 0x7F];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(decode(&huge, u64::MAX), Err(FrameError::BadLength));
        assert_eq!(decode(&[0x82, 0x7E, 1, 0], 255), Err(FrameError::TooLarge(256)));
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(opcode::PONG, b"abc");
        assert_eq!(f[0], 0x8A);
        assert_eq!(f[1], 0x80 | 3);
        let (d, _) = decode(&f, 10).unwrap().unwrap();
        assert!(d.masked);
        assert_eq!(d.payload, b"abc");
    }

    #[test]
    fn close_payloads() {
        let p = close_payload(1000, "bye");
        assert_eq!(parse_close(&p), (Some(1000), "bye".to_string()));
        assert_eq!(parse_close(&[]), (None, String::new()));
        let long = "é".repeat(100);
        let p = close_payload(1011, &long);
        assert!(p.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
    }
}
