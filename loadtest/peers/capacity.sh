#!/usr/bin/env bash
# The sizing answer for the shipped defaults: `portcullis-loadtest capacity`
# against a freshly started Portcullis with its default limits, in echo mode
# (portcullis-defaults-echo.toml) and in proxy mode before loadtest's
# echo-backend (portcullis-defaults.toml). Loopback only, bounded runs.
#
#   loadtest/peers/capacity.sh
#   COUNT=2000 STEP=500 loadtest/peers/capacity.sh        a quick run
#
# COUNT stays under the defaults: 40 source addresses × 225 connections
# (per_ip_max_connections = 256) opened at RATE/40 per address per second
# (per_ip_rate = 20). Output in $OUT (default target/capacity/<date>):
# <mode>.txt (the table), <mode>.json, <mode>.html, commands.txt, machine.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/loadtest/peers
OUT=${OUT:-$ROOT/target/capacity/$(date +%Y%m%d-%H%M%S)}
MODES=${MODES-"echo proxy"}
COUNT=${COUNT:-8000}
STEP=${STEP:-2000}
RATE=${RATE:-600}
MSG_RATE=${MSG_RATE:-1}
HOLD=${HOLD:-10s}
BUILD=${BUILD:-1}
BIN=${BIN:-$ROOT/target/release}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p portcullis --bin portcullis -p portcullis-loadtest --bins)
fi
mkdir -p "$OUT/keys"
cd "$OUT"
openssl rand -hex 32 >keys/hs256.secret
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -sr)"
  echo "portcullis: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >machine.txt
: >commands.txt

PIDS=()
# SIGTERM (the gateway drains), then SIGKILL after 10 s; waits for the exit
# so the next mode can bind the same ports.
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_listen() {
  for _ in $(seq 1 100); do
    ss -Hltn "( sport = :$1 )" | grep -q . && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  exit 1
}

for mode in $MODES; do
  conf=$PEERS/portcullis-defaults-echo.toml
  if [ "$mode" = proxy ]; then
    conf=$PEERS/portcullis-defaults.toml
    "$BIN/echo-backend" 127.0.0.1:18081 >"echo-backend.log" 2>&1 &
    PIDS+=($!)
    wait_listen 18081
  fi
  rm -f portcullis-revocations.log
  "$BIN/portcullis" serve --config "$conf" >"$mode.gateway.log" 2>&1 &
  gw=$!
  PIDS+=("$gw")
  wait_listen 18080
  cmd=("$BIN/portcullis-loadtest" capacity --url ws://127.0.0.1:18080/ --secret-file keys/hs256.secret
    --gateway-pid "$gw" --count "$COUNT" --step "$STEP" --rate "$RATE" --msg-rate "$MSG_RATE" --hold "$HOLD"
    --source-ips 127.0.0.2-127.0.0.41 --quiet --json "$mode.json" --html "$mode.html")
  printf '%s\t%s\n' "$mode" "${cmd[*]}" | sed "s|$ROOT/||g; s|$OUT/||g" >>commands.txt
  log "$mode: ${cmd[*]}"
  timeout --kill-after=10 600 "${cmd[@]}" >"$mode.txt" 2>"$mode.err" || log "warning: $mode exited with $?"
  sed -n '/== capacity (/,$p' "$mode.txt"
  cleanup
  PIDS=()
  sleep 1
done
log "results in $OUT"
