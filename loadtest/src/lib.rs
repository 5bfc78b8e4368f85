//! # portcullis-loadtest
//!
//! A load and attack generator for the Portcullis WebSocket gateway, with its
//! own lean WebSocket client so that one process holds many thousands of
//! idle connections. It talks to loopback addresses unless told
//! `--allow-remote`.
//!
//! # Layout
//! - `cli`        — subcommands (one per scenario) and their options
//! - `run`        — the driver: validate, bound in time, tick, report
//! - `target`     — `ws://` / `wss://` / `http://` URLs, source-IP ranges, the reach rule
//! - `tls`        — the rustls client configuration (`--ca`, `--insecure`, system CAs)
//! - `client`     — TCP connect (bind, small SO_RCVBUF), TLS, upgrade request, 101 check, `WsConn`
//! - `frame`      — RFC 6455 frame codec (masked client frames)
//! - `token`      — minting valid tokens and every kind of bad one
//! - `scenarios/` — idle, echo, handshake, slowloris, zombie, storm, mixed, capacity
//! - `stats`      — per-group counters, histograms, per-second timeline (mergeable)
//! - `progress`   — the live progress line
//! - `workers`    — `--workers N`: child processes and merging their results
//! - `metrics`    — scraping the gateway's `/metrics`
//! - `procstat`   — the gateway's RSS, CPU and descriptors (`/proc/PID` or `/metrics`)
//! - `merge`      — combining the results of several runs exactly
//! - `report`     — percentiles, summary table, JSON
//! - `html`       — the offline HTML report with inline SVG plots
//! - `peer`       — the shell of the comparison peers (`echo-backend`, `fixed-401`)
//!
//! **Invariants.** Every connect and bind address is loopback
//! (`target::ensure_allowed`) unless `--allow-remote`, and then every bind
//! address is one of this host's (`target::ensure_local`); every run stops by itself (`--duration`,
//! default per scenario, at most 24 h, plus a short grace period after which
//! remaining tasks are dropped; worker processes are killed past it).

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod frame;
pub mod html;
pub mod merge;
pub mod metrics;
pub mod peer;
pub mod procstat;
pub mod progress;
pub mod report;
pub mod run;
pub mod scenarios;
pub mod stats;
pub mod target;
pub mod tls;
pub mod token;
pub mod workers;
