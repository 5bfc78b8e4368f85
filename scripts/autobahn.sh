#!/usr/bin/env bash
# Autobahn|Testsuite (`wstest -m fuzzingclient`) against Portcullis, loopback
# only. Needs Python 2.7 with `autobahntestsuite`
# (`python2.7 -m pip install --user autobahntestsuite`, pyenv's 2.7.18), and
# for the proxy runs Python 3 with `websockets` (pip install websockets) and
# haproxy.
#
#   scripts/autobahn.sh               echo mode, every case, compression
#                                     (12.*, 13.*) included: echo mode answers
#                                     permessage-deflate itself; exits 1 on
#                                     any case not OK or INFORMATIONAL. CI.
#   MODES="echo backend haproxy proxy" scripts/autobahn.sh
#                                     also: the same cases, 12.* and 13.*
#                                     included, against a deflate-capable
#                                     backend (Python `websockets`) alone,
#                                     through HAProxy (a tunnel), and through
#                                     Portcullis in proxy mode; exits 1 if the
#                                     gateway does worse than the backend alone
#                                     on any case. Takes minutes.
#   CASES='["1.*","5.*"]'             a subset.
#   SAVE=1                            copy the summaries to scripts/autobahn/.
#   WSTEST_TIMEOUT=10800              seconds allowed per mode (default 3600; the
#                                     full 12.* and 13.* run through a Python
#                                     backend takes about an hour per mode).
#
# Output in $OUT (default target/autobahn/<date>): one directory per mode with
# Autobahn's HTML/JSON report, and summary-<mode>.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/target/autobahn/$(date +%Y%m%d-%H%M%S)}
MODES=${MODES:-echo}
CASES=${CASES:-'["*"]'}
WSTEST=${WSTEST:-$HOME/.local/bin/wstest}
PY2=${PY2:-$(PYENV_VERSION=2.7.18 pyenv which python2.7 2>/dev/null || command -v python2.7 || true)}
PORTCULLIS=${PORTCULLIS_BIN:-$ROOT/target/release/portcullis}
GW_PORT=${GW_PORT:-18280}
ADMIN_PORT=${ADMIN_PORT:-18290}
BE_PORT=${BE_PORT:-18281}
HAP_PORT=${HAP_PORT:-18282}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 2
}

[ -x "$WSTEST" ] || die "wstest not found at $WSTEST (python2.7 -m pip install --user autobahntestsuite)"
if [ -z "${PORTCULLIS_BIN:-}" ]; then
  log "building the release binary"
  (cd "$ROOT" && cargo build --release -q -p portcullis)
fi
[ -x "$PORTCULLIS" ] || die "$PORTCULLIS is missing"
mkdir -p "$OUT"
cd "$OUT"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_listen() { # port
  for _ in $(seq 1 100); do
    ss -Hltn "( sport = :$1 )" | grep -q . && return 0
    sleep 0.1
  done
  die "nothing listens on port $1"
}

# The gateway: generous limits (Autobahn sends 16 MiB messages), no pings
# (they would be extra frames in Autobahn's expectations), the query carrier.
gateway() { # upstream-url
  cat >portcullis.toml <<CONF
[listen]
public = "127.0.0.1:$GW_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
paths = ["/"]
drain_timeout_s = 1
[limits]
per_ip_rate = 100000.0
per_ip_burst = 100000
per_user_max_connections = 100
max_message_bytes = 67108864
max_outbound_bytes = 134217728
write_timeout_ms = 30000
[heartbeat]
ping_interval_ms = 3600000
pong_timeout_ms = 10000
[auth]
algorithms = ["HS256"]
hmac_secret = "autobahn-secret-0123456789abcdef-0123"
carriers = ["query"]
[revocation]
path = "revocations.log"
[upstream]
url = "$1"
[log]
level = "warn"
CONF
  "$PORTCULLIS" serve --config portcullis.toml >"gateway.log" 2>&1 &
  PIDS+=($!)
  wait_listen "$GW_PORT"
  TOKEN=$("$PORTCULLIS" token --config portcullis.toml --sub autobahn --ttl 1h)
}

backend() {
  cat >backend.py <<'PY'
import asyncio, sys, websockets
async def echo(ws):
    try:
        async for m in ws:
            await ws.send(m)
    except websockets.ConnectionClosed:
        pass
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1]), max_size=None,
                                compression="deflate", ping_interval=None):
        await asyncio.Future()
asyncio.run(main())
PY
  python3 backend.py "$BE_PORT" >backend.log 2>&1 &
  PIDS+=($!)
  wait_listen "$BE_PORT"
}

haproxy_up() {
  cat >haproxy.cfg <<CONF
global
    nbthread 1
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout tunnel 60s
frontend ws
    bind 127.0.0.1:$HAP_PORT
    default_backend be
backend be
    server be1 127.0.0.1:$BE_PORT
CONF
  haproxy -db -f haproxy.cfg >haproxy.log 2>&1 &
  PIDS+=($!)
  wait_listen "$HAP_PORT"
}

stop_all() {
  cleanup
  PIDS=()
  sleep 0.5
}

fuzz() { # mode url exclude-json
  local mode=$1 url=$2 exclude=$3
  mkdir -p "$mode"
  cat >"$mode/spec.json" <<JSON
{
  "outdir": "$OUT/$mode/reports",
  "servers": [{"agent": "$mode", "url": "$url"}],
  "cases": $CASES,
  "exclude-cases": $exclude,
  "exclude-agent-cases": {}
}
JSON
  log "$mode: wstest against ${url%%\?*}"
  local t0=$SECONDS
  (cd "$mode" && timeout "${WSTEST_TIMEOUT:-3600}" "$PY2" "$WSTEST" -m fuzzingclient -s spec.json >wstest.log 2>&1) ||
    log "warning: wstest exited with $? ($mode/wstest.log)"
  log "$mode: done in $((SECONDS - t0)) s"
}

for mode in $MODES; do
  case $mode in
    echo)
      gateway echo
      fuzz echo "ws://127.0.0.1:$GW_PORT/?access_token=$TOKEN" '[]'
      ;;
    backend)
      backend
      fuzz backend "ws://127.0.0.1:$BE_PORT/" '[]'
      ;;
    haproxy)
      backend
      haproxy_up
      fuzz haproxy "ws://127.0.0.1:$HAP_PORT/" '[]'
      ;;
    proxy)
      backend
      gateway "ws://127.0.0.1:$BE_PORT/"
      fuzz proxy "ws://127.0.0.1:$GW_PORT/?access_token=$TOKEN" '[]'
      ;;
    *) die "unknown mode $mode" ;;
  esac
  stop_all
done

status=0
python3 "$ROOT/scripts/autobahn/summarize.py" "$OUT" $MODES || status=$?
if [ "${SAVE:-0}" = 1 ]; then
  cp "$OUT"/summary-*.md "$ROOT/scripts/autobahn/"
  log "summaries copied to scripts/autobahn/"
fi
exit $status
