//! The fleet on Redis Sentinel (a primary, two replicas, three
//! sentinels, started here on free ports): the fleet scenario of
//! `support/fleet.rs`, the failover being `SENTINEL FAILOVER`.

mod common;
#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::Duration;

use fleet::*;
use portcullis::config::{Config, RedisMode};

const NAME: &str = "pcmaster";

struct Sentinel {
    data: Vec<Server>,
    sentinels: Vec<Server>,
    first_master: u16,
}

impl Sentinel {
    fn start(dir: &Path) -> Sentinel {
        let plain = |extra: &[String]| {
            let mut v: Vec<String> =
                ["--save", "", "--appendonly", "no"].iter().map(|s| s.to_string()).collect();
            v.extend_from_slice(extra);
            v
        };
        let p0 = free_port();
        let mut data = vec![Server::start(&dir.join("m"), p0, &plain(&[]))];
        for i in 0..2 {
            let args = plain(&["--replicaof".into(), "127.0.0.1".into(), p0.to_string()]);
            data.push(Server::start(&dir.join(format!("r{i}")), free_port(), &args));
        }
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let d = dir.join(format!("s{i}"));
            std::fs::create_dir_all(&d).unwrap();
            let file = d.join("sentinel.conf");
            std::fs::write(
                &file,
                format!(
                    "sentinel monitor {NAME} 127.0.0.1 {p0} 2\nsentinel down-after-milliseconds {NAME} 1000\n\
                     sentinel failover-timeout {NAME} 4000\nsentinel parallel-syncs {NAME} 2\n"
                ),
            )
            .unwrap();
            let args = vec![file.display().to_string(), "--sentinel".to_string()];
            sentinels.push(Server::start(&d, free_port(), &args));
        }
        let s = Sentinel { data, sentinels, first_master: p0 };
        // The sentinels must know both replicas and each other first.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !s.sentinels.iter().all(|x| {
            let i = cmd(x.port, &["INFO", "sentinel"]);
            i.contains("status=ok") && i.contains("slaves=2") && i.contains("sentinels=3")
        }) {
            assert!(std::time::Instant::now() < deadline, "the sentinels did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn master_port(&self) -> Option<u16> {
        let i = cmd(self.sentinels[0].port, &["INFO", "sentinel"]);
        let addr = i.split("address=").nth(1)?.split(',').next()?;
        addr.rsplit(':').next()?.parse().ok()
    }

    fn sentinel_list(&self) -> Vec<String> {
        self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect()
    }
}

impl Deployment for Sentinel {
    fn apply(&self, cfg: &mut Config) {
        cfg.revocation.redis_mode = RedisMode::Sentinel;
        cfg.revocation.redis_sentinels = self.sentinel_list();
        cfg.revocation.redis_master_name = NAME.into();
    }

    fn toml(&self) -> String {
        format!(
            "redis_mode = \"sentinel\"\nredis_sentinels = {:?}\nredis_master_name = \"{NAME}\"\n",
            self.sentinel_list()
        )
    }

    fn failover(&mut self) {
        let r = cmd(self.sentinels[0].port, &["SENTINEL", "FAILOVER", NAME]);
        assert!(r.starts_with("+OK"), "SENTINEL FAILOVER: {r:?}");
    }

    fn settled(&self) -> bool {
        match self.master_port() {
            Some(p) if p != self.first_master => cmd(p, &["ROLE"]).contains("master"),
            _ => false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_redis_sentinel_survives_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sentinel::start(dir.path());
    fleet_scenario(dir.path(), &mut s).await;
    let _ = &s.data;
}
