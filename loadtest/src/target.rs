//! Where traffic may go: the `ws://` / `wss://` target, the `http://`
//! metrics URL and the source-address ranges, all parsed here and all held
//! to one [`Reach`] policy.
//!
//! **Invariant:** by default every address this tool connects to or binds is
//! loopback (127.0.0.0/8 or `::1`, see [`ensure_allowed`]): a typo in a URL
//! must not aim an attack at a machine the operator does not own. Only
//! `--allow-remote` ([`Reach::Remote`]) lifts it, and then source addresses
//! must still be addresses of this host ([`ensure_local`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Most source addresses one range may expand to (a /16 of loopback): plenty
/// for per-IP limits, small enough that a typo cannot allocate gigabytes.
pub const MAX_SOURCE_IPS: usize = 65_536;

/// A parse or policy error, shown to the user as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetError(pub String);

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TargetError {}

fn err<T>(msg: impl Into<String>) -> Result<T, TargetError> {
    Err(TargetError(msg.into()))
}

/// Which addresses a run may talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reach {
    /// Loopback only (the default).
    #[default]
    Loopback,
    /// Any target (`--allow-remote`); sources must be local addresses.
    Remote,
}

/// A parsed `ws://` or `wss://host:port/path?query` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The socket address connected to.
    pub addr: SocketAddr,
    /// The `Host` header value, as the user wrote it (`127.0.0.1:8080`).
    pub host_header: String,
    /// Path and query sent in the request line (`/`, `/ws?x=1`).
    pub path: String,
    /// `wss://`: TLS before the upgrade.
    pub tls: bool,
    /// The host without port or brackets: TLS server name (SNI, certificate check).
    pub host: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "wss" } else { "ws" };
        write!(f, "{scheme}://{}{}", self.host_header, self.path)
    }
}

/// Refuses anything but loopback (127.0.0.0/8, `::1`, and IPv4-mapped
/// loopback).
pub fn ensure_loopback(ip: IpAddr, what: &str) -> Result<(), TargetError> {
    if ip.to_canonical().is_loopback() {
        Ok(())
    } else {
        err(format!(
            "{what}: {ip} is not a loopback address. By default the load tester only talks to \
             this machine (127.0.0.0/8, ::1), so that a mistyped URL cannot aim an attack at a \
             host you do not run; pass --allow-remote to load a gateway on another host"
        ))
    }
}

/// Applies the reach policy to an address connected to.
pub fn ensure_allowed(ip: IpAddr, what: &str, reach: Reach) -> Result<(), TargetError> {
    match reach {
        Reach::Loopback => ensure_loopback(ip, what),
        Reach::Remote => Ok(()),
    }
}

/// Checks that `ip` is an address of this host, by binding a socket to it
/// (the kernel refuses non-local addresses with EADDRNOTAVAIL).
pub fn ensure_local(ip: IpAddr) -> Result<(), TargetError> {
    match std::net::TcpListener::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => Ok(()),
        Err(e) => err(format!("source IP {ip} is not an address of this host ({e})")),
    }
}

/// Splits `scheme://authority/rest` for the given scheme, resolving the
/// authority to a loopback socket address.
fn split_url(
    url: &str,
    scheme: &str,
    default_port: u16,
    what: &str,
    reach: Reach,
) -> Result<(SocketAddr, String, String, String), TargetError> {
    let Some(rest) = url.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) else {
        if url.starts_with("https://") {
            return err(format!("{what}: https:// is not supported (use http://): {url}"));
        }
        return err(format!("{what}: expected {scheme}://HOST[:PORT][/PATH], got {url:?}"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
    if authority.is_empty() {
        return err(format!("{what}: missing host in {url:?}"));
    }
    if authority.contains('@') {
        return err(format!("{what}: user info is not supported in {url:?}"));
    }
    // Host and optional port; IPv6 literals are bracketed.
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some(end) = v6.find(']') else {
            return err(format!("{what}: unterminated IPv6 literal in {url:?}"));
        };
        let host = &v6[..end];
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return err(format!("{what}: junk after IPv6 literal in {url:?}")),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| TargetError(format!("{what}: bad port {p:?} in {url:?}")))?,
        None => default_port,
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else if let Ok(ip) = host.parse() {
        ip
    } else if reach == Reach::Remote {
        resolve(host, port, what)?
    } else {
        return err(format!(
            "{what}: host {host:?} must be an IP literal or localhost (no DNS without --allow-remote)"
        ));
    };
    ensure_allowed(ip, what, reach)?;
    Ok((SocketAddr::new(ip, port), authority.to_string(), path, host.to_string()))
}

/// Resolves a host name once, before the run (first address wins).
fn resolve(host: &str, port: u16, what: &str) -> Result<IpAddr, TargetError> {
    use std::net::ToSocketAddrs;
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| TargetError(format!("{what}: cannot resolve {host:?}: {e}")))?;
    addrs.next().map(|a| a.ip()).ok_or_else(|| TargetError(format!("{what}: {host:?} has no address")))
}

/// Parses a loopback `ws://` / `wss://` target (`ws://127.0.0.1:8080/`,
/// `wss://[::1]:8443/ws`).
pub fn parse_ws_url(url: &str) -> Result<Target, TargetError> {
    parse_ws_url_with(url, Reach::Loopback)
}

/// Parses a `ws://` / `wss://` target under the given reach policy.
pub fn parse_ws_url_with(url: &str, reach: Reach) -> Result<Target, TargetError> {
    let (scheme, port, tls) = if url.starts_with("wss://") { ("wss", 443, true) } else { ("ws", 80, false) };
    let (addr, host_header, path, host) = split_url(url, scheme, port, "target", reach)?;
    Ok(Target { addr, host_header, path, tls, host })
}

/// Parses a loopback `http://` URL (the admin `/metrics` endpoint).
pub fn parse_http_url(url: &str) -> Result<Target, TargetError> {
    parse_http_url_with(url, Reach::Loopback)
}

/// Parses an `http://` URL under the given reach policy.
pub fn parse_http_url_with(url: &str, reach: Reach) -> Result<Target, TargetError> {
    let (addr, host_header, path, host) = split_url(url, "http", 80, "metrics URL", reach)?;
    Ok(Target { addr, host_header, path, tls: false, host })
}

/// Expands `127.0.0.2-127.0.0.41,127.0.0.50,::1` into loopback addresses.
pub fn parse_ip_ranges(spec: &str) -> Result<Vec<IpAddr>, TargetError> {
    parse_ip_ranges_with(spec, Reach::Loopback)
}

/// Expands address ranges under the reach policy. Each item is an address or
/// an inclusive `FIRST-LAST` range of one family. Loopback: every address
/// must be loopback. Remote: every address must be one of this host's
/// (checked by binding it, see [`ensure_local`]).
pub fn parse_ip_ranges_with(spec: &str, reach: Reach) -> Result<Vec<IpAddr>, TargetError> {
    let out = expand_ranges(spec, reach)?;
    if reach == Reach::Remote {
        for ip in &out {
            ensure_local(*ip)?;
        }
    }
    Ok(out)
}

fn expand_ranges(spec: &str, reach: Reach) -> Result<Vec<IpAddr>, TargetError> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (a, b) = match item.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (item, item),
        };
        let first: IpAddr = a.parse().map_err(|_| TargetError(format!("source IPs: bad address {a:?}")))?;
        let last: IpAddr = b.parse().map_err(|_| TargetError(format!("source IPs: bad address {b:?}")))?;
        ensure_allowed(first, "source IPs", reach)?;
        ensure_allowed(last, "source IPs", reach)?;
        match (first, last) {
            (IpAddr::V4(f), IpAddr::V4(l)) => {
                let (f, l) = (u32::from(f), u32::from(l));
                if f > l {
                    return err(format!("source IPs: empty range {item:?}"));
                }
                if (l - f) as usize + out.len() >= MAX_SOURCE_IPS {
                    return err(format!("source IPs: more than {MAX_SOURCE_IPS} addresses"));
                }
                out.extend((f..=l).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
            }
            (IpAddr::V6(f), IpAddr::V6(l)) => {
                // Loopback IPv6 is the single address ::1; elsewhere list
                // IPv6 addresses one by one.
                let allowed = f == l && (reach == Reach::Remote || f == Ipv6Addr::LOCALHOST);
                if !allowed {
                    return err(format!("source IPs: IPv6 ranges are not supported ({item:?})"));
                }
                out.push(IpAddr::V6(f));
            }
            _ => return err(format!("source IPs: range mixes IPv4 and IPv6 ({item:?})")),
        }
    }
    if out.is_empty() {
        return err("source IPs: empty list");
    }
    Ok(out)
}

/// The source addresses a run binds before connecting, chosen round-robin by
/// the connection's global index so that every worker spreads alike.
#[derive(Debug, Clone, Default)]
pub struct SourcePool {
    /// Empty means "let the kernel choose" (no bind).
    ips: Vec<IpAddr>,
}

impl SourcePool {
    /// A pool over `ips`, checked against the target's address family.
    pub fn new(ips: Vec<IpAddr>, target: &SocketAddr) -> Result<Self, TargetError> {
        if let Some(bad) = ips.iter().find(|ip| ip.is_ipv4() != target.is_ipv4()) {
            return err(format!("source IP {bad} is not of the target's address family ({})", target.ip()));
        }
        Ok(SourcePool { ips })
    }

    /// The address for connection `index`, or `None` to let the kernel pick.
    pub fn pick(&self, index: u64) -> Option<IpAddr> {
        if self.ips.is_empty() {
            None
        } else {
            Some(self.ips[(index % self.ips.len() as u64) as usize])
        }
    }

    /// How many addresses the pool spreads over (0 = kernel's choice).
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// True when no source address is bound.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        let t = parse_ws_url("ws://127.0.0.1:8080/").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert_eq!(t.path, "/");
        let t = parse_ws_url("ws://127.0.0.1:9").unwrap();
        assert_eq!(t.path, "/");
        let t = parse_ws_url("ws://localhost/chat?room=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        assert_eq!(t.path, "/chat?room=1");
        let t = parse_ws_url("ws://127.9.8.7:1?x").unwrap();
        assert_eq!(t.path, "/?x");
        let t = parse_ws_url("ws://[::1]:8080/ws").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(t.host_header, "[::1]:8080");
        assert_eq!(t.to_string(), "ws://[::1]:8080/ws");
    }

    #[test]
    fn ws_urls_refused() {
        for bad in [
            "http://127.0.0.1:8080/",
            "wss://10.0.0.1:8443/",
            "ws://10.0.0.1:8080/",
            "ws://192.168.1.1/",
            "ws://8.8.8.8:80/",
            "ws://[2001:db8::1]:80/",
            "ws://example.com/",
            "ws://127.0.0.1:99999/",
            "ws://127.0.0.1:x/",
            "ws:///",
            "ws://u@127.0.0.1/",
            "ws://[::1/",
            "127.0.0.1:8080",
        ] {
            assert!(parse_ws_url(bad).is_err(), "{bad} should be refused");
        }
        let e = parse_ws_url("ws://10.1.2.3:80/").unwrap_err();
        assert!(e.0.contains("not a loopback") && e.0.contains("--allow-remote"), "{e}");
    }

    #[test]
    fn remote_and_tls_urls() {
        let t = parse_ws_url("wss://127.0.0.1:8443/ws").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.addr.port()), ("127.0.0.1", 8443));
        assert_eq!(t.to_string(), "wss://127.0.0.1:8443/ws");
        assert_eq!(parse_ws_url("wss://localhost/").unwrap().addr.port(), 443);
        assert!(parse_ws_url("ws://10.0.0.5:8080/").is_err());
        let t = parse_ws_url_with("ws://10.0.0.5:8080/", Reach::Remote).unwrap();
        assert_eq!(t.addr, "10.0.0.5:8080".parse().unwrap());
        assert!(parse_http_url_with("http://10.0.0.5:9090/metrics", Reach::Remote).is_ok());
        // Source addresses must be this host's, even when the target may be remote.
        assert!(parse_ip_ranges_with("127.0.0.1", Reach::Remote).is_ok());
        let e = parse_ip_ranges_with("192.0.2.77", Reach::Remote).unwrap_err();
        assert!(e.0.contains("not an address of this host"), "{e}");
        assert!(parse_ip_ranges("192.0.2.77").is_err());
    }

    #[test]
    fn http_urls() {
        let t = parse_http_url("http://127.0.0.1:9090/metrics").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(t.path, "/metrics");
        assert!(parse_http_url("http://172.16.0.1:9090/metrics").is_err());
        assert!(parse_http_url("https://127.0.0.1/metrics").is_err());
        assert!(parse_http_url("ws://127.0.0.1/metrics").is_err());
    }

    #[test]
    fn ip_ranges() {
        let v = parse_ip_ranges("127.0.0.2-127.0.0.41").unwrap();
        assert_eq!(v.len(), 40);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v[39], "127.0.0.41".parse::<IpAddr>().unwrap());
        let v = parse_ip_ranges("127.0.0.255-127.0.1.1, 127.0.0.9").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1], "127.0.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(v[3], "127.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(parse_ip_ranges("::1").unwrap().len(), 1);
    }

    #[test]
    fn ip_ranges_refused() {
        for bad in [
            "",
            "127.0.0.9-127.0.0.2",
            "10.0.0.1-10.0.0.9",
            "127.0.0.250-128.0.0.3",
            "127.0.0.1-::1",
            "127.0.0.x",
            "127.0.0.0-127.255.255.255",
        ] {
            assert!(parse_ip_ranges(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn source_pool_round_robin_and_family() {
        let target: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let pool = SourcePool::new(parse_ip_ranges("127.0.0.2-127.0.0.4").unwrap(), &target).unwrap();
        assert_eq!(pool.pick(0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(pool.pick(4), Some("127.0.0.3".parse().unwrap()));
        assert_eq!(SourcePool::default().pick(7), None);
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert!(SourcePool::new(parse_ip_ranges("127.0.0.2").unwrap(), &v6).is_err());
    }
}
