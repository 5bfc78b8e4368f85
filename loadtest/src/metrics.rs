//! `--metrics URL`: scrape the gateway's admin `/metrics` before and after a
//! run (plain HTTP/1.0 over a loopback socket, a simple text parse) and keep
//! the `portcullis_handshakes_total` and `portcullis_disconnects_total`
//! series, with their change over the run.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::target::Target;

/// The series kept.
pub const WANTED: [&str; 2] = ["portcullis_handshakes_total", "portcullis_disconnects_total"];

/// Bound on one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest body read.
const MAX_BODY: u64 = 16 << 20;

/// One series value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// What `--metrics` adds to the JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scrape {
    /// The URL scraped.
    pub url: String,
    /// Series before the run.
    pub before: Vec<Sample>,
    /// Series after the run.
    pub after: Vec<Sample>,
    /// `after − before`, series by series (a series absent before counts from 0).
    pub delta: Vec<Sample>,
    /// Set when a scrape failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Fetches the page body.
pub async fn fetch(t: &Target) -> Result<String, String> {
    let run = async {
        let mut s = TcpStream::connect(t.addr).await.map_err(|e| format!("metrics {}: {e}", t.addr))?;
        let req = format!(
            "GET {} HTTP/1.0\r\nHost: {}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
            t.path, t.host_header
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_BODY).read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    };
    let buf = timeout(SCRAPE_TIMEOUT, run).await.map_err(|_| format!("metrics {}: timed out", t.addr))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| "metrics: no HTTP head".to_string())?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("metrics: HTTP status {status}"));
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    Ok(if chunked { dechunk(body) } else { body.to_string() })
}

/// Decodes a chunked body (a server may chunk even for HTTP/1.0 clients).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Parses `name{a="x",b="y"} value` lines of the wanted metrics.
pub fn parse(text: &str, wanted: &[&str]) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !wanted.contains(&name) {
            continue;
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let Some((parsed, after)) = parse_labels(inner) else {
                continue;
            };
            labels = parsed;
            rest = after;
        }
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

/// Parses `a="x",b="y"}` (with `\"`, `\\`, `\n` escapes); returns the
/// labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, rest) = s.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut val = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                c => val.push(c),
            }
        };
        labels.insert(key.trim().to_string(), val);
        s = &rest[1 + end + 1..];
    }
}

/// `after − before` per series.
pub fn delta(before: &[Sample], after: &[Sample]) -> Vec<Sample> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.name == a.name && b.labels == a.labels).map_or(0.0, |b| b.value);
            Sample { value: a.value - b, ..a.clone() }
        })
        .collect()
}

/// Scrapes and keeps the wanted series.
pub async fn scrape(t: &Target) -> Result<Vec<Sample>, String> {
    Ok(parse(&fetch(t).await?, &WANTED))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP portcullis_handshakes_total Handshakes by outcome.
# TYPE portcullis_handshakes_total counter
portcullis_handshakes_total{outcome="accepted",reason="ok"} 12
portcullis_handshakes_total{outcome="rejected",reason="missing_token"} 3 1700000000
portcullis_disconnects_total{reason="pong_timeout"} 2
portcullis_connections{state="open"} 5
portcullis_disconnects_total{reason="we\"ird\\x"} 1.5
portcullis_disconnects_total 4
"#;

    #[test]
    fn parses_wanted_series() {
        let s = parse(PAGE, &WANTED);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].labels["outcome"], "accepted");
        assert_eq!(s[0].value, 12.0);
        assert_eq!(s[1].value, 3.0);
        assert_eq!(s[2].name, "portcullis_disconnects_total");
        assert_eq!(s[3].labels["reason"], "we\"ird\\x");
        assert_eq!(s[3].value, 1.5);
        assert!(s[4].labels.is_empty());
    }

    #[test]
    fn deltas() {
        let before = parse(PAGE, &WANTED);
        let mut after = before.clone();
        after[0].value = 20.0;
        let d = delta(&before, &after);
        assert_eq!(d[0].value, 8.0);
        assert_eq!(d[1].value, 0.0);
        assert_eq!(delta(&[], &after)[0].value, 20.0);
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
    }
}
