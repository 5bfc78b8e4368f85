//! `POST /admin/revoke`'s `closed` is exact on a loaded machine: every
//! live connection of this instance the revocation closed is counted,
//! whichever path closed it (the handler's own kick, or the store's
//! broadcast reaching the kicker task first). The machine is kept busy
//! by spinning threads while it checks, on the file and the Redis
//! backends alike.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis::config::RevocationBackend;
use serde_json::json;

/// Threads that spin (at low priority for nobody: the point is to starve
/// the gateway's tasks) until dropped.
struct Load(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Load {
    fn start(threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let hs = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })
            })
            .collect();
        Load(stop, hs)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for h in self.1.drain(..) {
            let _ = h.join();
        }
    }
}

async fn rounds(gw: &TestGateway, tag: &str) {
    for round in 0..8 {
        let sub = format!("{tag}{round}");
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
            assert_eq!(close_code(c, Duration::from_secs(5)).await.0, Some(1008));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_counts_every_connection_the_revocation_closed_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(config(dir.path())).await;
    let _load = Load::start(6);
    rounds(&gw, "file").await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_is_exact_with_the_redis_backend_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("redis.sock");
    let mut redis = std::process::Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&sock)
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server is installed (./scripts/test.sh installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cfg = config(dir.path());
    cfg.revocation.backend = RevocationBackend::Redis;
    cfg.revocation.redis_url = format!("unix://{}", sock.display());
    let gw = start(cfg).await;
    let _load = Load::start(6);
    rounds(&gw, "redis").await;
    gw.stop().await;
    let _ = redis.kill();
    let _ = redis.wait();
}
