//! The embedded revocation store: an append-only, fsync'd JSON-lines log
//! (`revocation.path`) replayed into memory at start.
//!
//! One line per revocation:
//! `{"jti":"…","at":unix_s}` or `{"sub":"…","before":unix_s,"at":unix_s}`.
//! A corrupt line (a torn write after a crash, a hand edit) is logged with
//! its file and line number and skipped: losing one revocation is bad, but
//! refusing to start would take the whole gateway down over it.
//!
//! Durability: `revoke` returns only after the line is on disk (`fsync`),
//! done on a blocking thread so no async worker waits on the disk. Writes,
//! and the memory update that follows them, happen under one lock shared
//! with compaction, so a compaction snapshot never misses a revocation that
//! is already in the file.
//!
//! Compaction keeps the file from growing forever: revocations older than
//! `max_token_ttl_s` (plus [`COMPACTION_MARGIN_S`]) can match no live token,
//! so they are dropped and the file is rewritten atomically (temp file,
//! fsync, rename, fsync of the directory). It runs at open and whenever
//! [`FileStore::compact`] is called.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};

use super::{Revocation, RevocationSet, RevocationStore, StoreError};

/// Extra time a revocation is kept beyond `max_token_ttl_s`, covering the
/// verifier's leeway (a token is accepted until `exp` + leeway, and may be
/// issued up to leeway in the future) and clock skew between instances.
pub const COMPACTION_MARGIN_S: u64 = 3600;

/// Subscribers (live-connection kickers) that fall this far behind lose
/// the oldest revocations (`RecvError::Lagged`) rather than grow memory.
const BROADCAST_CAPACITY: usize = 1024;

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<u64>,
    at: u64,
}

impl Line {
    fn new(r: &Revocation, at: u64) -> Line {
        match r {
            Revocation::Jti { jti } => Line { jti: Some(jti.clone()), sub: None, before: None, at },
            Revocation::Subject { sub, before } => {
                Line { jti: None, sub: Some(sub.clone()), before: Some(*before), at }
            }
        }
    }

    fn revocation(self) -> Option<(Revocation, u64)> {
        match self {
            Line { jti: Some(jti), sub: None, before: None, at } if !jti.is_empty() => {
                Some((Revocation::Jti { jti }, at))
            }
            Line { jti: None, sub: Some(sub), before: Some(before), at } if !sub.is_empty() => {
                Some((Revocation::Subject { sub, before }, at))
            }
            _ => None,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

fn now() -> u64 {
    crate::clock::unix_now()
}

/// The open log and how many lines it holds.
struct Log {
    /// The append handle; compaction swaps it for one on the new file.
    file: File,
    /// Valid lines in the file (duplicates included): more lines than
    /// entries in memory means a rewrite would shrink the file.
    lines: usize,
}

struct Inner {
    path: PathBuf,
    /// What lookups read; updated only after the line is durable.
    set: RevocationSet,
    /// The lock orders writes, and makes "write + update `set`" atomic with
    /// respect to compaction, whose snapshot therefore misses nothing.
    log: Mutex<Log>,
    /// How long a revocation must be kept (`auth.max_token_ttl_s`).
    max_ttl_s: u64,
    tx: broadcast::Sender<Revocation>,
}

/// The embedded, file-backed [`RevocationStore`].
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("revocations", &self.inner.set.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

/// Would [`FileStore::open`] succeed on `path`? Checked without keeping
/// anything: an existing log is opened as `open` opens it; a missing one
/// is created and removed again (the directory must exist and be
/// writable). For `check-config`, which must report what start-up would.
pub fn check_path(path: &Path) -> Result<(), StoreError> {
    if path.exists() {
        OpenOptions::new().read(true).append(true).open(path).map_err(io_err(path))?;
        return Ok(());
    }
    OpenOptions::new().read(true).append(true).create_new(true).open(path).map_err(io_err(path))?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

impl FileStore {
    /// Opens (or creates) the log at `path`, replays it, and compacts it.
    /// Blocking: call at start-up (or from `spawn_blocking`).
    pub fn open(path: &Path, max_token_ttl_s: u64) -> Result<FileStore, StoreError> {
        let mut file =
            OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io_err(path))?;
        let set = RevocationSet::default();
        let mut lines = 0usize;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io_err(path))?;
        for (i, line) in BufReader::new(&text[..]).split(b'\n').enumerate() {
            // Reading from a byte slice cannot fail.
            let Ok(line) = line else { break };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Line>(&line).ok().and_then(Line::revocation) {
                Some((r, at)) => {
                    set.insert(&r, at);
                    lines += 1;
                }
                None => tracing::warn!(
                    file = %path.display(),
                    line = i + 1,
                    "corrupt revocation log line skipped"
                ),
            }
        }
        // A torn last line (crash mid-write) must not swallow the next
        // append: end it first.
        if text.last().is_some_and(|b| *b != b'\n') {
            file.write_all(b"\n").and_then(|()| file.sync_data()).map_err(io_err(path))?;
        }
        let mut log = Log { file, lines };
        compact_log(path, &set, horizon(max_token_ttl_s), &mut log)?;
        let store = FileStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                set,
                log: Mutex::new(log),
                max_ttl_s: max_token_ttl_s,
                tx: broadcast::channel(BROADCAST_CAPACITY).0,
            }),
        };
        tracing::info!(
            file = %path.display(),
            revocations = store.inner.set.len(),
            "revocation log loaded"
        );
        Ok(store)
    }

    /// The in-memory view (lookups, counts).
    pub fn set(&self) -> &RevocationSet {
        &self.inner.set
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Records revocations learnt elsewhere (another instance, a resync),
    /// each with the unix time `at` it was made: those that change the set
    /// are appended (one fsync for the batch), inserted and broadcast like
    /// a local [`revoke`](RevocationStore::revoke); the rest are skipped, so
    /// hearing a revocation twice writes it once. Returns the new ones.
    pub async fn absorb(&self, items: Vec<(Revocation, u64)>) -> Result<Vec<Revocation>, StoreError> {
        if items.iter().all(|(r, _)| self.inner.set.contains(r)) {
            return Ok(Vec::new());
        }
        let inner = self.inner.clone();
        let fresh = tokio::task::spawn_blocking(move || -> Result<Vec<Revocation>, StoreError> {
            // Under the log lock: `contains` and the write are atomic with
            // respect to concurrent revokes and compaction.
            let mut log = inner.log.blocking_lock();
            let mut bytes = Vec::new();
            let mut fresh = Vec::new();
            for (r, at) in items {
                if !inner.set.contains(&r) && !fresh.iter().any(|(f, _)| *f == r) {
                    bytes.extend_from_slice(&Line::new(&r, at).to_bytes());
                    fresh.push((r, at));
                }
            }
            if fresh.is_empty() {
                return Ok(Vec::new());
            }
            log.file.write_all(&bytes).and_then(|()| log.file.sync_data()).map_err(io_err(&inner.path))?;
            log.lines += fresh.len();
            for (r, at) in &fresh {
                inner.set.insert(r, *at);
            }
            Ok(fresh.into_iter().map(|(r, _)| r).collect())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("revocation write task: {e}")))??;
        for r in &fresh {
            let _ = self.inner.tx.send(r.clone());
        }
        Ok(fresh)
    }

    /// Drops revocations no live token can match any more and rewrites the
    /// log if that (or duplicate lines) leaves it shorter; returns how many
    /// revocations were dropped. Call it periodically (e.g. hourly).
    ///
    /// Blocking (file I/O, fsync, and it waits for an in-flight `revoke`):
    /// call it from `tokio::task::spawn_blocking` or a plain thread, never
    /// directly on an async worker (tokio's `blocking_lock` panics there).
    pub fn compact(&self) -> Result<usize, StoreError> {
        let mut log = self.inner.log.blocking_lock();
        compact_log(&self.inner.path, &self.inner.set, horizon(self.inner.max_ttl_s), &mut log)
    }
}

/// Unix seconds before which a revocation can match no live token.
fn horizon(max_ttl_s: u64) -> u64 {
    now().saturating_sub(max_ttl_s.saturating_add(COMPACTION_MARGIN_S))
}

/// Compacts `set` to `horizon`, then rewrites the file if it holds more
/// lines than `set` now has entries (expired, duplicate or superseded
/// lines); returns how many entries were dropped. `log` must be the locked
/// log; its handle is replaced by one on the new file.
fn compact_log(path: &Path, set: &RevocationSet, horizon: u64, log: &mut Log) -> Result<usize, StoreError> {
    let before = set.len();
    set.compact(horizon);
    let kept = set.entries();
    let dropped = before.saturating_sub(kept.len());
    if log.lines <= kept.len() {
        return Ok(dropped);
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    {
        let mut out = File::create(&tmp).map_err(io_err(path))?;
        let mut buf = Vec::with_capacity(kept.len() * 48);
        for (r, at) in &kept {
            buf.extend_from_slice(&Line::new(r, *at).to_bytes());
        }
        out.write_all(&buf).and_then(|()| out.sync_all()).map_err(io_err(path))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    // The rename is durable only once the directory entry is; best effort
    // (some filesystems refuse to fsync a directory).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let file = OpenOptions::new().append(true).open(path).map_err(io_err(path))?;
    tracing::info!(
        file = %path.display(),
        kept = kept.len(),
        dropped_lines = log.lines - kept.len(),
        "revocation log compacted"
    );
    *log = Log { file, lines: kept.len() };
    Ok(dropped)
}

#[async_trait::async_trait]
impl RevocationStore for FileStore {
    fn is_revoked(&self, sub: &str, jti: Option<&str>, iat: Option<u64>) -> bool {
        self.inner.set.is_revoked(sub, jti, iat)
    }

    async fn revoke(&self, r: Revocation) -> Result<(), StoreError> {
        let inner = self.inner.clone();
        let rev = r.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let at = now();
            let bytes = Line::new(&rev, at).to_bytes();
            let mut log = inner.log.blocking_lock();
            log.file.write_all(&bytes).and_then(|()| log.file.sync_data()).map_err(io_err(&inner.path))?;
            log.lines += 1;
            inner.set.insert(&rev, at);
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Backend(format!("revocation write task: {e}")))??;
        // No subscriber is fine: nothing live to kick.
        let _ = self.inner.tx.send(r);
        Ok(())
    }

    fn len(&self) -> usize {
        self.inner.set.len()
    }

    fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.inner.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn compact(s: &FileStore) -> usize {
        let s = s.clone();
        tokio::task::spawn_blocking(move || s.compact()).await.unwrap().unwrap()
    }

    fn jti(j: &str) -> Revocation {
        Revocation::Jti { jti: j.into() }
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rev.log");
        let s = FileStore::open(&p, 3600).unwrap();
        let mut rx = s.subscribe();
        s.revoke(jti("a")).await.unwrap();
        s.revoke(Revocation::Subject { sub: "bob".into(), before: now() }).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), jti("a"));
        assert!(s.is_revoked("x", Some("a"), None));
        assert!(s.is_revoked("bob", None, Some(now() - 1)));
        drop(s);

        let s = FileStore::open(&p, 3600).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.is_revoked("x", Some("a"), None));
        assert!(s.is_revoked("bob", None, None));
        assert!(!s.is_revoked("bob", Some("b"), Some(now() + 10)));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.lines().next().unwrap().starts_with("{\"jti\":\"a\",\"at\":"), "{text}");
    }

    #[tokio::test]
    async fn absorb_records_and_announces_only_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rev.log");
        let s = FileStore::open(&p, 3600).unwrap();
        let mut rx = s.subscribe();
        s.revoke(jti("known")).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), jti("known"));
        let sub = |before| Revocation::Subject { sub: "s".into(), before };
        let at = now() - 10;
        let fresh =
            s.absorb(vec![(jti("known"), at), (jti("new"), at), (sub(at), at), (jti("new"), at)]).await;
        assert_eq!(fresh.unwrap(), vec![jti("new"), sub(at)]);
        assert_eq!(rx.recv().await.unwrap(), jti("new"));
        assert_eq!(rx.recv().await.unwrap(), sub(at));
        // An earlier cut-off for the same subject changes nothing.
        assert!(s.absorb(vec![(sub(at - 5), at - 5)]).await.unwrap().is_empty());
        assert!(rx.try_recv().is_err());
        drop(s);
        let s = FileStore::open(&p, 3600).unwrap();
        assert!(s.is_revoked("u", Some("new"), None));
        assert!(s.is_revoked("s", None, Some(at - 1)));
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 3);
    }

    #[tokio::test]
    async fn corrupt_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rev.log");
        let at = now();
        let lines = [
            format!(r#"{{"jti":"a","at":{at}}}"#),
            "not json".into(),
            r#"{"jti":"b"}"#.into(), // no `at`
            String::new(),
            format!(r#"{{"sub":"s","at":{at}}}"#), // no `before`
            format!(r#"{{"jti":"c","at":{at}}}"#),
            r#"{"jti":"torn"#.into(), // a crash mid-write: no newline
        ];
        std::fs::write(&p, lines.join("\n")).unwrap();
        let s = FileStore::open(&p, 3600).unwrap();
        assert!(s.is_revoked("u", Some("a"), None));
        assert!(s.is_revoked("u", Some("c"), None));
        assert!(!s.is_revoked("u", Some("b"), None));
        assert!(!s.is_revoked("s", None, None));
        // The torn tail did not swallow the next append.
        s.revoke(jti("d")).await.unwrap();
        drop(s);
        let s = FileStore::open(&p, 3600).unwrap();
        assert!(s.is_revoked("u", Some("d"), None));
        assert_eq!(s.len(), 3);
    }

    #[tokio::test]
    async fn compaction_drops_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rev.log");
        let old = now() - 100 - COMPACTION_MARGIN_S - 10;
        let fresh = now() - 5;
        let lines = [
            format!(r#"{{"jti":"old","at":{old}}}"#),
            format!(r#"{{"jti":"new","at":{fresh}}}"#),
            format!(r#"{{"sub":"s","before":{old},"at":{old}}}"#),
            format!(r#"{{"sub":"t","before":{fresh},"at":{fresh}}}"#),
        ];
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        // At open: the two old entries go, the file is rewritten.
        let s = FileStore::open(&p, 100).unwrap();
        assert_eq!(s.len(), 2);
        assert!(!s.is_revoked("u", Some("old"), None));
        assert!(s.is_revoked("t", None, None));
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 2);
        assert!(!p.with_extension("log.tmp").exists());

        // Later: nothing to drop, nothing rewritten; appends keep working
        // after a rewrite (the handle was swapped to the new file).
        assert_eq!(compact(&s).await, 0);
        s.revoke(jti("after")).await.unwrap();
        drop(s);
        let s = FileStore::open(&p, 100).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s.is_revoked("u", Some("after"), None));
    }

    #[tokio::test]
    async fn compact_rewrites_duplicates_and_drops_aged_entries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rev.log");
        let s = FileStore::open(&p, 3600).unwrap();
        for _ in 0..3 {
            s.revoke(jti("dup")).await.unwrap();
        }
        drop(s);
        // Duplicates collapse at the next open.
        let s = FileStore::open(&p, 3600).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap().lines().count(), 1);
        // An entry ages out while running: compact() drops and rewrites.
        s.set().insert(&jti("aged"), now() - 3600 - COMPACTION_MARGIN_S - 5);
        assert_eq!(compact(&s).await, 1);
        assert!(!s.is_revoked("u", Some("aged"), None));
        assert!(s.is_revoked("u", Some("dup"), None));
    }
}
