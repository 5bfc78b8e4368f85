//! `POST /login`: argon2id users, tokens that open a WebSocket, 401 for a
//! wrong password and an unknown user alike, 429 past the per-IP rate.

mod common;

use argon2::password_hash::PasswordHasher;
use common::*;

/// A cheap argon2id hash (tests need not spend 19 MiB per guess).
fn hash(pw: &str) -> String {
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(pw.as_bytes())
        .unwrap()
        .to_string()
}

async fn gateway(dir: &std::path::Path, burst: u32) -> TestGateway {
    let users = dir.join("users.toml");
    std::fs::write(&users, format!("alice = \"{}\"\nbob = \"{}\"\n", hash("wonderland"), hash("builder")))
        .unwrap();
    let mut cfg = config(dir);
    cfg.auth.login.enabled = true;
    cfg.auth.login.users_file = users;
    cfg.auth.login.token_ttl_s = 600;
    cfg.auth.login.per_ip_rate = 0.1;
    cfg.auth.login.per_ip_burst = burst;
    start(cfg).await
}

async fn login(gw: &TestGateway, body: &str) -> Answer {
    http(gw.public, "POST", "/login", &[("Content-Type", "application/json")], body).await
}

#[tokio::test]
async fn good_password_gives_a_token_that_opens_a_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), 5).await;
    let a = login(&gw, r#"{"username":"alice","password":"wonderland"}"#).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v: serde_json::Value = serde_json::from_str(body(&a)).unwrap();
    assert_eq!(v["expires_in"], 600);
    let token = v["token"].as_str().unwrap();
    let mut c = ws(gw.public, token).await;
    echo(&mut c, "logged in").await;
    let list = body(&http(gw.admin, "GET", "/admin/connections", &[], "").await).to_string();
    assert!(list.contains("\"sub\":\"alice\""), "{list}");
    drop(c);
    assert_eq!(gw.metric("portcullis_logins_total{outcome=\"ok\"}").await, 1.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_both_401() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), 5).await;
    let wrong = login(&gw, r#"{"username":"alice","password":"nope"}"#).await;
    let unknown = login(&gw, r#"{"username":"zed","password":"wonderland"}"#).await;
    assert_eq!((wrong.status, unknown.status), (401, 401));
    assert_eq!(body(&wrong), body(&unknown), "the answer does not tell users apart");
    assert_eq!(gw.metric("portcullis_logins_total{outcome=\"bad_credentials\"}").await, 2.0);
    assert_eq!(login(&gw, "not json").await.status, 400);
    gw.stop().await;
}

#[tokio::test]
async fn repeated_attempts_hit_the_login_rate() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), 3).await;
    for _ in 0..3 {
        assert_eq!(login(&gw, r#"{"username":"bob","password":"guess"}"#).await.status, 401);
    }
    let a = login(&gw, r#"{"username":"bob","password":"builder"}"#).await;
    assert_eq!(a.status, 429, "every attempt counts, even a right one past the rate");
    assert!(a.header("retry-after").is_some());
    assert!(body(&a).contains("login_rate"));
    assert_eq!(gw.metric("portcullis_logins_total{outcome=\"rate_limited\"}").await, 1.0);
    gw.stop().await;
}
