//! `--workers N`: the parent re-runs this executable N times with the same
//! arguments plus hidden `--worker-index/--worker-count/--worker-out`
//! options. Each child takes its share of counts and rates (see
//! `scenarios::Share`), prints one JSON progress sample per second on
//! stdout, and writes its [`RunData`] to its out file; the parent shows the
//! summed progress and merges the results.
//!
//! Children are killed if they outlive the run's bound by [`OVERRUN`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::{interval, timeout_at, Instant, MissedTickBehavior};

use crate::progress::ProgressLine;
use crate::report::RunData;
use crate::stats::{sum_progress, Progress};

/// How long a child may run past the duration before it is killed.
pub const OVERRUN: Duration = Duration::from_secs(30);

/// Runs `n` children and merges their results.
pub async fn run_parent(n: u32, duration: Duration, quiet: bool, scenario: &str) -> Result<RunData, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("portcullis-loadtest-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_children(&exe, &args, &dir, n, duration, quiet, scenario).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_children(
    exe: &PathBuf,
    args: &[OsString],
    dir: &std::path::Path,
    n: u32,
    duration: Duration,
    quiet: bool,
    scenario: &str,
) -> Result<RunData, String> {
    let (tx, mut rx) = mpsc::channel::<(usize, Progress)>(64);
    let mut children = Vec::new();
    for i in 0..n {
        let out = dir.join(format!("worker-{i}.json"));
        let mut child = Command::new(exe)
            .args(args)
            .arg("--worker-index")
            .arg(i.to_string())
            .arg("--worker-count")
            .arg(n.to_string())
            .arg("--worker-out")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawning worker {i}: {e}"))?;
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(p) = serde_json::from_str::<Progress>(&line) {
                        if tx.send((i as usize, p)).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
        children.push((child, out));
    }
    drop(tx);
    let deadline = Instant::now() + duration + OVERRUN;
    let mut handles = Vec::new();
    for (mut child, out) in children {
        handles.push(tokio::spawn(async move {
            let ok = match timeout_at(deadline, child.wait()).await {
                Ok(Ok(st)) => st.success(),
                _ => {
                    // Past the bound: end this child (ours, by its handle).
                    let _ = child.kill().await;
                    false
                }
            };
            (ok, out)
        }));
    }
    let wait_all = async {
        let mut v = Vec::new();
        for h in handles {
            if let Ok(r) = h.await {
                v.push(r);
            }
        }
        v
    };
    tokio::pin!(wait_all);
    let mut latest: Vec<Option<Progress>> = vec![None; n as usize];
    let mut line = ProgressLine::new(scenario, quiet);
    let mut shown = 0u32;
    let mut tick = interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    let done = loop {
        tokio::select! {
            done = &mut wait_all => break done,
            Some((i, p)) = rx.recv() => latest[i] = Some(p),
            // Ctrl-C reaches the children too (same process group); they stop
            // and write their results, which the parent still merges.
            Ok(()) = tokio::signal::ctrl_c() => {
                eprintln!("\nportcullis-loadtest: interrupted, waiting for the workers' results");
            }
            _ = tick.tick() => {
                let sum = sum_progress(latest.iter().flatten());
                // Only when a new second has been reported (workers' samples
                // arrive with some jitter against this timer).
                if sum.t > shown {
                    shown = sum.t;
                    line.show(&sum);
                }
            }
        }
    };
    line.finish();
    let mut data = RunData::default();
    let mut failed = 0;
    for (ok, out) in done {
        match std::fs::read_to_string(&out)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<RunData>(&s).map_err(|e| e.to_string()))
        {
            Ok(d) => data.merge(&d),
            Err(e) => {
                failed += 1;
                eprintln!(
                    "portcullis-loadtest: worker result {} unreadable ({e}); exit ok: {ok}",
                    out.display()
                );
            }
        }
    }
    if data.workers == 0 {
        return Err(format!("all {n} workers failed"));
    }
    if failed > 0 {
        eprintln!("portcullis-loadtest: {failed} of {n} workers failed; results cover the others");
    }
    Ok(data)
}
