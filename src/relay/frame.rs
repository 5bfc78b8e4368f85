//! RFC 6455 §5.2 frame headers: parsed from bytes as they arrive, and the
//! few frames the gateway writes itself (pings, pongs, closes).

/// Opcodes the gateway acts on.
pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The longest header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER_BYTES: usize = 14;
/// A control frame's payload limit (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// One frame's header, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..3 as the low three bits (RSV1 = 0b100).
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub len: u64,
    /// How many bytes the header took.
    pub size: usize,
}

impl Header {
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }
}

/// Parses a header from the start of `buf`: `None` while incomplete. A
/// length with its top bit set is refused here (§5.2: "the most
/// significant bit MUST be 0"); every other rule is the caller's.
pub fn parse(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else { return Ok(None) };
    let masked = b1 & 0x80 != 0;
    let (len, at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let len = u64::from_be_bytes(a);
                if len >> 63 != 0 {
                    return Err("payload length with the top bit set");
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let (mask, size) = if masked {
        match buf.get(at..at + 4) {
            Some(m) => (Some([m[0], m[1], m[2], m[3]]), at + 4),
            None => return Ok(None),
        }
    } else {
        (None, at)
    };
    Ok(Some(Header { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0x0F, mask, len, size }))
}

/// Appends a frame header to `out`.
pub fn put_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    let (h, n) = header(fin, opcode, len as u64, mask);
    out.extend_from_slice(&h[..n]);
}

/// A frame header and its length, built on the stack (once per echoed
/// frame, so without allocating).
pub fn header(fin: bool, opcode: u8, len: u64, mask: Option<[u8; 4]>) -> ([u8; MAX_HEADER_BYTES], usize) {
    let mut h = [0u8; MAX_HEADER_BYTES];
    h[0] = if fin { 0x80 } else { 0 } | opcode;
    let m = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        h[1] = m | len as u8;
        2
    } else if let Ok(l) = u16::try_from(len) {
        h[1] = m | 126;
        h[2..4].copy_from_slice(&l.to_be_bytes());
        4
    } else {
        h[1] = m | 127;
        h[2..10].copy_from_slice(&len.to_be_bytes());
        10
    };
    if let Some(k) = mask {
        h[n..n + 4].copy_from_slice(&k);
        n += 4;
    }
    (h, n)
}

/// XORs `data` with the mask, `offset` bytes into the payload.
///
/// Thirty-two bytes at a time against a block of the mask repeated, which
/// the compiler turns into vector XORs: the echo unmasks every byte a
/// client sends, and a byte at a time (with its `% 4`) cost it more CPU
/// per 64 KiB message than the kernel's two copies of it.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    let mut k = mask;
    k.rotate_left((offset % 4) as usize);
    let block: [u8; 32] = std::array::from_fn(|i| k[i % 4]);
    let mut chunks = data.chunks_exact_mut(32);
    for c in &mut chunks {
        for (b, m) in c.iter_mut().zip(&block) {
            *b ^= m;
        }
    }
    // Chunks are whole multiples of 4: the rest starts at mask byte k[0].
    for (b, m) in chunks.into_remainder().iter_mut().zip(block) {
        *b ^= m;
    }
}

/// A whole control frame, masked when `mask` is given (frames toward the
/// backend: the gateway is its client). `payload` is cut at 125 bytes.
pub fn control(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut out = Vec::with_capacity(MAX_HEADER_BYTES + payload.len());
    put_header(&mut out, true, opcode, payload.len(), mask);
    let at = out.len();
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut out[at..], k, 0);
    }
    out
}

/// A close frame with `code` and `reason` (no code when `None`).
pub fn close(code: Option<u16>, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + reason.len());
    if let Some(c) = code {
        p.extend_from_slice(&c.to_be_bytes());
        p.extend_from_slice(reason.as_bytes());
    }
    control(CLOSE, &p, mask)
}

/// The code of a close frame's (unmasked) payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// May this code appear in a close frame on the wire (RFC 6455 §7.4,
/// IANA registry)? 1005, 1006 and 1015 are reserved for reporting only.
pub fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_matches_the_byte_at_a_time_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..200u8).collect();
        for len in 0..data.len() {
            for offset in 0..9u64 {
                let mut got = data[..len].to_vec();
                apply_mask(&mut got, mask, offset);
                let want: Vec<u8> = data[..len]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(offset as usize + i) % 4])
                    .collect();
                assert_eq!(got, want, "len {len}, offset {offset}");
            }
        }
    }

    #[test]
    fn parses_every_length_form_and_waits_for_more() {
        let mut f = Vec::new();
        put_header(&mut f, true, BINARY, 70_000, Some([1, 2, 3, 4]));
        assert_eq!(f.len(), 14);
        for cut in 0..f.len() {
            assert_eq!(parse(&f[..cut]), Ok(None), "cut at {cut}");
        }
        let h = parse(&f).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.rsv, h.opcode, h.mask, h.len, h.size),
            (true, 0, 2, Some([1, 2, 3, 4]), 70_000, 14)
        );
        let mut g = Vec::new();
        put_header(&mut g, false, TEXT, 300, None);
        let h = parse(&g).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.mask, h.len, h.size), (false, 1, None, 300, 4));
        assert_eq!(parse(&[0xC1, 0x05]).unwrap().unwrap().rsv, 0b100);
        assert!(parse(&[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn control_frames_round_trip_masked() {
        let f = close(Some(1008), "revoked", Some([9, 8, 7, 6]));
        let h = parse(&f).unwrap().unwrap();
        let mut p = f[h.size..].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(close_code(&p), Some(1008));
        assert_eq!(&p[2..], b"revoked");
        assert_eq!(close(None, "", None), vec![0x88, 0x00]);
        assert!(close_code_valid(1000) && close_code_valid(4999) && !close_code_valid(1005));
        assert!(!close_code_valid(999) && !close_code_valid(1016) && !close_code_valid(5000));
    }
}
