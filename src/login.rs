//! `POST /login` on the public listener: username and password (argon2id)
//! for a token signed with the configured key.
//!
//! Hashes are verified on the blocking pool behind a small semaphore, so a
//! login flood queues there and never stalls the async workers carrying
//! WebSocket traffic. An unknown user is verified against a dummy hash of
//! the same parameters: it costs what a wrong password costs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use arc_swap::ArcSwap;

use crate::admit::{IpKey, RateLimiter};
use crate::auth::sign::Signer;
use crate::config::{self, ConfigError};
use crate::handshake::{answer_and_close, response, RequestHead};
use crate::metrics::{LoginOutcome, Metrics};

/// Largest accepted login body.
const MAX_BODY: usize = 4096;
/// Concurrent hash verifications; more wait (within the request deadline).
const VERIFY_SLOTS: usize = 2;

pub struct Login {
    /// username → argon2id PHC hash.
    users: HashMap<String, String>,
    /// Verified for unknown users, so they cost a verification too.
    dummy: String,
    slots: Arc<Semaphore>,
    rate: RateLimiter,
    /// The signing key, loaded once (not per login) and swapped on SIGHUP.
    signer: ArcSwap<Signer>,
    /// `auth.login.token_ttl_s`, swapped on SIGHUP.
    token_ttl_s: std::sync::atomic::AtomicU64,
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
}

fn signer(auth: &config::Auth) -> Result<Signer, ConfigError> {
    Signer::new(auth).map_err(|e| ConfigError::Invalid { key: "auth.private_key_file", msg: e.to_string() })
}

/// Hashes a password with argon2id and a random salt (`hash-password`).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default().hash_password(password).map(|h| h.to_string()).map_err(|e| e.to_string())
}

impl Login {
    pub fn load(auth: &config::Auth) -> Result<Login, ConfigError> {
        let cfg = &auth.login;
        let signer = signer(auth)?;
        let key = "auth.login.users_file";
        let text = std::fs::read_to_string(&cfg.users_file)
            .map_err(|e| ConfigError::Invalid { key, msg: format!("{}: {e}", cfg.users_file.display()) })?;
        let users: HashMap<String, String> =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid { key, msg: e.message().to_string() })?;
        for (user, hash) in &users {
            let ok = PasswordHash::new(hash).map(|h| h.algorithm.as_str() == "argon2id").unwrap_or(false);
            if !ok {
                return Err(ConfigError::Invalid {
                    key,
                    msg: format!("user {user:?}: not an argon2id PHC hash"),
                });
            }
        }
        // The dummy uses the parameters `hash-password` uses, fixed (not
        // whichever user a map happens to list first): an unknown user then
        // costs what a known one hashed by this tool costs. A user hashed
        // with other parameters would cost differently, which tells an
        // attacker the name exists: said at start.
        let params = argon2::Params::default();
        for (user, hash) in &users {
            let same = PasswordHash::new(hash)
                .ok()
                .and_then(|h| argon2::Params::try_from(&h).ok())
                .is_some_and(|p| {
                    (p.m_cost(), p.t_cost(), p.p_cost())
                        == (params.m_cost(), params.t_cost(), params.p_cost())
                });
            if !same {
                tracing::warn!(
                    user = %user,
                    "auth.login.users_file: this hash's argon2 parameters differ from `portcullis hash-password`'s; \
                     its verification time tells that the user exists (rehash it with hash-password)"
                );
            }
        }
        let hasher = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let secret: [u8; 16] = rand::random();
        let dummy = hasher
            .hash_password(&secret)
            .map(|h| h.to_string())
            .map_err(|e| ConfigError::Invalid { key, msg: e.to_string() })?;
        Ok(Login {
            users,
            dummy,
            slots: Arc::new(Semaphore::new(VERIFY_SLOTS)),
            rate: RateLimiter::new(cfg.per_ip_rate, cfg.per_ip_burst),
            signer: ArcSwap::from_pointee(signer),
            token_ttl_s: cfg.token_ttl_s.into(),
        })
    }

    /// Loads the signer a reload would use, without applying anything.
    pub fn prepare(auth: &config::Auth) -> Result<Signer, ConfigError> {
        signer(auth)
    }

    /// Applies a prepared reload (SIGHUP). Users are read at start only.
    pub fn apply(&self, signer: Signer, login: &config::Login) {
        self.signer.store(Arc::new(signer));
        self.rate.set_quota(login.per_ip_rate, login.per_ip_burst);
        self.token_ttl_s.store(login.token_ttl_s, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn housekeep(&self) {
        self.rate.housekeep();
    }

    /// Serves one `POST /login` and closes the connection.
    pub async fn serve<S>(
        &self,
        metrics: &Metrics,
        io: &mut S,
        head: &RequestHead,
        mut body: Vec<u8>,
        client: SocketAddr,
        deadline: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let json = "application/json";
        if let Err(retry) = self.rate.check(IpKey::new(client.ip())) {
            metrics.login(LoginOutcome::RateLimited);
            tracing::info!(event = "login", outcome = "rate_limited", reason = "login_rate", client = %client.ip());
            let r = response(429, &[("Retry-After", retry.to_string())], json, "{\"error\":\"login_rate\"}");
            return answer_and_close(io, &r).await;
        }
        let len = head.header("content-length").and_then(|v| v.parse::<usize>().ok());
        let Some(len) = len.filter(|l| *l <= MAX_BODY) else {
            let status = if len.is_some() { 413 } else { 411 };
            let r = response(
                status,
                &[],
                json,
                "{\"error\":\"a JSON body with Content-Length up to 4096 bytes\"}",
            );
            return answer_and_close(io, &r).await;
        };
        while body.len() < len {
            let mut chunk = [0u8; 1024];
            match timeout_at(deadline, io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                _ => return answer_and_close(io, &response(408, &[], json, "{\"error\":\"timeout\"}")).await,
            }
        }
        body.truncate(len);
        let Ok(creds) = serde_json::from_slice::<Credentials>(&body) else {
            let r = response(400, &[], json, "{\"error\":\"expected {\\\"username\\\",\\\"password\\\"}\"}");
            return answer_and_close(io, &r).await;
        };
        let Ok(Ok(_slot)) = timeout_at(deadline, self.slots.clone().acquire_owned()).await else {
            return answer_and_close(io, &response(503, &[], json, "{\"error\":\"busy\"}")).await;
        };
        let known = self.users.get(&creds.username);
        let hash = known.unwrap_or(&self.dummy).clone();
        let password = creds.password;
        let verified = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if !(verified && known.is_some()) {
            metrics.login(LoginOutcome::BadCredentials);
            tracing::info!(event = "login", outcome = "bad_credentials", client = %client.ip());
            return answer_and_close(io, &response(401, &[], json, "{\"error\":\"bad credentials\"}")).await;
        }
        let ttl = self.token_ttl_s.load(std::sync::atomic::Ordering::Relaxed);
        match self.signer.load().mint(&creds.username, Duration::from_secs(ttl), None) {
            Ok(token) => {
                metrics.login(LoginOutcome::Ok);
                tracing::info!(event = "login", outcome = "ok", client = %client.ip(), sub = %creds.username);
                let body = serde_json::json!({ "token": token, "expires_in": ttl }).to_string();
                answer_and_close(io, &response(200, &[], json, &body)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "login: cannot sign a token");
                answer_and_close(io, &response(500, &[], json, "{\"error\":\"cannot sign\"}")).await;
            }
        }
    }
}
