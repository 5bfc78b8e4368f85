#!/usr/bin/env bash
# scripts/bench-redis-idle.sh: Redis CPU per live connection-second at zero
# churn, and per connect (lease claim) and per disconnect (release), with N
# idle authenticated connections on one gateway (each a distinct user, so
# each holds one lease), against one local redis-server over TCP.
#
#   bash scripts/bench-redis-idle.sh [GATEWAY_BINARY]
#
# Environment: N=9000 connections, WINDOW=30 seconds per measured hold,
# LT=path of portcullis-loadtest (default target/release, else target/debug).
# Redis CPU is utime+stime of the redis-server process from /proc (10 ms
# ticks); the idle baseline (gateway connected, no connection) is measured
# first over the same window and subtracted.
set -euo pipefail
cd "$(dirname "$0")/.."
GW="${1:-target/release/portcullis}"
N="${N:-9000}"
WINDOW="${WINDOW:-30}"
LT="${LT:-$( [ -x target/release/portcullis-loadtest ] && echo target/release/portcullis-loadtest || echo target/debug/portcullis-loadtest)}"
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"

RP="$(free_port)"
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no --loglevel warning --dir "$TMP" >/dev/null 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
for _ in $(seq 100); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/secret"
cat >"$TMP/gw.toml" <<TOML
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
[limits]
max_connections = 19000
per_ip_max_connections = 19000
per_ip_rate = 1000000.0
per_ip_burst = 100000
max_handshakes = 4096
[auth]
hmac_secret_file = "$TMP/secret"
[revocation]
backend = "redis"
path = "$TMP/rev.log"
redis_url = "redis://127.0.0.1:$RP"
[log]
level = "warn"
TOML
"$GW" serve --config "$TMP/gw.toml" 2>"$TMP/gw.log" &
GW_PID=$!; PIDS+=("$GW_PID")
line=""; for _ in $(seq 200); do line="$(grep -m1 '^listening ' "$TMP/gw.log" || true)"; [ -n "$line" ] && break; sleep 0.05; done
[ -n "$line" ] || { echo "the gateway did not start:" >&2; cat "$TMP/gw.log" >&2; exit 1; }
PUBLIC="$(sed -E 's/.*public=([^ ]+).*/\1/' <<<"$line")"; ADMIN="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$line")"
open_conns() { curl -fsS "http://$ADMIN/metrics" | awk '/^portcullis_connections\{state="open"\}/ {print $2}'; }

sleep 3
b0="$(ticks "$REDIS_PID")"; sleep "$WINDOW"; b1="$(ticks "$REDIS_PID")"
base=$((b1 - b0))
r0="$(ticks "$REDIS_PID")"; t0="$(date +%s.%N)"
"$LT" idle --url "ws://$PUBLIC/" --secret-file "$TMP/secret" --count "$N" --rate 2000 \
  --duration "$((WINDOW * 3 + 60))s" --source-ips 127.0.0.2-127.0.0.41 --quiet --json "$TMP/idle.json" >"$TMP/lt.txt" 2>&1 &
LT_PID=$!; PIDS+=("$LT_PID")
for _ in $(seq 600); do [ "$(open_conns | cut -d. -f1)" -ge "$N" ] 2>/dev/null && break; sleep 0.2; done
[ "$(open_conns | cut -d. -f1)" -ge "$N" ] || { echo "only $(open_conns) connections opened:" >&2; cat "$TMP/lt.txt" >&2; exit 1; }
r1="$(ticks "$REDIS_PID")"; t1="$(date +%s.%N)"
sleep 2
h0="$(ticks "$REDIS_PID")"; sleep "$WINDOW"; h1="$(ticks "$REDIS_PID")"
kill "$LT_PID"; wait "$LT_PID" 2>/dev/null || true
d0="$(ticks "$REDIS_PID")"; td0="$(date +%s.%N)"
for _ in $(seq 300); do [ "$(open_conns | cut -d. -f1)" -le 0 ] 2>/dev/null && break; sleep 0.2; done
sleep 1
d1="$(ticks "$REDIS_PID")"; td1="$(date +%s.%N)"
python3 - "$N" "$WINDOW" "$HZ" "$base" "$r0" "$r1" "$t0" "$t1" "$h0" "$h1" "$d0" "$d1" "$td0" "$td1" "$GW" <<'PY'
import sys
n, w, hz, base = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
r0, r1, t0, t1, h0, h1, d0, d1, td0, td1 = map(float, sys.argv[5:15])
rate = base / hz / w                       # idle baseline, CPU seconds per second
hold = (h1 - h0) / hz - rate * w
ramp = (r1 - r0) / hz - rate * (t1 - t0)
down = (d1 - d0) / hz - rate * (td1 - td0)
print(f"gateway: {sys.argv[15]}; {n} idle connections, window {w:.0f} s; redis idle baseline {rate*1e3:.2f} ms CPU/s")
print(f"redis CPU per live connection-second: {hold / (n * w) * 1e6:.4f} us (hold {hold:.3f} s over baseline)")
print(f"redis CPU per connect (claim): {ramp / n * 1e6:.1f} us; per disconnect (release): {down / n * 1e6:.1f} us")
PY
