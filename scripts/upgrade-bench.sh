#!/usr/bin/env bash
# scripts/upgrade-bench.sh: a binary upgrade (SIGUSR2) under N live proxied
# WebSockets, on loopback; the numbers in BENCHMARKS.md, "Binary upgrade".
#
#   bash scripts/upgrade-bench.sh [N] [interval_ms]     (defaults: 9000 connections, 1000 ms)
#   PROFILE=debug bash scripts/upgrade-bench.sh 500      (a quick check of the script itself)
#
# Builds (release) the gateway, the echo backend and the bench client; starts
# the backend and the gateway (proxy mode, through a symlink, as an upgrade
# re-executes it by path) in a temp dir; then `upgrade-bench` opens N
# connections, each sending a sequence-numbered message every interval_ms and
# timing its echo, signals the gateway, and prints: failures (must be 0), when
# the new process answered, round trips before the signal, the longest round
# trip each connection saw during the move (p50/p99/max over connections), and
# both processes' peak RSS. The gateway's own `event="upgrade"` line (total
# `ms`, `moved`) follows. Everything is killed at the end.
#
# 9,000 proxied connections hold 18,000 descriptors in each gateway process
# (the limit here is 20,000 per process); the client and the backend each hold
# 9,000 in their own process.
set -euo pipefail
N=${1:-9000}
INTERVAL=${2:-1000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PROFILE=${PROFILE:-release}
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
cargo build $FLAG -q -p portcullis --bin portcullis
cargo build $FLAG -q -p portcullis-loadtest --bin echo-backend --bin upgrade-bench
T=target/$PROFILE
DIR=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # The new gateway is no child of ours: by the pid it reported.
    [ -f "$DIR/new.pid" ] && kill -9 "$(cat "$DIR/new.pid")" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
ulimit -n 20000

$T/echo-backend 127.0.0.1:18091 2>"$DIR/backend.log" &
PIDS+=($!)
disown $!
ln -s "$ROOT/$T/portcullis" "$DIR/portcullis"
cat >"$DIR/gw.toml" <<EOF
[listen]
public = "127.0.0.1:18090"
admin = "127.0.0.1:19090"
defer_accept_s = 0
drain_timeout_s = 5
upgrade_timeout_s = 60
[limits]
max_connections = 9600
per_ip_max_connections = 20000
per_ip_rate = 100000.0
per_ip_burst = 100000
per_user_max_connections = 20000
max_handshakes = 4096
per_ip_max_handshakes = 4096
[auth]
hmac_secret = "bench-secret-0123456789abcdef0123"
[upstream]
url = "ws://127.0.0.1:18091/"
[revocation]
path = "$DIR/r.log"
[log]
level = "warn"
EOF
TOKEN=$("$DIR/portcullis" token --config "$DIR/gw.toml" --sub bench --ttl 1h)
PORTCULLIS_LOG='warn,portcullis::upgrade=debug' "$DIR/portcullis" serve --config "$DIR/gw.toml" 2>"$DIR/gw.log" &
GW=$!
PIDS+=("$GW")
disown "$GW"
for _ in $(seq 100); do grep -q '^listening' "$DIR/gw.log" && break; sleep 0.1; done
$T/upgrade-bench --public 127.0.0.1:18090 --admin 127.0.0.1:19090 \
    --token "$TOKEN" --pid "$GW" -n "$N" --interval-ms "$INTERVAL" | tee "$DIR/bench.out"
curl -s http://127.0.0.1:19090/readyz | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])' >"$DIR/new.pid" || true
grep -E 'event="upgrade"|upgrade round taken' "$DIR/gw.log" || { echo "no upgrade line"; cat "$DIR/gw.log"; exit 1; }
