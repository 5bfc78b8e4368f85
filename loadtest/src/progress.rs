//! The live progress line on stderr, once per second: rewritten in place on
//! a terminal, one line per second otherwise (logs, CI).

use std::io::{IsTerminal, Write};

use crate::stats::Progress;

/// Formats and prints progress samples.
pub struct ProgressLine {
    scenario: String,
    quiet: bool,
    tty: bool,
    /// Messages at the previous sample, for the per-second rate.
    prev_messages: u64,
    /// Attempts at the previous sample, for the per-second rate.
    prev_attempts: u64,
    /// True once something was printed in place (needs a final newline).
    dirty: bool,
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

impl ProgressLine {
    /// A progress line; `quiet` prints nothing.
    pub fn new(scenario: &str, quiet: bool) -> Self {
        ProgressLine {
            scenario: scenario.to_string(),
            quiet,
            tty: std::io::stderr().is_terminal(),
            prev_messages: 0,
            prev_attempts: 0,
            dirty: false,
        }
    }

    /// The text for one sample.
    pub fn format(&mut self, p: &Progress) -> String {
        let msgs = p.messages.saturating_sub(self.prev_messages);
        let att = p.attempts.saturating_sub(self.prev_attempts);
        self.prev_messages = p.messages;
        self.prev_attempts = p.attempts;
        let mut s = format!(
            "[{:>4}s] {} open {} | attempts {} ({}/s) ok {} failed {}",
            p.t, self.scenario, p.open, p.attempts, att, p.upgraded, p.failed
        );
        if p.messages > 0 {
            s.push_str(&format!(" | msgs {} ({}/s)", p.messages, msgs));
        }
        if p.hs_p99_us > 0 {
            s.push_str(&format!(" | hs p50 {} p99 {} ms", ms(p.hs_p50_us), ms(p.hs_p99_us)));
        }
        if p.rtt_p99_us > 0 {
            s.push_str(&format!(" | rtt p50 {} p99 {} ms", ms(p.rtt_p50_us), ms(p.rtt_p99_us)));
        }
        s
    }

    /// Prints one sample.
    pub fn show(&mut self, p: &Progress) {
        let s = self.format(p);
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{s}");
            self.dirty = true;
        } else {
            let _ = writeln!(err, "{s}");
        }
        let _ = err.flush();
    }

    /// Ends an in-place line.
    pub fn finish(&mut self) {
        if self.dirty {
            eprintln!();
            self.dirty = false;
        }
    }
}

/// A worker's progress sample, one JSON line on stdout for its parent.
pub fn emit_json(p: &Progress) {
    if let Ok(s) = serde_json::to_string(p) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rates() {
        let mut l = ProgressLine::new("echo", true);
        let p = Progress {
            t: 1,
            open: 3,
            attempts: 3,
            upgraded: 3,
            messages: 100,
            rtt_p50_us: 1500,
            rtt_p99_us: 2500,
            ..Default::default()
        };
        let s = l.format(&p);
        assert!(
            s.contains("open 3") && s.contains("msgs 100 (100/s)") && s.contains("rtt p50 1.5 p99 2.5 ms"),
            "{s}"
        );
        let p2 = Progress { t: 2, messages: 150, ..p };
        assert!(l.format(&p2).contains("(50/s)"));
    }
}
