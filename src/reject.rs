//! Why a connection was refused or ended: one closed set of reasons.
//!
//! Each variant is the `reason` label of the metrics, the `reason` field of
//! the log line, and (for [`Reject`]) the HTTP status or (for [`CloseReason`])
//! the WebSocket close code. Nothing else in the crate spells these strings.

use std::fmt;

/// A refusal before the upgrade (pipeline stages 1–6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    Banned,
    GlobalCap,
    HandshakeCap,
    HandshakeShed,
    IpCap,
    ProxyHeader,
    IpRate,
    HandshakeTimeout,
    HeaderTooLarge,
    BadRequest,
    BadVersion,
    BadPath,
    Origin,
    MissingToken,
    InvalidToken,
    ExpiredToken,
    RevokedToken,
    UserCap,
    UpstreamUnavailable,
}

impl Reject {
    /// Every variant, in pipeline order: metrics export each at 0 from start.
    pub const ALL: [Reject; 19] = [
        Reject::Banned,
        Reject::GlobalCap,
        Reject::HandshakeCap,
        Reject::HandshakeShed,
        Reject::IpCap,
        Reject::ProxyHeader,
        Reject::IpRate,
        Reject::HandshakeTimeout,
        Reject::HeaderTooLarge,
        Reject::BadRequest,
        Reject::BadVersion,
        Reject::BadPath,
        Reject::Origin,
        Reject::MissingToken,
        Reject::InvalidToken,
        Reject::ExpiredToken,
        Reject::RevokedToken,
        Reject::UserCap,
        Reject::UpstreamUnavailable,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            Reject::Banned => "banned",
            Reject::GlobalCap => "global_cap",
            Reject::HandshakeCap => "handshake_cap",
            Reject::HandshakeShed => "handshake_shed",
            Reject::IpCap => "ip_cap",
            Reject::ProxyHeader => "proxy_header",
            Reject::IpRate => "ip_rate",
            Reject::HandshakeTimeout => "handshake_timeout",
            Reject::HeaderTooLarge => "header_too_large",
            Reject::BadRequest => "bad_request",
            Reject::BadVersion => "bad_version",
            Reject::BadPath => "bad_path",
            Reject::Origin => "origin",
            Reject::MissingToken => "missing_token",
            Reject::InvalidToken => "invalid_token",
            Reject::ExpiredToken => "expired_token",
            Reject::RevokedToken => "revoked_token",
            Reject::UserCap => "user_cap",
            Reject::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    /// The HTTP status answered, or `None` when the socket is closed without
    /// reading (stage 1: answering would cost what the cap protects).
    /// `HandshakeTimeout` answers 408 only when a head had started; the
    /// handshake stage decides that.
    pub const fn status(self) -> Option<u16> {
        match self {
            Reject::Banned
            | Reject::GlobalCap
            | Reject::HandshakeCap
            | Reject::IpCap
            | Reject::ProxyHeader => None,
            Reject::IpRate | Reject::UserCap => Some(429),
            Reject::HandshakeTimeout | Reject::HandshakeShed => Some(408),
            Reject::HeaderTooLarge => Some(431),
            Reject::BadRequest => Some(400),
            Reject::BadVersion => Some(426),
            Reject::BadPath => Some(404),
            Reject::Origin => Some(403),
            Reject::MissingToken | Reject::InvalidToken | Reject::ExpiredToken | Reject::RevokedToken => {
                Some(401)
            }
            Reject::UpstreamUnavailable => Some(502),
        }
    }

    /// What a refusal adds to its address's strike score (`ban`): what no
    /// honest client sends weighs 1, what a misconfigured one may send
    /// weighs less, and what an honest client or our own load causes
    /// weighs nothing. A silent socket's timeout (nothing received) is
    /// not a strike either; the pipeline tells it apart
    /// ([`Reject::HandshakeTimeout`] weighs 1 for a partial head).
    ///
    /// `origin` weighs nothing on purpose: another site's page can make
    /// its visitors' browsers connect, and must not get them banned.
    pub const fn strike(self) -> f32 {
        match self {
            Reject::ProxyHeader
            | Reject::HandshakeTimeout
            | Reject::HeaderTooLarge
            | Reject::BadRequest
            | Reject::InvalidToken => 1.0,
            Reject::IpRate
            | Reject::BadVersion
            | Reject::BadPath
            | Reject::MissingToken
            | Reject::RevokedToken => 0.5,
            Reject::Banned
            | Reject::GlobalCap
            | Reject::HandshakeCap
            | Reject::HandshakeShed
            | Reject::IpCap
            | Reject::Origin
            | Reject::ExpiredToken
            | Reject::UserCap
            | Reject::UpstreamUnavailable => 0.0,
        }
    }

    /// The `error_description` of the `WWW-Authenticate` challenge; `None`
    /// for a missing token, which gets the bare challenge (RFC 6750 §3.1).
    pub const fn token_error(self) -> Option<&'static str> {
        match self {
            Reject::InvalidToken => Some("the token is invalid"),
            Reject::ExpiredToken => Some("the token has expired"),
            Reject::RevokedToken => Some("the token has been revoked"),
            _ => None,
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why an upgraded connection ended (stage 8). The first rule to fire wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    ClientClose,
    UpstreamClose,
    PongTimeout,
    Idle,
    TokenExpired,
    Revoked,
    Evicted,
    MessageTooBig,
    MsgRate,
    SlowReader,
    MaxLifetime,
    UpstreamLost,
    Drain,
    Error,
    UpstreamStalled,
    BackendDrain,
}

impl CloseReason {
    pub const ALL: [CloseReason; 16] = [
        CloseReason::ClientClose,
        CloseReason::UpstreamClose,
        CloseReason::PongTimeout,
        CloseReason::Idle,
        CloseReason::TokenExpired,
        CloseReason::Revoked,
        CloseReason::Evicted,
        CloseReason::MessageTooBig,
        CloseReason::MsgRate,
        CloseReason::SlowReader,
        CloseReason::MaxLifetime,
        CloseReason::UpstreamLost,
        CloseReason::Drain,
        CloseReason::Error,
        CloseReason::UpstreamStalled,
        CloseReason::BackendDrain,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client_close",
            CloseReason::UpstreamClose => "upstream_close",
            CloseReason::PongTimeout => "pong_timeout",
            CloseReason::Idle => "idle",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::Revoked => "revoked",
            CloseReason::Evicted => "evicted",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::MsgRate => "msg_rate",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::MaxLifetime => "max_lifetime",
            CloseReason::UpstreamLost => "upstream_lost",
            CloseReason::Drain => "drain",
            CloseReason::Error => "error",
            CloseReason::UpstreamStalled => "upstream_stalled",
            CloseReason::BackendDrain => "backend_drain",
        }
    }

    /// The close code the gateway sends. `ClientClose` / `UpstreamClose`
    /// carry the peer's code across instead; `Error` sends 1011 here and the
    /// session sends 1002 for a protocol error.
    pub const fn close_code(self) -> u16 {
        match self {
            CloseReason::ClientClose | CloseReason::UpstreamClose | CloseReason::Idle => 1000,
            CloseReason::PongTimeout | CloseReason::Error | CloseReason::UpstreamStalled => 1011,
            CloseReason::TokenExpired
            | CloseReason::Revoked
            | CloseReason::Evicted
            | CloseReason::MsgRate
            | CloseReason::SlowReader => 1008,
            CloseReason::MessageTooBig => 1009,
            CloseReason::MaxLifetime | CloseReason::Drain => 1001,
            CloseReason::UpstreamLost => 1014,
            // Service Restart: the client may reconnect at once (to another backend).
            CloseReason::BackendDrain => 1012,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn labels_are_unique_and_snake_case() {
        let r: HashSet<_> = Reject::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(r.len(), Reject::ALL.len());
        let c: HashSet<_> = CloseReason::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(c.len(), CloseReason::ALL.len());
        for l in r.iter().chain(c.iter()) {
            assert!(l.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'), "{l}");
        }
    }

    #[test]
    fn all_is_in_declaration_order() {
        // Metrics index their per-reason counters by discriminant.
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, c) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn statuses_follow_spec() {
        let want = [
            ("banned", None),
            ("global_cap", None),
            ("handshake_cap", None),
            ("handshake_shed", Some(408)),
            ("ip_cap", None),
            ("proxy_header", None),
            ("ip_rate", Some(429)),
            ("handshake_timeout", Some(408)),
            ("header_too_large", Some(431)),
            ("bad_request", Some(400)),
            ("bad_version", Some(426)),
            ("bad_path", Some(404)),
            ("origin", Some(403)),
            ("missing_token", Some(401)),
            ("invalid_token", Some(401)),
            ("expired_token", Some(401)),
            ("revoked_token", Some(401)),
            ("user_cap", Some(429)),
            ("upstream_unavailable", Some(502)),
        ];
        assert_eq!(want.len(), Reject::ALL.len());
        for (r, (label, status)) in Reject::ALL.iter().zip(want) {
            assert_eq!((r.label(), r.status()), (label, status));
        }
    }

    #[test]
    fn only_what_no_honest_client_causes_strikes() {
        use Reject::*;
        // Our own load, user caps, expired tokens and other sites' pages
        // never count against an address.
        for r in [GlobalCap, HandshakeCap, HandshakeShed, IpCap, UserCap, ExpiredToken, Origin, Banned] {
            assert_eq!(r.strike(), 0.0, "{r}");
        }
        for r in [InvalidToken, BadRequest, HeaderTooLarge, HandshakeTimeout, IpRate] {
            assert!(r.strike() > 0.0, "{r}");
        }
    }

    #[test]
    fn close_codes_follow_spec() {
        use CloseReason::*;
        let want = [
            (PongTimeout, 1011),
            (Idle, 1000),
            (TokenExpired, 1008),
            (Revoked, 1008),
            (Evicted, 1008),
            (MessageTooBig, 1009),
            (MsgRate, 1008),
            (SlowReader, 1008),
            (MaxLifetime, 1001),
            (UpstreamLost, 1014),
            (UpstreamStalled, 1011),
            (Drain, 1001),
            (BackendDrain, 1012),
        ];
        for (reason, code) in want {
            assert_eq!(reason.close_code(), code, "{reason}");
        }
    }
}
