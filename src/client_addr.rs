//! Who the client is: the socket peer, or — for a peer in
//! `listen.trusted_proxies` — the address its PROXY header (v1/v2) or
//! `X-Forwarded-For` gives. From any other peer, PROXY headers are refused
//! and `X-Forwarded-For` is ignored, so a client cannot spoof its way
//! around per-IP limits.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};
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

/// Reads a PROXY v1 or v2 header under `deadline`. Returns the source
/// address it names (`None` for `LOCAL` / `UNKNOWN`, e.g. a health check)
/// and any bytes read past it. `Err` for a missing, malformed or late header.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: Instant,
) -> Result<(Option<SocketAddr>, Vec<u8>), ()> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        if !buf.is_empty() {
            let parsed = HeaderResult::parse(&buf);
            if !parsed.is_incomplete() {
                let (addr, len) = match parsed {
                    HeaderResult::V1(Ok(h)) => {
                        let addr = match h.addresses {
                            ppp::v1::Addresses::Tcp4(a) => {
                                Some(SocketAddr::new(a.source_address.into(), a.source_port))
                            }
                            ppp::v1::Addresses::Tcp6(a) => {
                                Some(SocketAddr::new(a.source_address.into(), a.source_port))
                            }
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
                    _ => return Err(()),
                };
                let rest = buf.split_off(len.min(buf.len()));
                return Ok((addr, rest));
            }
        }
        if buf.len() >= MAX_PROXY_HEADER {
            return Err(());
        }
        // Read little at a time: whatever follows the header is the HTTP
        // head, and it is handed on in `rest`, never lost.
        let room = (MAX_PROXY_HEADER - buf.len()).min(chunk.len());
        match timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return Err(()),
        }
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
        let Ok(ip) = hop.parse::<IpAddr>() else { break };
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
    }

    #[tokio::test]
    async fn proxy_v1_and_v2_give_the_source() {
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        let mut v1: &[u8] = b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n";
        let (addr, rest) = read_proxy_header(&mut v1, deadline).await.unwrap();
        assert_eq!(addr, Some("127.0.0.9:5555".parse().unwrap()));
        let mut all = rest;
        all.extend_from_slice(v1);
        assert_eq!(all, b"GET / HTTP/1.1\r\n");

        let hdr = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            ("127.0.0.8:4444".parse::<SocketAddr>().unwrap(), "127.0.0.1:80".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        let mut v2 = &hdr[..];
        let (addr, _) = read_proxy_header(&mut v2, deadline).await.unwrap();
        assert_eq!(addr, Some("127.0.0.8:4444".parse().unwrap()));

        let mut bad: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(read_proxy_header(&mut bad, deadline).await.is_err());
    }
}
