//! The fleet on Redis Cluster (three primaries, three replicas, started
//! here on free ports): the fleet scenario of `support/fleet.rs`, the
//! failover being `CLUSTER FAILOVER` of the shard that holds the
//! revocations.

mod common;
#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::time::Duration;

use fleet::*;
use portcullis::config::{Config, RedisMode};

struct Cluster {
    nodes: Vec<Server>,
    /// The replica told to take over, once told.
    promoted: Option<u16>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = free_port();
            let args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(Server::start(&dir.join(format!("n{i}")), port, &args));
        }
        let mut create = std::process::Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create.args(["--cluster-replicas", "1", "--cluster-yes"]).output().expect("redis-cli runs");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let c = Cluster { nodes, promoted: None };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // Up, every node agreeing on three replicas, each replica in sync
        // (a manual failover waits for its replica to catch up).
        while !(c.settled()
            && c.nodes.iter().all(|n| cmd(n.port, &["CLUSTER", "NODES"]).matches("slave").count() == 3)
            && c.nodes.iter().all(|n| {
                let r = cmd(n.port, &["INFO", "replication"]);
                r.contains("role:master") || r.contains("master_link_status:up")
            }))
        {
            assert!(std::time::Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes.iter().take(3).map(|n| format!("127.0.0.1:{}", n.port)).collect()
    }

    /// The replica of the master serving `slot`, by `CLUSTER NODES`.
    fn replica_of_slot(&self, slot: u16) -> u16 {
        let nodes = cmd(self.nodes[0].port, &["CLUSTER", "NODES"]);
        let lines: Vec<Vec<&str>> = nodes.lines().map(|l| l.split(' ').collect()).collect();
        let master = lines
            .iter()
            .find(|f| {
                f.len() > 8
                    && f[2].contains("master")
                    && f[8..].iter().any(|r| {
                        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                        matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
                    })
            })
            .expect("a master serves the slot")[0];
        let replica = lines.iter().find(|f| f.len() > 3 && f[3] == master).expect("the master has a replica");
        let addr = replica[1].split('@').next().unwrap();
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Deployment for Cluster {
    fn apply(&self, cfg: &mut Config) {
        cfg.revocation.redis_mode = RedisMode::Cluster;
        cfg.revocation.redis_cluster_nodes = self.seeds();
        cfg.revocation.redis_url = "redis://127.0.0.1".into();
    }

    fn toml(&self) -> String {
        format!(
            "redis_mode = \"cluster\"\nredis_cluster_nodes = {:?}\nredis_url = \"redis://127.0.0.1\"\n",
            self.seeds()
        )
    }

    fn failover(&mut self) {
        let slot = portcullis::redis_link::cluster::slot(portcullis::revocation::redis::REVOCATIONS_KEY);
        let replica = self.replica_of_slot(slot);
        let r = cmd(replica, &["CLUSTER", "FAILOVER"]);
        assert!(r.starts_with("+OK"), "CLUSTER FAILOVER: {r:?}");
        self.promoted = Some(replica);
    }

    fn settled(&self) -> bool {
        let ok = self.nodes.iter().all(|n| cmd(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
        ok && self.promoted.is_none_or(|p| cmd(p, &["ROLE"]).contains("master"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_redis_cluster_survives_a_failover() {
    let dir = tempfile::tempdir().unwrap();
    let _ = tracing_subscriber::fmt().with_env_filter("portcullis=info").with_test_writer().try_init();
    let mut c = Cluster::start(dir.path());
    fleet_scenario(dir.path(), &mut c).await;
}
