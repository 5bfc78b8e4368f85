//! The ban log: bans survive a restart. JSON lines beside the revocation
//! log (`revocation.path` with the extension `bans`), one per change:
//! `{"key":"203.0.113.7/32","until":T,"started":S,"level":L,"reason":"strikes","origin":"local","synced":false}`,
//! and a lift as the same key with `"until":0`. The last line of a key
//! wins. Read back at start (what is still active or remembered for
//! doubling), then rewritten with only that (compaction); rewritten again
//! whenever the lines outnumber the entries four to one.
//!
//! Writes happen on a thread of the log's own, in batches (one `fsync`
//! each), fed through a bounded queue: a ban never waits on the disk, and
//! under a flood of new bans the queue's overflow is dropped and counted
//! in the log rather than held in memory. Dry-run bans are not written.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Weak};

use serde::{Deserialize, Serialize};

use super::{BanKey, BanReason, Bans, Change, Entry, Origin, REMEMBER_S};
use crate::config;

/// Changes queued for the writer before new ones are dropped.
const QUEUE: usize = 4096;

/// Where the ban log of a revocation log lives.
pub fn path_for(revocation_path: &Path) -> PathBuf {
    revocation_path.with_extension("bans")
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    until: u64,
    #[serde(default)]
    started: u64,
    #[serde(default)]
    level: u8,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    synced: bool,
}

impl Line {
    fn of(key: BanKey, e: &Entry) -> Line {
        Line {
            key: key.to_string(),
            until: u64::from(e.until),
            started: u64::from(e.started),
            level: e.level,
            reason: e.reason.label().into(),
            origin: if e.origin == Origin::Local { "local" } else { "fleet" }.into(),
            synced: e.synced,
        }
    }

    fn lift(key: BanKey) -> Line {
        Line {
            key: key.to_string(),
            until: 0,
            started: 0,
            level: 0,
            reason: String::new(),
            origin: String::new(),
            synced: false,
        }
    }

    fn entry(&self) -> Option<(BanKey, Option<Entry>)> {
        let key = BanKey::parse(&self.key).ok()?;
        if self.until == 0 {
            return Some((key, None));
        }
        let e = Entry {
            until: u32::try_from(self.until).ok()?,
            started: u32::try_from(self.started).ok()?,
            level: self.level,
            reason: BanReason::parse(&self.reason)?,
            origin: if self.origin == "fleet" { Origin::Fleet } else { Origin::Local },
            dry: false,
            synced: self.synced,
            ended: false,
        };
        Some((key, Some(e)))
    }

    fn bytes(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

/// Reads the log at `path` into `bans`, compacts it, and from then on
/// writes every change `bans` makes.
pub fn open(path: &Path, bans: &Arc<Bans>, cfg: &config::Ban) -> std::io::Result<()> {
    let now = crate::clock::unix_now();
    let mut last: std::collections::HashMap<BanKey, Option<Entry>> = Default::default();
    match File::open(path) {
        Ok(f) => {
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Line>(&line).ok().and_then(|l| l.entry()) {
                    Some((k, e)) => {
                        last.insert(k, e);
                    }
                    None => {
                        tracing::warn!(file = %path.display(), line = i + 1, "unreadable ban line skipped")
                    }
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for (k, e) in last {
        if let Some(e) = e {
            if e.active(now) || u64::from(e.started) + REMEMBER_S > now {
                bans.restore(cfg, k, e);
            }
        }
    }
    rewrite(path, &bans.snapshot())?;
    let file = OpenOptions::new().append(true).open(path)?;
    let (tx, rx) = mpsc::sync_channel::<Change>(QUEUE);
    let weak = Arc::downgrade(bans);
    let p = path.to_path_buf();
    std::thread::Builder::new().name("portcullis-banlog".into()).spawn(move || writer(p, file, rx, weak))?;
    bans.add_sink(Box::new(move |c| {
        if matches!(c, Change::Ban(_, e) if e.dry) {
            return;
        }
        if tx.try_send(c.clone()).is_err() {
            tracing::warn!(event = "ban_log_full", "ban log queue full: a ban change was not written");
        }
    }));
    Ok(())
}

/// Appends changes in batches until the bans are gone.
fn writer(path: PathBuf, mut file: File, rx: mpsc::Receiver<Change>, bans: Weak<Bans>) {
    let mut lines = 0usize;
    while let Ok(first) = rx.recv() {
        let mut buf = Vec::new();
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        for c in &batch {
            let line = match c {
                Change::Ban(k, e) => Line::of(*k, e),
                Change::Lift(k) => Line::lift(*k),
            };
            buf.extend_from_slice(&line.bytes());
        }
        lines += batch.len();
        if let Err(e) = file.write_all(&buf).and_then(|_| file.sync_data()) {
            tracing::error!(file = %path.display(), error = %e, "ban log write failed");
        }
        let Some(b) = bans.upgrade() else { return };
        if lines > 4 * b.entries() + 10_000 {
            let snapshot = b.snapshot();
            drop(b);
            match rewrite(&path, &snapshot).and_then(|_| OpenOptions::new().append(true).open(&path)) {
                Ok(f) => {
                    file = f;
                    lines = snapshot.len();
                }
                Err(e) => tracing::error!(file = %path.display(), error = %e, "ban log compaction failed"),
            }
        }
    }
}

/// Replaces the log with `entries`, atomically (temp file, fsync, rename).
fn rewrite(path: &Path, entries: &[(BanKey, Entry)]) -> std::io::Result<()> {
    let tmp = path.with_extension("bans.tmp");
    let mut f = File::create(&tmp)?;
    let mut buf = Vec::new();
    for (k, e) in entries.iter().filter(|(_, e)| !e.dry) {
        buf.extend_from_slice(&Line::of(*k, e).bytes());
    }
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn bans_survive_a_reopen_and_lifts_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.bans");
        let cfg = config::Ban::default();
        {
            let b = Arc::new(Bans::new(Arc::new(Metrics::new())));
            open(&path, &b, &cfg).unwrap();
            b.ban_manual(&cfg, BanKey::parse("192.0.2.1").unwrap(), 600).unwrap();
            b.ban_manual(&cfg, BanKey::parse("192.0.2.2").unwrap(), 600).unwrap();
            b.ban_manual(&cfg, BanKey::parse("10.9.0.0/16").unwrap(), 600).unwrap();
            assert!(b.lift(BanKey::parse("192.0.2.2").unwrap()));
        }
        // The writer finishes its batch once the bans are dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= 4 || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let b = Arc::new(Bans::new(Arc::new(Metrics::new())));
        open(&path, &b, &cfg).unwrap();
        let keys: Vec<String> = b.list().into_iter().map(|l| l.key).collect();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, vec!["10.9.0.0/16".to_string(), "192.0.2.1/32".to_string()]);
        // Compacted: one line per entry.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }
}
