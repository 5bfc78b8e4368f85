//! # portcullis-loadtest
//!
//! A load and attack generator for the Portcullis WebSocket gateway, with its
//! own lean WebSocket client so that one process holds many thousands of
//! idle connections. It only ever talks to loopback addresses.
//!
//! # Layout
//! - `cli`        — subcommands (one per scenario) and their options
//! - `run`        — the driver: validate, bound in time, tick, report
//! - `target`     — `ws://` / `http://` URLs, source-IP ranges, the loopback rule
//! - `client`     — TCP connect (bind, small SO_RCVBUF), upgrade request, 101 check, `WsConn`
//! - `frame`      — RFC 6455 frame codec (masked client frames)
//! - `token`      — minting valid tokens and every kind of bad one
//! - `scenarios/` — idle, echo, handshake, slowloris, zombie, storm, mixed
//! - `stats`      — per-group counters, histograms, per-second timeline (mergeable)
//! - `progress`   — the live progress line
//! - `workers`    — `--workers N`: child processes and merging their results
//! - `metrics`    — scraping the gateway's `/metrics`
//! - `report`     — percentiles, summary table, JSON
//! - `html`       — the offline HTML report with inline SVG plots
//! - `peer`       — the shell of the comparison peers (`echo-backend`, `fixed-401`)
//!
//! **Invariants.** Every connect and bind address is loopback
//! (`target::ensure_loopback`); every run stops by itself (`--duration`,
//! default per scenario, at most 24 h, plus a short grace period after which
//! remaining tasks are dropped; worker processes are killed past it).

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod frame;
pub mod html;
pub mod metrics;
pub mod peer;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenarios;
pub mod stats;
pub mod target;
pub mod token;
pub mod workers;
