//! The pieces of the token precheck ([`JwtAuthenticator::precheck`]): the
//! refusals stage 4 can decide synchronously and without touching the heap,
//! so a forged, expired or malformed token can be answered right after the
//! head is read.
//!
//! Each piece answers "sure" or "cannot tell", never "probably": a precheck
//! refusal must be the very refusal the full verification would give, and
//! "cannot tell" sends the token down that path. What is mirrored of
//! `jsonwebtoken` 12 (`decode_header`, `decode`, `validation::validate`) is
//! said where it is mirrored; the unit tests of `jwt.rs` hold the two side by
//! side.
//!
//! Why not `serde_json` for the header: its errors are boxed, so every
//! header that is not JSON would cost an allocation, and the header is what
//! an attacker controls before any signature. The header is read by a small
//! scanner instead; the claims, read only once the HMAC has proved the
//! token was minted with our key, go through `serde_json` into borrowed
//! values (no allocation unless it fails, which only the key holder can
//! cause).
//!
//! [`JwtAuthenticator::precheck`]: super::jwt::JwtAuthenticator::precheck

use std::fmt;

use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, Validation};
use jwt_base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_base64::{DecodeSliceError, Engine};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Sha256, Sha384, Sha512};

use super::jwt::MAX_TOKEN_BYTES;

/// The segments of a compact JWS. (No `Debug`: it is the credential.)
pub(super) struct Parts<'a> {
    pub header: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
    /// `header.payload`: what the signature covers.
    pub message: &'a [u8],
}

/// Splits `token` at its two dots; `None` when it has any other number.
/// `jsonwebtoken` splits at the last two dots: with fewer it finds no three
/// parts, with more its header segment holds a dot, which base64url never
/// decodes. Either way a refusal.
pub(super) fn split(token: &str) -> Option<Parts<'_>> {
    let (message, signature) = token.rsplit_once('.')?;
    let (header, payload) = message.split_once('.')?;
    if payload.contains('.') {
        return None;
    }
    Some(Parts { header, payload, signature, message: message.as_bytes() })
}

/// A segment's bytes, or why there are none.
#[cfg_attr(test, derive(Debug, PartialEq, Eq))]
pub(super) enum Decoded<'b> {
    Bytes(&'b [u8]),
    /// Not base64url without padding: `jsonwebtoken` refuses it too (same
    /// crate version, same engine).
    Invalid,
    /// Larger than the buffer: cannot tell.
    TooLong,
}

/// Room for a segment up to 1 KiB long, decoded: most are shorter.
const SMALL_BYTES: usize = 768;
/// Room for any segment of a token within [`MAX_TOKEN_BYTES`], decoded.
const LARGE_BYTES: usize = MAX_TOKEN_BYTES / 4 * 3 + 3;

/// Decodes `segment` into a stack buffer and hands the result to `f`: a
/// small buffer when it fits, since zeroing the large one would cost a
/// refusal more than all its other work.
pub(super) fn with_decoded<R>(segment: &str, f: impl FnOnce(Decoded<'_>) -> R) -> R {
    if segment.len() <= SMALL_BYTES / 3 * 4 {
        f(decode(segment, &mut [0u8; SMALL_BYTES]))
    } else {
        f(decode(segment, &mut [0u8; LARGE_BYTES]))
    }
}

/// Decodes `segment` into `buf`, as `jsonwebtoken` would into a `Vec`.
pub(super) fn decode<'b>(segment: &str, buf: &'b mut [u8]) -> Decoded<'b> {
    match URL_SAFE_NO_PAD.decode_slice(segment, buf) {
        Ok(n) => buf.get(..n).map_or(Decoded::TooLong, Decoded::Bytes),
        Err(DecodeSliceError::DecodeError(_)) => Decoded::Invalid,
        Err(DecodeSliceError::OutputSliceTooSmall) => Decoded::TooLong,
    }
}

/// Whether `tag` is the HMAC of `message` under `secret` for `alg` (compared
/// in constant time, whole length only, as `aws-lc-rs` behind
/// `jsonwebtoken` does); `None` for a non-HMAC algorithm.
pub(super) fn hmac_matches(alg: Algorithm, secret: &[u8], message: &[u8], tag: &[u8]) -> Option<bool> {
    fn check<M: Mac + hmac::digest::KeyInit>(secret: &[u8], message: &[u8], tag: &[u8]) -> Option<bool> {
        let mut mac = <M as Mac>::new_from_slice(secret).ok()?;
        mac.update(message);
        Some(mac.verify_slice(tag).is_ok())
    }
    match alg {
        Algorithm::HS256 => check::<Hmac<Sha256>>(secret, message, tag),
        Algorithm::HS384 => check::<Hmac<Sha384>>(secret, message, tag),
        Algorithm::HS512 => check::<Hmac<Sha512>>(secret, message, tag),
        _ => None,
    }
}

/// The algorithm `jsonwebtoken` reads from an `alg` string (its serde
/// names, which are the variant names); `None`: it fails to parse the header.
pub(super) fn algorithm(name: &[u8]) -> Option<Algorithm> {
    Some(match name {
        b"HS256" => Algorithm::HS256,
        b"HS384" => Algorithm::HS384,
        b"HS512" => Algorithm::HS512,
        b"ES256" => Algorithm::ES256,
        b"ES384" => Algorithm::ES384,
        b"RS256" => Algorithm::RS256,
        b"RS384" => Algorithm::RS384,
        b"RS512" => Algorithm::RS512,
        b"PS256" => Algorithm::PS256,
        b"PS384" => Algorithm::PS384,
        b"PS512" => Algorithm::PS512,
        b"EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// What a decoded header tells the precheck.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Header<'a> {
    /// `jsonwebtoken` cannot parse it (not a JSON object, or no `alg`).
    Invalid,
    /// *If* `jsonwebtoken` parses it, these are its `alg` and `kid`.
    Fields {
        alg: &'a [u8],
        kid: Option<&'a str>,
        /// `jsonwebtoken` surely parses it: only `alg`, `typ`, `kid` and
        /// `cty`, once each, as plain strings.
        simple: bool,
    },
    /// Cannot tell: an escaped top-level key (it may spell `alg`), a
    /// repeated `alg` or `kid`, or one that is not a plain string.
    Unknown,
}

/// A JSON value as the scanner sees it.
#[derive(Clone, Copy, Debug)]
enum Scanned<'a> {
    /// A string's raw content (between the quotes) and whether it holds an escape.
    Str(&'a [u8], bool),
    /// A number, `true`, `false` or `null`.
    Literal(&'a [u8]),
    /// An object or array.
    Nested,
}

/// Reads a header's top-level members without allocating.
///
/// Lenient where leniency is sound: every text `serde_json` parses as an
/// object is scanned, and for such a text the members found are its members
/// (outside strings, JSON's structure is plain bytes; without escapes a key
/// is its raw bytes). So "not scannable" means `jsonwebtoken` fails too. For
/// `simple` it is strict: those headers it vouches for in full.
pub(super) fn scan_header(b: &[u8]) -> Header<'_> {
    let mut c = Cursor { b, i: 0 };
    match c.object() {
        Some(h) => h,
        None => Header::Invalid,
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        // JSON's four whitespace bytes, as `serde_json` has them.
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        if hit {
            self.i += 1;
        }
        hit
    }

    /// At an opening quote: the content and whether it holds an escape.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.i;
        let mut escaped = false;
        while let Some(byte) = self.peek() {
            match byte {
                b'"' => {
                    let s = self.b.get(start..self.i)?;
                    self.i += 1;
                    return Some((s, escaped));
                }
                b'\\' => {
                    escaped = true;
                    self.i += 2;
                }
                _ => self.i += 1,
            }
        }
        None
    }

    /// At `{` or `[`: skips to the matching close, counting brackets outside
    /// strings (in valid JSON they balance; mismatched kinds are let through,
    /// which only makes the scan more lenient).
    fn nested(&mut self) -> Option<()> {
        let mut depth = 0usize;
        while let Some(byte) = self.peek() {
            match byte {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.i += 1;
                        return Some(());
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        None
    }

    fn value(&mut self) -> Option<Scanned<'a>> {
        match self.peek()? {
            b'"' => self.string().map(|(s, e)| Scanned::Str(s, e)),
            b'{' | b'[' => self.nested().map(|()| Scanned::Nested),
            _ => {
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'+' | b'-' | b'.')
                ) {
                    self.i += 1;
                }
                let lit = self.b.get(start..self.i)?;
                (!lit.is_empty()).then_some(Scanned::Literal(lit))
            }
        }
    }

    /// The whole text as one object; `None` when it is not scannable.
    fn object(&mut self) -> Option<Header<'a>> {
        let (mut alg, mut kid) = (None, None);
        let mut unknown = false;
        // Strict for `simple`: no escape, no control byte, known keys once.
        let mut simple = std::str::from_utf8(self.b).is_ok();
        let mut seen = [false; 4];
        self.ws();
        if !self.eat(b'{') {
            return None;
        }
        self.ws();
        if !self.eat(b'}') {
            loop {
                let (key, key_escaped) = self.string()?;
                self.ws();
                if !self.eat(b':') {
                    return None;
                }
                self.ws();
                let value = self.value()?;
                if key_escaped {
                    unknown = true;
                }
                match value {
                    Scanned::Str(s, false) if !s.iter().any(|&b| b < 0x20) => {}
                    _ => simple = false,
                }
                let slot = match key {
                    b"alg" => Some(&mut alg),
                    b"kid" => Some(&mut kid),
                    _ => None,
                };
                if let Some(slot) = slot {
                    unknown |= slot.replace(value).is_some();
                }
                match [b"alg".as_slice(), b"typ", b"kid", b"cty"].iter().position(|k| *k == key) {
                    Some(n) if !seen[n] => seen[n] = true,
                    _ => simple = false,
                }
                self.ws();
                if self.eat(b',') {
                    self.ws();
                    continue;
                }
                if self.eat(b'}') {
                    break;
                }
                return None;
            }
        }
        self.ws();
        if self.i != self.b.len() {
            return None;
        }
        if unknown {
            return Some(Header::Unknown);
        }
        let alg = match alg {
            // `alg` is required: no default for it in `jsonwebtoken`'s header.
            None => return Some(Header::Invalid),
            Some(Scanned::Str(s, false)) => s,
            // A non-string `alg` might still parse (serde reads an enum from
            // `{"HS256": null}` too): not worth mirroring.
            Some(_) => return Some(Header::Unknown),
        };
        let kid = match kid {
            None | Some(Scanned::Literal(b"null")) => None,
            Some(Scanned::Str(s, false)) => match std::str::from_utf8(s) {
                Ok(s) => Some(s),
                // `serde_json` refuses a string that is not UTF-8.
                Err(_) => return Some(Header::Invalid),
            },
            Some(_) => return Some(Header::Unknown),
        };
        Some(Header::Fields { alg, kid, simple: simple && algorithm(alg).is_some() })
    }
}

/// A claim's value, only as finely as the precheck needs to mirror
/// `jsonwebtoken`'s reading of it. Parsed through `deserialize_any`, the
/// very path `serde_json::Value` takes, so a payload that parses into
/// [`Claims`] also parses into the `Map<String, Value>` the full path reads
/// first (same syntax, same number ranges, same UTF-8 rule, same depth).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Json<'a> {
    Null,
    Bool,
    Str(&'a str),
    /// A string with escapes (`serde_json` copied it).
    Escaped,
    UInt(u64),
    NegInt,
    Float(f64),
    /// An array of strings only (possibly empty).
    Strings,
    OtherArray,
    Object,
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool)
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(s))
    }
    fn visit_str<E>(self, _: &str) -> Result<Json<'de>, E> {
        Ok(Json::Escaped)
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json<'de>, E> {
        Ok(Json::UInt(n))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Json<'de>, E> {
        // `serde_json` hands non-negative integers to `visit_u64`.
        Ok(Json::NegInt)
    }
    fn visit_f64<E>(self, f: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float(f))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut strings = true;
        while let Some(v) = seq.next_element::<Json<'de>>()? {
            strings &= matches!(v, Json::Str(_) | Json::Escaped);
        }
        Ok(if strings { Json::Strings } else { Json::OtherArray })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        while map.next_key::<Json<'de>>()?.is_some() {
            map.next_value::<Json<'de>>()?;
        }
        Ok(Json::Object)
    }
}

/// The registered claims `jsonwebtoken` validates, read from the payload.
#[derive(Debug, Default)]
struct Claims<'a> {
    exp: Option<Json<'a>>,
    nbf: Option<Json<'a>>,
    sub: Option<Json<'a>>,
    iss: Option<Json<'a>>,
    aud: Option<Json<'a>>,
    /// One of the five appeared twice (`jsonwebtoken`'s claims struct
    /// refuses that), or a key had escapes (it may have spelled one).
    unsure: bool,
}

impl<'de> Deserialize<'de> for Claims<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ClaimsVisitor;
        impl<'de> Visitor<'de> for ClaimsVisitor {
            type Value = Claims<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims<'de>, A::Error> {
                let mut c = Claims::default();
                while let Some(key) = map.next_key::<Json<'de>>()? {
                    let value = map.next_value::<Json<'de>>()?;
                    let slot = match key {
                        Json::Str("exp") => &mut c.exp,
                        Json::Str("nbf") => &mut c.nbf,
                        Json::Str("sub") => &mut c.sub,
                        Json::Str("iss") => &mut c.iss,
                        Json::Str("aud") => &mut c.aud,
                        Json::Str(_) => continue,
                        _ => {
                            c.unsure = true;
                            continue;
                        }
                    };
                    c.unsure |= slot.replace(value).is_some();
                }
                Ok(c)
            }
        }
        d.deserialize_map(ClaimsVisitor)
    }
}

/// `jsonwebtoken`'s `TryParse` of a claim, as far as it can be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parse {
    Parsed(u64),
    Failed,
    Absent,
}

/// `exp` / `nbf` through `jsonwebtoken`'s `numeric_type` (u64, or a finite
/// non-negative f64 rounded). `None`: an array or object, which that visitor
/// refuses without consuming, leaving `serde_json` mid-value.
fn numeric(v: Option<Json>) -> Option<Parse> {
    Some(match v {
        None => Parse::Absent,
        Some(Json::UInt(n)) => Parse::Parsed(n),
        Some(Json::Float(f)) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
            Parse::Parsed(f.round() as u64)
        }
        Some(Json::Float(_) | Json::NegInt | Json::Str(_) | Json::Escaped | Json::Bool | Json::Null) => {
            Parse::Failed
        }
        Some(Json::Strings | Json::OtherArray | Json::Object) => return None,
    })
}

/// `sub` as `Option<Cow<str>>`: `null` is absent. `None` for any non-string,
/// which `serde_json` may leave half read.
fn text(v: Option<Json>) -> Option<Parse> {
    match v {
        None | Some(Json::Null) => Some(Parse::Absent),
        Some(Json::Str(_) | Json::Escaped) => Some(Parse::Parsed(0)),
        Some(_) => None,
    }
}

/// `iss` / `aud` as an untagged string-or-set-of-strings: read whole into
/// serde's buffer first, so a mismatch is a clean `FailedToParse`.
fn texts(v: Option<Json>) -> Parse {
    match v {
        None | Some(Json::Null) => Parse::Absent,
        Some(Json::Str(_) | Json::Escaped | Json::Strings) => Parse::Parsed(0),
        Some(_) => Parse::Failed,
    }
}

/// Whether `jsonwebtoken::decode` surely fails with `ExpiredSignature` on a
/// token whose header it parses and whose signature it accepts, with these
/// claims (decoded payload), `validation` and clock `now`. `false` means
/// "cannot tell" as well as "no".
///
/// Mirrors `decode` from the claims on: the payload into a
/// `Map<String, Value>`, then into `ClaimsForValidation`, then `validate`'s
/// checks in order (required claims, `exp`/`nbf` formats, the early-expiry
/// bound, then `exp`), so a token an earlier check refuses as invalid is
/// never called expired.
pub(super) fn surely_expired(claims: &[u8], validation: &Validation, now: u64) -> bool {
    // An escape makes `serde_json` copy the string (an allocation); such
    // payloads are left to the full path.
    if claims.contains(&b'\\') {
        return false;
    }
    let Ok(c) = serde_json::from_slice::<Claims>(claims) else {
        return false;
    };
    if c.unsure {
        return false;
    }
    let (Some(exp), Some(nbf), Some(sub)) = (numeric(c.exp), numeric(c.nbf), text(c.sub)) else {
        return false;
    };
    let (iss, aud) = (texts(c.iss), texts(c.aud));
    for claim in &validation.required_spec_claims {
        let present = match claim.as_str() {
            "exp" => exp,
            "nbf" => nbf,
            "sub" => sub,
            "iss" => iss,
            "aud" => aud,
            _ => continue,
        };
        if !matches!(present, Parse::Parsed(_)) {
            return false;
        }
    }
    if !validation.validate_exp {
        return false;
    }
    if exp == Parse::Failed || (validation.validate_nbf && nbf == Parse::Failed) {
        return false;
    }
    let Parse::Parsed(exp) = exp else {
        return false;
    };
    let early = validation.reject_tokens_expiring_in_less_than;
    if exp < early {
        return false;
    }
    // `jsonwebtoken` computes `now - leeway` unchecked; a clock that low
    // is not worth mirroring.
    now.checked_sub(validation.leeway).is_some_and(|limit| exp - early < limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(alg: &'static str, kid: Option<&'static str>, simple: bool) -> Header<'static> {
        Header::Fields { alg: alg.as_bytes(), kid, simple }
    }

    #[test]
    fn headers_scanned() {
        for (text, want) in [
            (r#"{"alg":"HS256","typ":"JWT"}"#, fields("HS256", None, true)),
            (r#" { "typ" : "JWT" , "alg" : "HS512" , "kid" : "k1" } "#, fields("HS512", Some("k1"), true)),
            (r#"{"alg":"HS256","kid":null}"#, fields("HS256", None, false)),
            (r#"{"alg":"none"}"#, fields("none", None, false)),
            (r#"{"alg":"HS256","x":{"alg":"RS256","y":["}"]},"n":-1.5e3}"#, fields("HS256", None, false)),
            (r#"{"alg":"HS256","typ":"JWT","typ":"JWT"}"#, fields("HS256", None, false)),
            (r#"{"alg":"HS256","typ":"a\tb"}"#, fields("HS256", None, false)),
            (r#"{"alg":"HS256","typ":"a\"b"}"#, fields("HS256", None, false)),
            (r#"{"typ":"JWT"}"#, Header::Invalid),
            ("{}", Header::Invalid),
            ("", Header::Invalid),
            ("[]", Header::Invalid),
            (r#"{"alg":"HS256",}"#, Header::Invalid),
            (r#"{"alg":"HS256"} x"#, Header::Invalid),
            (r#"{"alg":"HS256""#, Header::Invalid),
            (r#"{"alg" "HS256"}"#, Header::Invalid),
            (r#"{"alg":"HS256","x":[1,2}"#, Header::Invalid),
            ("\u{feff}{\"alg\":\"HS256\"}", Header::Invalid),
            (r#"{"\u0061lg":"none","alg":"HS256"}"#, Header::Unknown),
            (r#"{"alg":"HS256","alg":"HS256"}"#, Header::Unknown),
            (r#"{"alg":{"HS256":null}}"#, Header::Unknown),
            (r#"{"alg":"HS\u0032\u0035\u0036"}"#, Header::Unknown),
            (r#"{"alg":"HS256","kid":7}"#, Header::Unknown),
        ] {
            assert_eq!(scan_header(text.as_bytes()), want, "{text}");
        }
        assert_eq!(scan_header(b"{\"alg\":\"HS256\",\"kid\":\"\xff\"}"), Header::Invalid);
    }

    /// JSON texts near a header's shape: mostly well formed, sometimes with
    /// a byte of junk, a repeated or escaped key, or a value of another type.
    fn header_text() -> impl Strategy<Value = String> {
        let alg_value = prop_oneof![
            12 => prop::sample::select(vec!["\"HS256\"", "\"HS512\"", "\"RS256\"", "\"none\"", "\"\""])
                .prop_map(str::to_string),
            1 => Just("{\"HS256\":null}".to_string()),
            1 => Just("\"HS\\u0032\\u0035\\u0036\"".to_string()),
            1 => Just("null".to_string()),
        ];
        let key = prop_oneof![
            8 => prop::sample::select(vec!["typ", "kid", "cty"]).prop_map(str::to_string),
            1 => Just("alg".to_string()),
            1 => Just("\\u0061lg".to_string()),
            3 => "[a-z]{1,4}",
        ];
        let value = prop_oneof![
            8 => prop::sample::select(vec!["\"JWT\"", "\"k1\"", "\"\""]).prop_map(str::to_string),
            1 => Just("null".to_string()),
            1 => Just("true".to_string()),
            1 => Just("-1.5e3".to_string()),
            1 => Just("01".to_string()),
            1 => Just("[\"a\",{\"b\":[]}]".to_string()),
            1 => Just("\"a\\\"b\"".to_string()),
            1 => Just("\"\\u00e9\"".to_string()),
            2 => "\"[ -~]{0,6}\"",
        ];
        let member = (key, value).prop_map(|(k, v)| format!("\"{k}\":{v}"));
        (
            prop::option::weighted(0.9, alg_value),
            prop::collection::vec(member, 0..4),
            any::<prop::sample::Index>(),
            prop::sample::select(vec!["", "", "", " \n", ",", "}", "x", "\t", "\u{1}"]),
        )
            .prop_map(|(alg, mut members, at, junk)| {
                if let Some(a) = alg {
                    let i = at.index(members.len() + 1);
                    members.insert(i, format!("\"alg\":{a}"));
                }
                let text = format!("{{{}}}", members.join(","));
                let i = at.index(text.len() + 1);
                format!("{}{junk}{}", &text[..i], &text[i..])
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The scanner against `jsonwebtoken`'s own header parsing.
        #[test]
        fn scanner_agrees_with_jsonwebtoken(text in header_text()) {
            let parsed = serde_json::from_slice::<jsonwebtoken::Header>(text.as_bytes());
            match scan_header(text.as_bytes()) {
                Header::Invalid => prop_assert!(parsed.is_err(), "{text}: {parsed:?}"),
                Header::Fields { alg, kid, simple } => {
                    if simple {
                        prop_assert!(parsed.is_ok(), "{text}: {parsed:?}");
                    }
                    if let Ok(h) = parsed {
                        prop_assert_eq!(algorithm(alg), Some(h.alg), "{}", text);
                        prop_assert_eq!(kid, h.kid.as_deref(), "{}", text);
                    }
                }
                Header::Unknown => {}
            }
        }
    }

    #[test]
    fn algorithm_names_are_jsonwebtokens() {
        use jsonwebtoken::AlgorithmFamily;
        for family in [AlgorithmFamily::Hmac, AlgorithmFamily::Rsa, AlgorithmFamily::Ec, AlgorithmFamily::Ed]
        {
            for &alg in family.algorithms() {
                let name = serde_json::to_value(alg).unwrap();
                assert_eq!(algorithm(name.as_str().unwrap().as_bytes()), Some(alg));
            }
        }
        assert_eq!(algorithm(b"none"), None);
        assert_eq!(algorithm(b"hs256"), None);
    }

    #[test]
    fn split_needs_exactly_two_dots() {
        assert!(split("a.b.c").is_some_and(|p| p.header == "a" && p.payload == "b" && p.message == b"a.b"));
        assert!(split("..").is_some());
        for t in ["abc", "a.b", "a.b.c.d", "a..b.c"] {
            assert!(split(t).is_none(), "{t}");
        }
    }

    #[test]
    fn decode_is_strict_base64url() {
        let mut buf = [0u8; 8];
        assert_eq!(decode("YWJj", &mut buf), Decoded::Bytes(b"abc"));
        assert_eq!(decode("YWJjZA", &mut buf), Decoded::Bytes(b"abcd"));
        for bad in ["YWJjZA==", "YWJjZ", "YW+j", "YW/j", "YWJjZB", " YWJj"] {
            assert_eq!(decode(bad, &mut buf), Decoded::Invalid, "{bad}");
        }
        assert_eq!(decode("YWJjYWJjYWJjYWJj", &mut buf), Decoded::TooLong);
    }
}
