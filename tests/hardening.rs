//! Defects a security review found, each held by a test that failed
//! before its fix: the revocation race, revoking a subject "now", the
//! count `/admin/revoke` reports, identities that cannot travel as
//! headers, duplicate single headers, and configuration that panicked.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use portcullis::auth::{AuthRefusal, Authenticator, Identity};
use portcullis::handshake::RequestHead;
use portcullis::revocation::{Revocation, SharedStore};
use portcullis::Gateway;
use serde_json::json;

/// An authenticator that, like the JWT one, looks revocations up, and
/// then lets a revocation of its subject land before it returns: the
/// window between stage 4's lookup and stage 5's registration.
struct RevokedMeanwhile {
    store: OnceLock<SharedStore>,
}

#[async_trait::async_trait]
impl Authenticator for RevokedMeanwhile {
    async fn authenticate(&self, head: &RequestHead, _client: SocketAddr) -> Result<Identity, AuthRefusal> {
        let store = self.store.get().expect("store set before traffic");
        let sub = head.header("x-user").unwrap_or("racer").to_string();
        let iat = now() - 1;
        if store.is_revoked(&sub, None, Some(iat)) {
            return Err(portcullis::Reject::RevokedToken.into());
        }
        if head.header("x-revoke-meanwhile").is_some() {
            store.revoke(Revocation::Subject { sub: sub.clone(), before: now() }).await.unwrap();
        }
        Ok(Identity { sub, issued_at: Some(iat), ..Identity::default() })
    }
}

#[tokio::test]
async fn a_revocation_landing_between_lookup_and_registration_is_caught_before_the_101() {
    let dir = tempfile::tempdir().unwrap();
    let auth = Arc::new(RevokedMeanwhile { store: OnceLock::new() });
    let gw = Gateway::bind_with(config(dir.path()), Some(auth.clone())).await.unwrap();
    let _ = auth.store.set(gw.shared().store.clone());
    let (public, admin) = (gw.public_addr(), gw.admin_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));

    // Control: without a revocation the same authenticator upgrades.
    let ok = raw(public, upgrade_request("/", &[("X-User", "calm")]).as_bytes()).await;
    assert_eq!(ok.status, 101);

    let a = raw(public, upgrade_request("/", &[("X-User", "racer"), ("X-Revoke-Meanwhile", "1")]).as_bytes())
        .await;
    assert_eq!(a.status, 401, "revoked in the window: refused before any 101\n{}", a.text);
    assert!(a.header("www-authenticate").unwrap().contains("revoked"), "{}", a.text);
    let m = body(&http(admin, "GET", "/metrics", &[], "").await).to_string();
    assert_eq!(
        value_of(&m, "portcullis_handshakes_total{outcome=\"rejected\",reason=\"revoked_token\"}"),
        1.0
    );
    let list = body(&http(admin, "GET", "/admin/connections?sub=racer", &[], "").await).to_string();
    assert_eq!(list, "[]");
    let _ = tx.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn revoking_a_subject_now_closes_this_seconds_connections_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    // Several rounds: the store's broadcast and the handler race to kick.
    for round in 0..5 {
        let sub = format!("nora{round}");
        // Minted and used at once, as an operator would.
        let t = token(&sub);
        let mut cs = Vec::new();
        for _ in 0..3 {
            cs.push(ws(gw.public, &t).await);
        }
        let answer = gw.revoke(&json!({ "sub": sub }).to_string()).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let v: serde_json::Value = serde_json::from_str(body(&answer)).unwrap();
        assert_eq!(v["closed"], 3, "round {round}: {v}");
        for c in &mut cs {
            assert_eq!(close_code(c, Duration::from_secs(3)).await.0, Some(1008));
        }
        // The token minted in the revocation's own second is refused.
        let again =
            raw(gw.public, upgrade_request("/", &[("Authorization", &format!("Bearer {t}"))]).as_bytes())
                .await;
        assert_eq!(again.status, 401);
        // A token minted in a later second is accepted.
        let cut = v["revoked"]["before"].as_u64().unwrap();
        while now() <= cut {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut fresh = ws(gw.public, &token(&sub)).await;
        echo(&mut fresh, "after the cut-off").await;
        drop(fresh);
    }
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_sub_that_cannot_be_a_header_value_is_an_invalid_token_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.upstream.claim_headers.insert("tenant".into(), "X-Tenant".into());
    let gw = start(cfg).await;
    for (claims, told) in [
        (json!({ "sub": "bad\u{1}sub" }), "sub"),
        (json!({ "sub": "line\r\nX-Evil: 1" }), "sub"),
        (json!({ "sub": "ok", "tenant": "a\nb" }), "claim"),
    ] {
        let t = token_with(claims.clone());
        let a = raw(gw.public, upgrade_request("/", &[("Authorization", &format!("Bearer {t}"))]).as_bytes())
            .await;
        assert_eq!(a.status, 401, "{claims}: {}", a.text);
        let challenge = a.header("www-authenticate").unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        assert!(challenge.contains(told) && challenge.contains("not a valid header value"), "{challenge}");
    }
    assert_eq!(gw.rejected("invalid_token").await, 3.0);
    assert_eq!(gw.rejected("upstream_unavailable").await, 0.0);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_custom_authenticators_identity_is_held_to_the_same_header_rules() {
    struct BadSub;
    #[async_trait::async_trait]
    impl Authenticator for BadSub {
        async fn authenticate(&self, head: &RequestHead, _: SocketAddr) -> Result<Identity, AuthRefusal> {
            let sub = head.header("x-user").unwrap_or("x").replace('_', "\u{7f}");
            Ok(Identity { sub, ..Identity::default() })
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::bind_with(config(dir.path()), Some(Arc::new(BadSub))).await.unwrap();
    let public = gw.public_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gw.run(async move {
        let _ = rx.await;
    }));
    assert_eq!(raw(public, upgrade_request("/", &[("X-User", "fine")]).as_bytes()).await.status, 101);
    let a = raw(public, upgrade_request("/", &[("X-User", "not_fine")]).as_bytes()).await;
    assert_eq!(a.status, 401, "{}", a.text);
    let _ = tx.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn duplicate_single_headers_are_refused_as_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let t = format!("Bearer {}", token("dup"));
    let cases: [&[(&str, &str)]; 5] = [
        &[("Host", "evil")],
        &[("Origin", "https://a"), ("Origin", "https://b")],
        &[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAA==")],
        &[("Sec-WebSocket-Version", "13")],
        &[("Authorization", "Bearer other")],
    ];
    for extra in cases {
        let mut headers = vec![("Authorization", t.as_str())];
        headers.extend_from_slice(extra);
        // The base request already carries one Host, Key and Version.
        let a = raw(gw.public, upgrade_request("/", &headers).as_bytes()).await;
        assert_eq!(a.status, 400, "{extra:?}: {}", a.text);
    }
    assert_eq!(gw.rejected("bad_request").await, 5.0);
    assert_eq!(raw(gw.public, upgrade_request("/", &[("Authorization", &t)]).as_bytes()).await.status, 101);
    gw.assert_gauges_zero().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_reload_that_fails_late_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, shared) = start_shared(config(dir.path())).await;
    let mut c = ws(gw.public, &token("rita")).await;

    // New keys that would work, but a rate no limiter can hold: refused
    // whole, the old secret still verifies and the reloader lives on.
    let mut bad = config(dir.path());
    bad.auth.hmac_secret = "another-secret-0123456789abcdef".into();
    bad.limits.per_ip_rate = 1e-30;
    let err = shared.reload(bad).unwrap_err().to_string();
    assert!(err.starts_with("limits.per_ip_rate"), "{err}");
    echo(&mut c, "still here").await;
    let mut d = ws(gw.public, &token("rita")).await;
    echo(&mut d, "old secret still in force").await;

    // A good reload after the bad one applies.
    let mut good = config(dir.path());
    good.limits.per_ip_rate = 0.5;
    good.limits.per_ip_burst = 1;
    shared.reload(good).unwrap();
    assert_eq!(shared.config.load().limits.per_ip_burst, 1);
    drop((c, d));
    gw.stop().await;
}

#[tokio::test]
async fn numeric_keys_are_bounded_at_load_and_name_their_key() {
    let base = "[auth]\nhmac_secret = \"s\"\n";
    for (extra, key) in [
        ("[limits]\nper_ip_rate = 1e-30\n", "limits.per_ip_rate"),
        ("[limits]\nper_conn_msgs_per_s = 1e-300\n", "limits.per_conn_msgs_per_s"),
        ("[limits]\nmax_lifetime_s = 18446744073709551615\n", "limits.max_lifetime_s"),
        ("[listen]\ndrain_timeout_s = 18446744073709551615\n", "listen.drain_timeout_s"),
        ("[listen]\ndrain_delay_s = 18446744073709551615\n", "listen.drain_delay_s"),
        ("[limits]\nhandshake_timeout_ms = 18446744073709551615\n", "limits.handshake_timeout_ms"),
        ("[limits]\nwrite_timeout_ms = 18446744073709551615\n", "limits.write_timeout_ms"),
        ("[heartbeat]\nidle_timeout_ms = 18446744073709551615\n", "heartbeat.idle_timeout_ms"),
        ("[heartbeat]\nping_interval_ms = 18446744073709551615\n", "heartbeat.ping_interval_ms"),
        ("[upstream]\nconnect_timeout_ms = 18446744073709551615\n", "upstream.connect_timeout_ms"),
        ("[revocation]\nlease_ttl_ms = 18446744073709551615\n", "revocation.lease_ttl_ms"),
        ("[limits]\nper_ip_burst = 4294967295\n", "limits.per_ip_burst"),
    ] {
        let err = portcullis::Config::parse(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(err.starts_with(key), "{extra}: {err}");
    }
    let err =
        portcullis::Config::parse("[auth]\nhmac_secret = \"s\"\nmax_token_ttl_s = 18446744073709551615\n")
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("auth.max_token_ttl_s"), "{err}");
}

#[tokio::test]
async fn claim_headers_colliding_with_the_gateways_own_are_refused() {
    for name in
        ["Host", "X-Portcullis-Sub", "x-forwarded-for", "Sec-WebSocket-Key", "Cookie", "Authorization"]
    {
        let text =
            format!("[auth]\nhmac_secret = \"s\"\n[upstream]\nclaim_headers = {{ role = \"{name}\" }}\n");
        let err = portcullis::Config::parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("upstream.claim_headers") && err.contains(name), "{name}: {err}");
    }
}

#[tokio::test]
async fn the_admin_token_guards_admin_paths_with_a_case_insensitive_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin.token = "adm1n-t0ken".into();
    let gw = start(cfg).await;
    let get = |auth: Option<&'static str>| {
        let admin = gw.admin;
        async move {
            let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
            http(admin, "GET", "/admin/connections", &headers, "").await
        }
    };
    let none = get(None).await;
    assert_eq!(none.status, 401);
    assert!(none.header("www-authenticate").unwrap().starts_with("Bearer"), "{}", none.text);
    for wrong in ["Bearer nope", "Basic adm1n-t0ken", "adm1n-t0ken", "Bearer adm1n-t0ken-and-more"] {
        assert_eq!(get(Some(wrong)).await.status, 401, "{wrong}");
    }
    for right in ["Bearer adm1n-t0ken", "bearer adm1n-t0ken", "BEARER adm1n-t0ken"] {
        assert_eq!(get(Some(right)).await.status, 200, "{right}");
    }
    let revoke = http(gw.admin, "POST", "/admin/revoke", &[], r#"{"jti":"x"}"#).await;
    assert_eq!(revoke.status, 401);
    // The metrics and probes stay open: scrapers and load balancers carry no token.
    assert_eq!(http(gw.admin, "GET", "/metrics", &[], "").await.status, 200);
    assert_eq!(http(gw.admin, "GET", "/readyz", &[], "").await.status, 200);
    gw.stop().await;
}
