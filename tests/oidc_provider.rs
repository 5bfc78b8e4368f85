//! Against a real OpenID Connect provider nobody here wrote: the certified
//! `oidc-provider` package under Node (scripts/oidc-provider). It issues a
//! JWT access token (client_credentials grant, RS256, a key of its own); the
//! gateway discovers its JWKS from `auth.oidc_issuer` and verifies the token.
//!
//! Skipped, with a message, when `node` or the package is not installed:
//! `npm install --prefix scripts/oidc-provider` installs it.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const AUDIENCE: &str = "urn:portcullis:gateway";

fn skip(why: &str) {
    eprintln!("SKIPPED oidc_provider: {why}; install with `npm install --prefix scripts/oidc-provider`");
}

#[tokio::test]
async fn tokens_from_a_real_openid_provider_verify() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/oidc-provider");
    if !dir.join("node_modules/oidc-provider/package.json").is_file() {
        return skip("the oidc-provider package is not installed");
    }
    if std::process::Command::new("node").arg("--version").output().is_err() {
        return skip("node is not installed");
    }
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut idp = Command::new("node")
        .arg(dir.join("idp.mjs"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(idp.stdout.take().unwrap()).lines();
    let issuer = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(i) = l.strip_prefix("listening ") {
                return i.to_string();
            }
        }
        panic!("the provider exited before listening");
    })
    .await
    .expect("the provider listens within 20 s");

    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    cfg.auth.hmac_secret = String::new();
    cfg.auth.algorithms = vec!["RS256".into()];
    cfg.auth.oidc_issuer = issuer.clone();
    cfg.auth.audience = AUDIENCE.into();
    cfg.auth.jwks_timeout_ms = 2000;
    let gw = start(cfg).await;
    assert_eq!(gw.metric("portcullis_jwks_keys").await, 1.0);

    // A token the provider issues (client_credentials, JWT access token).
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("portcullis-test:portcullis-test-secret");
    let a = http(
        addr,
        "POST",
        "/token",
        &[
            ("Authorization", &format!("Basic {basic}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "grant_type=client_credentials&scope=ws",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let answer: serde_json::Value = serde_json::from_str(body(&a)).unwrap();
    let token = answer["access_token"].as_str().unwrap().to_string();

    let status = |t: String| {
        let public = gw.public;
        async move {
            let auth = format!("Bearer {t}");
            raw(public, upgrade_request("/", &[("Authorization", &auth)]).as_bytes()).await.status
        }
    };
    assert_eq!(status(token.clone()).await, 101);
    // Its signature, changed, is refused.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    assert_eq!(status(format!("{head}.{flipped}{}", &sig[1..])).await, 401);
    gw.stop().await;

    // The same token, with another issuer required, is refused: `iss` is enforced.
    let mut cfg = config(tmp.path());
    cfg.auth.hmac_secret = String::new();
    cfg.auth.algorithms = vec!["RS256".into()];
    cfg.auth.issuers = vec![portcullis::config::IssuerEntry {
        issuer: "https://another-tenant.example".into(),
        jwks_url: format!("{issuer}/jwks"),
        ..Default::default()
    }];
    let gw = start(cfg).await;
    let auth = format!("Bearer {token}");
    assert_eq!(
        raw(gw.public, upgrade_request("/", &[("Authorization", &auth)]).as_bytes()).await.status,
        401
    );
    gw.stop().await;
    let _ = idp.kill().await;
}
