//! The operator reference (`docs/reference.md`) cannot drift from the code:
//! every refusal reason, session reason, metric name and configuration key
//! the code knows must appear in it, and no file of the repository may point
//! outside it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use portcullis::config::Config;
use portcullis::metrics::{Metrics, NAMES};
use portcullis::{CloseReason, Reject};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn reference() -> String {
    std::fs::read_to_string(root().join("docs/reference.md")).expect("docs/reference.md exists")
}

/// The names missing from the reference, each looked for as `code`.
fn missing(doc: &str, names: impl IntoIterator<Item = String>) -> Vec<String> {
    names.into_iter().filter(|n| !doc.contains(&format!("`{n}`"))).collect()
}

#[test]
fn every_reason_is_documented() {
    let doc = reference();
    let rejects = Reject::ALL.iter().map(|r| r.label().to_string());
    let closes = CloseReason::ALL.iter().map(|c| c.label().to_string());
    let gone = missing(&doc, rejects.chain(closes));
    assert!(gone.is_empty(), "docs/reference.md lacks the reasons {gone:?}");
}

#[test]
fn every_metric_is_documented() {
    let doc = reference();
    // The declared names, and whatever a live registry exports (so a metric
    // registered without being added to `NAMES` is caught too).
    let mut names: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let m = Metrics::new();
    m.handshake_accepted(std::time::Duration::from_millis(1));
    for line in m.render().lines() {
        if let Some(rest) = line.strip_prefix("# HELP portcullis_") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            names.insert(format!("portcullis_{name}"));
        }
    }
    assert!(names.len() >= NAMES.len());
    let gone = missing(&doc, names);
    assert!(gone.is_empty(), "docs/reference.md lacks the metrics {gone:?}");
}

/// The keys a table accepts, read from the error an unknown key gets
/// (`…: unknown key, expected one of `a`, `b`…`). `None` when `table` is
/// not a table of fixed keys.
fn known_keys(table: &str) -> Option<Vec<String>> {
    let probe = if table.is_empty() { "zz_probe = 1\n".into() } else { format!("[{table}]\nzz_probe = 1\n") };
    let err = Config::parse(&probe).unwrap_err().to_string();
    let (_, expected) = err.split_once("unknown key, expected")?;
    Some(expected.split('`').skip(1).step_by(2).map(String::from).collect())
}

/// Every dotted key the configuration accepts, nested tables walked.
fn config_keys() -> Vec<String> {
    let mut out = Vec::new();
    let mut tables = vec![String::new()];
    while let Some(table) = tables.pop() {
        for key in known_keys(&table).unwrap_or_else(|| panic!("[{table}] is a table")) {
            let dotted = if table.is_empty() { key } else { format!("{table}.{key}") };
            if known_keys(&dotted).is_some() {
                tables.push(dotted);
            } else {
                out.push(dotted);
            }
        }
    }
    out
}

#[test]
fn every_config_key_is_documented() {
    let keys = config_keys();
    // The walk itself works: tables, nested tables and leaves are found.
    for k in ["listen.public", "limits.max_connections", "auth.login.users_file", "upstream.claim_headers"] {
        assert!(keys.iter().any(|x| x == k), "the walk missed {k}: {keys:?}");
    }
    let gone = missing(&reference(), keys);
    assert!(gone.is_empty(), "docs/reference.md lacks the keys {gone:?}");
}

/// Text files of the repository (what git would track: no `target/`, no
/// `.git/`), with their contents.
fn repository_texts() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                if !(name == "target" || name.starts_with('.') && name != ".ci") {
                    dirs.push(path);
                }
                continue;
            }
            let text_like = [".rs", ".md", ".toml", ".sh", ".json", ".yml", ".yaml", ".service", ".lua"]
                .iter()
                .any(|ext| name.ends_with(ext))
                || name == "Dockerfile"
                || dir.ends_with(".ci");
            if text_like && !name.ends_with(".lock") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    out.push((path, text));
                }
            }
        }
    }
    out
}

#[test]
fn no_file_points_outside_the_repository() {
    // Spelt in pieces so this file does not match itself.
    let shared = "../".to_string() + "shared";
    let spec = "SP".to_string() + "EC";
    let mut hits = Vec::new();
    for (path, text) in repository_texts() {
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            let issue_number = ["issue ", "issue #", "issues "].iter().any(|w| {
                lower
                    .match_indices(w)
                    .any(|(at, _)| lower[at + w.len()..].chars().next().is_some_and(|c| c.is_ascii_digit()))
            });
            // The contract document's name as a word, with or without `.md`.
            let spec_word = line.match_indices(spec.as_str()).any(|(at, _)| {
                let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
                !line[..at].chars().next_back().is_some_and(word)
                    && !line[at + spec.len()..].chars().next().is_some_and(word)
            });
            if issue_number || spec_word || line.contains(shared.as_str()) {
                hits.push(format!("{}:{}: {line}", path.display(), i + 1));
            }
        }
    }
    assert!(hits.is_empty(), "pointers outside the repository or to internal issues:\n{}", hits.join("\n"));
}
