#!/usr/bin/env python3
"""Turns a compare.sh run directory into summary.md (Markdown on stdout).

Usage: summarize.py RUN_DIR

Reads RUN_DIR/runs.tsv (section, server, round, metric, value), machine.txt
and commands.txt. Every figure is the mean over rounds, with the rounds
themselves in brackets when there are several; ratios are taken against
HAProxy from the means.
"""

import collections
import glob
import json
import os
import sys

NAMES = {
    "pe": "Portcullis, echo mode",
    "pp": "Portcullis, proxy mode",
    "hap": "HAProxy 2.6, proxy mode",
    "floor": "fixed 401 (floor)",
    "tun": "TCP tunnel (relay floor)",
}


def load(run_dir):
    data = collections.defaultdict(list)
    with open(os.path.join(run_dir, "runs.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5 or parts[4] == "":
                continue
            section, server, _round, metric, value = parts
            try:
                data[(section, server, metric)].append(float(value))
            except ValueError:
                pass
    return data


def commands(run_dir):
    """First command of each run-name prefix (round suffix dropped)."""
    out = {}
    path = os.path.join(run_dir, "commands.txt")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            name, _, cmd = line.rstrip("\n").partition("\t")
            out.setdefault(name.rsplit("-r", 1)[0], cmd.strip())
    return out


def steady_p99(run_dir, server, key, from_s=5):
    """Median over rounds and seconds (t >= from_s) of the legit group's
    per-second p99: the attack's steady state, without its ramp-up."""
    vals = []
    for path in sorted(glob.glob(os.path.join(run_dir, "json", f"mixed-{server}-r*.json"))):
        with open(path) as f:
            doc = json.load(f)
        for tick in doc.get("groups", {}).get("legit", {}).get("timeline", []):
            v = tick.get(key)
            if tick.get("t", 0) >= from_s and v is not None:
                vals.append(v)
    if not vals:
        return None
    vals.sort()
    return vals[len(vals) // 2]


class Summary:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.data = load(run_dir)
        self.cmds = commands(run_dir)
        self.lines = []

    def values(self, section, server, metric):
        return self.data.get((section, server, metric), [])

    def mean(self, section, server, metric):
        v = self.values(section, server, metric)
        return sum(v) / len(v) if v else None

    def cell(self, section, server, metric, fmt="{:.0f}"):
        v = self.values(section, server, metric)
        if not v:
            return "–"
        m = fmt.format(sum(v) / len(v))
        if len(v) > 1:
            m += " (" + " / ".join(fmt.format(x) for x in v) + ")"
        return m

    def ratio(self, a, b, fmt="{:.2f}×"):
        if a is None or b is None or b == 0:
            return "–"
        return fmt.format(a / b)

    def per_round(self, section, metric, servers):
        """Each server's figure over HAProxy's of the same round, and their
        median: steadier than a ratio of means on a noisy machine, since
        the servers of one round run minutes apart at most."""
        hap = self.values(section, "hap", metric)
        parts = []
        for s in servers:
            v = self.values(section, s, metric)
            r = sorted(a / b for a, b in zip(v, hap) if b)
            if len(r) < 2:
                continue
            rounds = " / ".join(f"{a / b:.2f}" for a, b in zip(v, hap) if b)
            parts.append(f"{NAMES[s]} {rounds} (median {r[len(r) // 2]:.2f}×)")
        if parts:
            self.out("Against HAProxy, round by round: " + "; ".join(parts) + ".")
            self.out()

    def out(self, s=""):
        self.lines.append(s)

    def command(self, *prefixes):
        for p in prefixes:
            if p in self.cmds:
                self.out("```sh")
                self.out(self.cmds[p])
                self.out("```")
                self.out()

    def has(self, section):
        return any(k[0] == section for k in self.data)

    def rss(self, section, title, servers):
        if not self.has(section):
            return
        self.out(f"### {title}")
        self.out()
        self.out(
            "| server | connections | server RSS / conn (B) | backend RSS / conn (B) | server vs HAProxy |"
        )
        self.out("|---|---:|---:|---:|---:|")
        hap = self.mean(section, "hap", "server_bytes_per_conn")
        for s in servers:
            if not self.values(section, s, "server_bytes_per_conn"):
                continue
            backend = (
                self.cell(section, s, "backend_bytes_per_conn")
                if self.values(section, s, "backend_bytes_per_conn")
                else "none (built-in echo)"
            )
            self.out(
                f"| {NAMES[s]} | {self.cell(section, s, 'connections')} "
                f"| {self.cell(section, s, 'server_bytes_per_conn')} | {backend} "
                f"| {self.ratio(self.mean(section, s, 'server_bytes_per_conn'), hap)} |"
            )
        self.out()
        self.command(f"{section}-pe", f"{section}-hap")

    def refusals(self):
        kinds = ["missing", "bad-hs256", "bad-es256", "rate-limited"]
        if not any(self.has(f"refusals-{k}") for k in kinds):
            return
        self.out("### Refusals per second of server CPU (utime + stime)")
        self.out()
        self.out(
            "| token | Portcullis | HAProxy | fixed 401 floor | Portcullis vs HAProxy | Portcullis vs floor |"
        )
        self.out("|---|---:|---:|---:|---:|---:|")
        floor = self.mean("refusals-missing", "floor", "per_cpu_s")
        for k in kinds:
            sec = f"refusals-{k}"
            pe = self.mean(sec, "pe", "per_cpu_s")
            hap = self.mean(sec, "hap", "per_cpu_s")
            fl = self.cell(sec, "floor", "per_cpu_s") if k == "missing" else ""
            label = k + (" (429)" if k == "rate-limited" else " (401)")
            self.out(
                f"| {label} | {self.cell(sec, 'pe', 'per_cpu_s')} | {self.cell(sec, 'hap', 'per_cpu_s')} "
                f"| {fl} | {self.ratio(pe, hap)} | {self.ratio(pe, floor)} |"
            )
        self.out()
        self.out("Refusals counted (mean per run) and server CPU seconds:")
        self.out()
        self.out("| token | server | refusals | server CPU (s) |")
        self.out("|---|---|---:|---:|")
        for k in kinds:
            sec = f"refusals-{k}"
            for s in ["pe", "hap", "floor"]:
                if self.values(sec, s, "refused"):
                    self.out(
                        f"| {k} | {NAMES[s]} | {self.cell(sec, s, 'refused')} "
                        f"| {self.cell(sec, s, 'cpu_s', '{:.2f}')} |"
                    )
        self.out()
        self.command(
            "refusals-missing-pe",
            "refusals-bad-hs256-pe",
            "refusals-bad-es256-pe",
            "refusals-rate-limited-pe",
        )

    def latency(self):
        if not self.has("latency"):
            return
        self.out("### Valid-handshake latency at 200 handshakes/s")
        self.out()
        self.out("| server | 101 / attempts | p50 (ms) | p99 (ms) | p99.9 (ms) | p50 vs HAProxy | p99 vs HAProxy |")
        self.out("|---|---:|---:|---:|---:|---:|---:|")
        for s in ["pe", "pp", "hap"]:
            if not self.values("latency", s, "p50_ms"):
                continue
            f = "{:.3f}"
            self.out(
                f"| {NAMES[s]} | {self.cell('latency', s, 'upgraded')} / {self.cell('latency', s, 'attempts')} "
                f"| {self.cell('latency', s, 'p50_ms', f)} | {self.cell('latency', s, 'p99_ms', f)} "
                f"| {self.cell('latency', s, 'p999_ms', f)} "
                f"| {self.ratio(self.mean('latency', s, 'p50_ms'), self.mean('latency', 'hap', 'p50_ms'))} "
                f"| {self.ratio(self.mean('latency', s, 'p99_ms'), self.mean('latency', 'hap', 'p99_ms'))} |"
            )
        self.out()
        self.command("latency-pe", "latency-hap")

    def bigmsg(self):
        if not self.has("bigmsg"):
            return
        self.out("### RSS kept per connection after one 1 MiB message, 1,000 connections")
        self.out()
        self.out(
            "| server | idle (B / conn) | after 1 MiB each (B / conn) | kept above idle (B / conn) "
            "| sent once all are open: after | kept above idle | backend after (B / conn) |"
        )
        self.out("|---|---:|---:|---:|---:|---:|---:|")
        for s in ["pe", "pp", "hap"]:
            if not self.values("bigmsg", s, "server_bytes_per_conn"):
                continue
            idle = self.mean("bigidle", s, "server_bytes_per_conn")

            def kept(section):
                after = self.mean(section, s, "server_bytes_per_conn")
                return "–" if idle is None or after is None else f"{after - idle:.0f}"

            backend = (
                self.cell("bigmsg", s, "backend_bytes_per_conn")
                if self.values("bigmsg", s, "backend_bytes_per_conn")
                else "none (built-in echo)"
            )
            self.out(
                f"| {NAMES[s]} | {self.cell('bigidle', s, 'server_bytes_per_conn')} "
                f"| {self.cell('bigmsg', s, 'server_bytes_per_conn')} | {kept('bigmsg')} "
                f"| {self.cell('bigmsg-after', s, 'server_bytes_per_conn')} | {kept('bigmsg-after')} | {backend} |"
            )
        self.out()
        self.command("bigmsg-pe", "bigmsg-hap")

    def echo64(self):
        if not self.has("echo64"):
            return
        self.out("### Echo throughput, 64 KiB binary messages, 50 connections")
        self.out()
        self.out("| server | messages/s | server CPU (s) | MB per server-CPU-s | backend CPU (s) | per CPU-s vs HAProxy |")
        self.out("|---|---:|---:|---:|---:|---:|")
        for s in ["pe", "pp", "hap", "tun"]:
            if not self.values("echo64", s, "msgs_per_s"):
                continue
            self.out(
                f"| {NAMES[s]} | {self.cell('echo64', s, 'msgs_per_s')} | {self.cell('echo64', s, 'server_cpu_s', '{:.2f}')} "
                f"| {self.cell('echo64', s, 'mb_per_server_cpu_s', '{:.1f}')} | {self.cell('echo64', s, 'backend_cpu_s', '{:.2f}')} "
                f"| {self.ratio(self.mean('echo64', s, 'mb_per_server_cpu_s'), self.mean('echo64', 'hap', 'mb_per_server_cpu_s'))} |"
            )
        self.out()
        self.per_round("echo64", "mb_per_server_cpu_s", ["pe", "pp", "tun"])
        self.command("echo64-pe", "echo64-hap")

    def echo(self):
        if not self.has("echo"):
            return
        self.out("### Echo throughput, 1 KiB binary messages, 50 connections")
        self.out()
        self.out(
            "| server | messages/s | server CPU (s) | messages per server-CPU-s | backend CPU (s) "
            "| RTT p50 / p99 (ms) | messages/s vs HAProxy | per CPU-s vs HAProxy |"
        )
        self.out("|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in ["pe", "pp", "hap", "tun"]:
            if not self.values("echo", s, "msgs_per_s"):
                continue
            self.out(
                f"| {NAMES[s]} | {self.cell('echo', s, 'msgs_per_s')} | {self.cell('echo', s, 'server_cpu_s', '{:.2f}')} "
                f"| {self.cell('echo', s, 'msgs_per_server_cpu_s')} | {self.cell('echo', s, 'backend_cpu_s', '{:.2f}')} "
                f"| {self.cell('echo', s, 'rtt_p50_ms', '{:.3f}')} / {self.cell('echo', s, 'rtt_p99_ms', '{:.3f}')} "
                f"| {self.ratio(self.mean('echo', s, 'msgs_per_s'), self.mean('echo', 'hap', 'msgs_per_s'))} "
                f"| {self.ratio(self.mean('echo', s, 'msgs_per_server_cpu_s'), self.mean('echo', 'hap', 'msgs_per_server_cpu_s'))} |"
            )
        self.out()
        self.per_round("echo", "msgs_per_server_cpu_s", ["pe", "pp", "tun"])
        self.command("echo-pe", "echo-hap")

    def mixed(self):
        if not self.has("mixed"):
            return
        self.out("### Mixed: legit clients under attack (60 s)")
        self.out()
        self.out(
            "| server | legit success ratio | sessions | handshake p50 / p99 / p99.9 (ms) "
            "| echo RTT p50 / p99 / p99.9 (ms) | slowloris reaped | zombies reaped | server CPU (s) |"
        )
        self.out("|---|---:|---:|---:|---:|---:|---:|---:|")
        f = "{:.3f}"
        for s in ["pp", "hap", "pe"]:
            if not self.values("mixed", s, "success_ratio"):
                continue
            self.out(
                f"| {NAMES[s]} | {self.cell('mixed', s, 'success_ratio', '{:.4f}')} | {self.cell('mixed', s, 'sessions')} "
                f"| {self.cell('mixed', s, 'hs_p50_ms', f)} / {self.cell('mixed', s, 'hs_p99_ms', f)} / {self.cell('mixed', s, 'hs_p999_ms', f)} "
                f"| {self.cell('mixed', s, 'rtt_p50_ms', f)} / {self.cell('mixed', s, 'rtt_p99_ms', f)} / {self.cell('mixed', s, 'rtt_p999_ms', f)} "
                f"| {self.cell('mixed', s, 'slowloris_reaped')} | {self.cell('mixed', s, 'zombies_reaped')} "
                f"| {self.cell('mixed', s, 'server_cpu_s', '{:.2f}')} |"
            )
        self.out()
        hp = self.mean("mixed", "hap", "hs_p99_ms")
        pp = self.mean("mixed", "pp", "hs_p99_ms")
        self.out(f"Handshake p99, Portcullis proxy vs HAProxy: {self.ratio(pp, hp)}; "
                 f"echo RTT p99: {self.ratio(self.mean('mixed', 'pp', 'rtt_p99_ms'), self.mean('mixed', 'hap', 'rtt_p99_ms'))}.")
        self.out()
        self.out("Steady state, without the attack's ramp-up: the median over seconds 5–60 (all rounds) "
                 "of each second's p99.")
        self.out()
        self.out("| server | handshake p99 per second, median (ms) | echo RTT p99 per second, median (ms) | vs HAProxy (handshake / RTT) |")
        self.out("|---|---:|---:|---:|")
        hs_hap = steady_p99(self.run_dir, "hap", "hs_p99_ms")
        rtt_hap = steady_p99(self.run_dir, "hap", "rtt_p99_ms")
        for s in ["pp", "hap", "pe"]:
            hs = steady_p99(self.run_dir, s, "hs_p99_ms")
            rtt = steady_p99(self.run_dir, s, "rtt_p99_ms")
            if hs is None:
                continue
            self.out(f"| {NAMES[s]} | {hs:.3f} | {rtt:.3f} | {self.ratio(hs, hs_hap)} / {self.ratio(rtt, rtt_hap)} |")
        self.out()
        self.command("mixed-pp", "mixed-hap")

    def heartbeat(self):
        if not self.has("heartbeat"):
            return
        self.out("### Heartbeat cost at 9,000 idle connections (echo mode)")
        self.out()
        fast = self.mean("heartbeat", "ping-1000ms", "cpu_s")
        slow = self.mean("heartbeat", "ping-60000ms", "cpu_s")
        window = self.mean("heartbeat", "ping-1000ms", "window_s") or 30
        conns = self.mean("heartbeat", "ping-1000ms", "connections") or 0
        self.out("| ping interval | connections | server CPU over the window (s) | share of one core |")
        self.out("|---|---:|---:|---:|")
        for name, label in [("ping-1000ms", "1 s"), ("ping-60000ms", "60 s")]:
            c = self.mean("heartbeat", name, "cpu_s")
            share = "–" if c is None else f"{100 * c / window:.1f} %"
            self.out(
                f"| {label} | {self.cell('heartbeat', name, 'connections')} "
                f"| {self.cell('heartbeat', name, 'cpu_s', '{:.2f}')} | {share} |"
            )
        self.out()
        if fast is not None and slow is not None and conns:
            pings = conns * (window / 1.0 - window / 60.0)
            per = (fast - slow) / pings * 1e6
            self.out(
                f"Per connection per ping (ping out, pong in, timer re-armed): "
                f"({fast:.2f} − {slow:.2f}) s / ({conns:.0f} × {window / 1.0 - window / 60.0:.1f} pings) "
                f"= **{per:.2f} µs** of server CPU."
            )
            self.out()
        self.command("heartbeat-1000ms", "heartbeat-60000ms")

    def render(self, run_dir):
        machine = ""
        p = os.path.join(run_dir, "machine.txt")
        if os.path.exists(p):
            with open(p) as f:
                machine = f.read().strip()
        self.out("## Machine")
        self.out()
        self.out("```")
        self.out(machine)
        self.out("```")
        self.out()
        self.rss("rss", "RSS per idle authenticated connection at 9,000 connections", ["pe", "pp", "hap"])
        self.refusals()
        self.latency()
        self.echo()
        self.echo64()
        self.bigmsg()
        self.mixed()
        self.heartbeat()
        self.rss("rss5k", "RSS per idle authenticated connection at 5,000 connections (echo mode)", ["pe"])
        return "\n".join(self.lines) + "\n"


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: summarize.py RUN_DIR\n")
        sys.exit(2)
    sys.stdout.write(Summary(sys.argv[1]).render(sys.argv[1]))


if __name__ == "__main__":
    main()
