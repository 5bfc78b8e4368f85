//! Who the client is: the socket peer, or — for a peer in
//! `listen.trusted_proxies` — the address its PROXY header (v1/v2) or
//! `X-Forwarded-For` gives. From any other peer, PROXY headers are refused
//! and `X-Forwarded-For` is ignored, so a client cannot spoof its way
//! around per-IP limits.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::handshake::RequestHead;

/// A PROXY v2 header with TLVs is at most this long in practice; a longer
/// one is refused rather than buffered.
const MAX_PROXY_HEADER: usize = 1024;

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    trusted.iter().any(|net| net.contains(&ip))
}

/// Reads a PROXY v1 or v2 header under `deadline`, and not one byte past
/// it: what follows belongs to the next layer, the HTTP head or a TLS
/// ClientHello (load balancers often send the header in the same segment
/// as the client's first bytes, and the TLS acceptor must read those
/// itself). So bytes are peeked, and consumed only once known to be header.
/// Returns the source address it names (`None` for `LOCAL` / `UNKNOWN`,
/// e.g. a health check). `Err` for a missing, malformed or late header.
pub async fn read_proxy_header(tcp: &mut TcpStream, deadline: Instant) -> Result<Option<SocketAddr>, ()> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; MAX_PROXY_HEADER];
    loop {
        let room = MAX_PROXY_HEADER - buf.len();
        if room == 0 {
            return Err(());
        }
        let n = match timeout_at(deadline, tcp.peek(&mut chunk[..room])).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Err(()),
        };
        let before = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        let (addr, len) = match parse_proxy_header(&buf) {
            ProxyParse::Incomplete => {
                // Every byte so far is header: consume them, so that the next
                // peek waits for more instead of returning the same bytes.
                consume(tcp, &mut chunk[..n], deadline).await?;
                continue;
            }
            ProxyParse::Malformed => return Err(()),
            ProxyParse::Header { source, len } => (source, len),
        };
        // The header was incomplete without the peeked bytes, so it ends
        // within them: consume up to its end and not further.
        let take = len.checked_sub(before).filter(|t| *t <= n).ok_or(())?;
        consume(tcp, &mut chunk[..take], deadline).await?;
        return Ok(addr);
    }
}

/// What the bytes so far say of a PROXY header.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyParse {
    /// A prefix of a header: more bytes are needed.
    Incomplete,
    /// Not a PROXY header (v1 or v2), or a broken one.
    Malformed,
    /// A whole header of `len` bytes, naming `source` (`None` for `LOCAL`
    /// / `UNKNOWN`).
    Header { source: Option<SocketAddr>, len: usize },
}

/// Parses a PROXY header (v1 or v2) at the start of `buf`; pure, so it can
/// be fuzzed.
pub fn parse_proxy_header(buf: &[u8]) -> ProxyParse {
    let parsed = HeaderResult::parse(buf);
    if parsed.is_incomplete() {
        // A v1 line ends at its CRLF: past it, "incomplete" (as `ppp`
        // says of e.g. `PROXY TCP4 x\r\n`) is malformed; fail now, not
        // at the deadline.
        if buf.starts_with(b"PROXY ") && buf.windows(2).any(|w| w == b"\r\n") {
            return ProxyParse::Malformed;
        }
        return ProxyParse::Incomplete;
    }
    let (source, len) = match parsed {
        HeaderResult::V1(Ok(h)) => {
            let addr = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                ppp::v1::Addresses::Unknown => None,
            };
            (addr, h.header.len())
        }
        HeaderResult::V2(Ok(h)) => {
            let addr = match (h.command, h.addresses) {
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                _ => None,
            };
            (addr, h.len())
        }
        _ => return ProxyParse::Malformed,
    };
    if len > buf.len() {
        return ProxyParse::Malformed;
    }
    ProxyParse::Header { source, len }
}

/// Reads (and drops) exactly `buf.len()` bytes that a peek already saw.
async fn consume(tcp: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), ()> {
    match timeout_at(deadline, tcp.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(()),
    }
}

/// The client address by `X-Forwarded-For`: the rightmost address that is
/// not itself a trusted proxy. `peer` is the (trusted) socket peer; it is
/// the answer when every hop is trusted or the header is absent or broken.
pub fn from_forwarded_for(head: &RequestHead, trusted: &[IpNet], peer: IpAddr) -> IpAddr {
    let hops: Vec<&str> = head
        .headers_named("x-forwarded-for")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // Some balancers (Azure Application Gateway) append `ip:port`.
        let parsed = hop.parse::<IpAddr>().or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()));
        let Ok(ip) = parsed else { break };
        client = ip;
        if !is_trusted(trusted, ip) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn head(xff: &[&str]) -> RequestHead {
        RequestHead {
            method: "GET".into(),
            target: "/".into(),
            headers: xff.iter().map(|v| ("X-Forwarded-For".to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let t = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let h = head(&["1.1.1.1, 2.2.2.2", "10.0.0.7"]);
        assert_eq!(from_forwarded_for(&h, &t, peer), "2.2.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(from_forwarded_for(&head(&[]), &t, peer), peer);
        assert_eq!(from_forwarded_for(&head(&["garbage"]), &t, peer), peer);
        let with_ports = head(&["3.3.3.3:4711, [2001:db8::1]:443", "10.0.0.7:80"]);
        assert_eq!(from_forwarded_for(&with_ports, &t, peer), "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    /// A connected loopback pair: (the proxy's end, the gateway's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    fn deadline() -> Instant {
        Instant::now() + std::time::Duration::from_secs(1)
    }

    async fn rest(mut c: TcpStream, mut s: TcpStream) -> Vec<u8> {
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        rest
    }

    #[tokio::test]
    async fn proxy_v1_and_v2_give_the_source_and_not_a_byte_more() {
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            ("127.0.0.8:4444".parse::<SocketAddr>().unwrap(), "127.0.0.1:80".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        for (hdr, want) in [
            (b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 80\r\n".to_vec(), Some("127.0.0.9:5555")),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (v2, Some("127.0.0.8:4444")),
        ] {
            // The header and what follows it in one segment, as balancers send them.
            let (mut c, mut s) = pair().await;
            c.write_all(&[&hdr[..], b"\x16\x03\x01 hello"].concat()).await.unwrap();
            let addr = read_proxy_header(&mut s, deadline()).await.unwrap();
            assert_eq!(addr, want.map(|a| a.parse().unwrap()));
            assert_eq!(rest(c, s).await, b"\x16\x03\x01 hello");
        }

        // A header arriving in pieces.
        let (mut c, mut s) = pair().await;
        let writer = tokio::spawn(async move {
            c.write_all(b"PROXY TCP4 127.0.0.9 ").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            c.write_all(b"127.0.0.1 5555 80\r\nGET").await.unwrap();
            c
        });
        assert_eq!(
            read_proxy_header(&mut s, deadline()).await.unwrap(),
            Some("127.0.0.9:5555".parse().unwrap())
        );
        assert_eq!(rest(writer.await.unwrap(), s).await, b"GET");

        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 nonsense\r\n",
            &[&b"PROXY TCP4 "[..], &[b'1'; 2000]].concat(),
        ] {
            let (mut c, mut s) = pair().await;
            c.write_all(bad).await.unwrap();
            assert!(read_proxy_header(&mut s, deadline()).await.is_err(), "{bad:?}");
        }
        // Malformed lines are refused at once, not at the deadline.
        let (mut c, mut s) = pair().await;
        c.write_all(b"PROXY TCP4 nonsense\r\nGET / HTTP/1.1\r\n").await.unwrap();
        let soon = Instant::now() + std::time::Duration::from_secs(5);
        assert!(read_proxy_header(&mut s, soon).await.is_err());
        assert!(Instant::now() + std::time::Duration::from_secs(4) < soon, "not at the deadline");
        // Nothing at all: refused at the deadline.
        let (_c, mut s) = pair().await;
        let soon = Instant::now() + std::time::Duration::from_millis(100);
        assert!(read_proxy_header(&mut s, soon).await.is_err());
    }
}
