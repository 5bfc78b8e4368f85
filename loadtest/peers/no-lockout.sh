#!/usr/bin/env bash
# No lockout: do legitimate users get in while zombies attack, with the
# SHIPPED DEFAULT limits? Portcullis (portcullis-defaults.toml: only listen
# addresses, key and upstream set; proxy mode before loadtest's
# echo-backend) and HAProxy (haproxy.cfg, per-IP limits equal to
# Portcullis' defaults: 256 connections, 20 requests/s) before the same
# backend, in the same run, on this machine, loopback only.
#
# The attack, all at once for $DURATION (`mixed`):
#   slowloris  $SLOWLORIS sockets from 40 addresses (127.0.0.2-41), one byte
#              a second, reopened as soon as they are cut
#   zombies    2,000 idle authenticated connections that never answer pings,
#              from 40 addresses (127.0.0.102-141)
#   flood      forged-signature tokens at $FLOOD_RATE/s from 40 addresses
#              (127.0.0.42-81)
#   legit      200 handshakes/s (open loop) from 20 other addresses
#              (127.0.0.82-101: 10/s each, under the default per-IP rate of
#              20/s), each session echoing one message
# at 1× (4,000 slowloris sockets, 2× the default handshake slots; the
# attack as first measured) and 4× the default handshake slots (8,000).
#
# Reported per server and size: legit success ratio, legit handshake p50 /
# p99, handshake p99 per second over the whole run (worst and median
# second; nothing excluded), the server's peak RSS and CPU (from /proc).
#
#   loadtest/peers/no-lockout.sh                          both sizes, 40 s runs
#   SLOWLORIS_COUNTS=4000 DURATION=30s loadtest/peers/no-lockout.sh
#   SERVERS=pp SLOWLORIS_COUNTS=400 ZOMBIES=200 LEGIT_RATE=50 DURATION=15s \
#     loadtest/peers/no-lockout.sh                        a quick smoke run
#   STALLED=5000 SLOWLORIS_COUNTS= loadtest/peers/no-lockout.sh
#                                   RSS per stalled handshake only (see below)
#
# Output in $OUT (default target/no-lockout/<date>): table.md (the side-by-
# side table), commands.txt, json/, html/, logs/, machine.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/loadtest/peers
OUT=${OUT:-$ROOT/target/no-lockout/$(date +%Y%m%d-%H%M%S)}
SERVERS=${SERVERS:-"pp hap"}
SLOWLORIS_COUNTS=${SLOWLORIS_COUNTS-"4000 8000"}
ZOMBIES=${ZOMBIES:-2000}
LEGIT_RATE=${LEGIT_RATE:-200}
FLOOD_RATE=${FLOOD_RATE:-400}
DURATION=${DURATION:-40s}
WORKERS=${WORKERS:-1}
BUILD=${BUILD:-1}

PE_PORT=18080 ADMIN_PORT=19090 BE_PORT=18081 HAP_PORT=18082
SLOW_IPS=127.0.0.2-127.0.0.41
FLOOD_IPS=127.0.0.42-127.0.0.81
LEGIT_IPS=127.0.0.82-127.0.0.101
ZOMBIE_IPS=127.0.0.102-127.0.0.141

BIN=${BIN:-$ROOT/target/release}
PORTCULLIS=$BIN/portcullis
LT=$BIN/portcullis-loadtest
ECHO_BACKEND=$BIN/echo-backend

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

for tool in ss openssl jq timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is needed"
done
case " $SERVERS " in
  *" hap "*) command -v haproxy >/dev/null 2>&1 || die "haproxy is needed (apt-get install -y haproxy)" ;;
esac
if [ "$BUILD" = 1 ]; then
  log "building release binaries"
  (cd "$ROOT" && cargo build --release -p portcullis --bin portcullis -p portcullis-loadtest --bins)
fi
for b in "$PORTCULLIS" "$LT" "$ECHO_BACKEND"; do
  [ -x "$b" ] || die "$b is missing (build with BUILD=1)"
done

mkdir -p "$OUT"/{keys,json,logs,html}
cd "$OUT"
: >commands.txt
openssl rand -hex 32 >keys/hs256.secret
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -sr)"
  echo "open files per process: $(ulimit -Hn)"
  command -v haproxy >/dev/null 2>&1 && echo "haproxy: $(haproxy -v | head -1)"
  echo "portcullis: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >machine.txt

STARTED=()
cleanup() {
  local p
  for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

port_busy() { ss -Hltn "( sport = :$1 )" | grep -q .; }
wait_listen() {
  for _ in $(seq 1 100); do
    port_busy "$1" && return 0
    sleep 0.1
  done
  die "nothing listens on port $1 after 10 s (see $OUT/logs)"
}
LAST_PID=
start_bg() { # name cmd...
  local name=$1
  shift
  "$@" >"logs/$name.out" 2>"logs/$name.err" &
  LAST_PID=$!
  STARTED+=("$LAST_PID")
}
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

SERVER_PID= BACKEND_PID= PORT=
start_server() { # pp | hap
  for p in $PE_PORT $ADMIN_PORT $BE_PORT $HAP_PORT; do
    port_busy "$p" && die "port $p is already in use"
  done
  start_bg "$RUN.backend" "$ECHO_BACKEND" "127.0.0.1:$BE_PORT"
  BACKEND_PID=$LAST_PID
  wait_listen "$BE_PORT"
  case $1 in
    pp)
      rm -f portcullis-revocations.log
      start_bg "$RUN.server" "$PORTCULLIS" serve --config "$PEERS/portcullis-defaults.toml"
      PORT=$PE_PORT
      ;;
    hap)
      # Per-IP limits as Portcullis' defaults; maxconn as high as 20,000
      # descriptors allow (HAProxy needs two per proxied connection plus 25).
      HAP_BIND=127.0.0.1:$HAP_PORT HAP_BACKEND=127.0.0.1:$BE_PORT HAP_MAXCONN=9950 \
        HAP_PER_IP_MAX_CONN=256 HAP_PER_IP_RATE=20 HAP_TUNNEL_TIMEOUT=120s \
        HAP_HS256_SECRET="$(cat keys/hs256.secret)" HAP_ES256_PUBKEY="$OUT/keys/unused.pub.pem" \
        HAP_REVOKED_MAP="$OUT/revoked-jti.map" HAP_STATS_SOCKET="$OUT/haproxy.sock" \
        start_bg "$RUN.server" haproxy -db -f "$PEERS/haproxy.cfg"
      PORT=$HAP_PORT
      ;;
    *) die "unknown server $1" ;;
  esac
  SERVER_PID=$LAST_PID
  wait_listen "$PORT"
  sleep 0.5
  kill -0 "$SERVER_PID" 2>/dev/null || die "$1 exited at start (logs/$RUN.server.err)"
}
stop_servers() {
  stop_pid "$SERVER_PID"
  stop_pid "$BACKEND_PID"
  SERVER_PID= BACKEND_PID=
  sleep 1
}

: >revoked-jti.map
# HAProxy's config names an ES256 public key; this attack uses HS256 only,
# so any valid key will do.
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl ec -pubout -out keys/unused.pub.pem 2>/dev/null

jqv() { jq -r "$2 // empty" "json/$1.json" 2>/dev/null || true; }

ROWS=()
for n in $SLOWLORIS_COUNTS; do
  for s in $SERVERS; do
    RUN="$s-slow$n"
    log "$RUN: $n slowloris (reopened), $ZOMBIES zombies, flood $FLOOD_RATE/s, legit $LEGIT_RATE/s, $DURATION"
    start_server "$s"
    cmd=("$LT" mixed --url "ws://127.0.0.1:$PORT/" --secret-file keys/hs256.secret
      --duration "$DURATION" --workers "$WORKERS" --gateway-pid "$SERVER_PID"
      --legit-rate "$LEGIT_RATE" --legit 4000 --messages 1 --source-ips "$LEGIT_IPS"
      --slowloris "$n" --slowloris-reopen --slowloris-source-ips "$SLOW_IPS"
      --zombies "$ZOMBIES" --zombie-source-ips "$ZOMBIE_IPS"
      --flood-rate "$FLOOD_RATE" --flood-kinds bad-hs256 --flood-source-ips "$FLOOD_IPS"
      --attack-rate 400 --quiet --json "json/$RUN.json" --html "html/$RUN.html")
    printf '%s\t%s\n' "$RUN" "${cmd[*]}" | sed "s|$ROOT/||g; s|$OUT/||g" >>commands.txt
    timeout --kill-after=10 900 "${cmd[@]}" >"logs/$RUN.txt" 2>"logs/$RUN.err" ||
      log "warning: load run $RUN exited with $? (logs/$RUN.err)"
    stop_servers
    name=$([ "$s" = pp ] && echo "Portcullis, defaults" || echo "HAProxy")
    ROWS+=("| $name | $n | $(jqv "$RUN" '.groups.legit.success_ratio * 100 | . * 100 | round / 100') % \
| $(jqv "$RUN" '.groups.legit.counters.sessions') \
| $(jqv "$RUN" '.groups.legit.handshake_ms.p50') | $(jqv "$RUN" '.groups.legit.handshake_ms.p99') \
| $(jqv "$RUN" '.groups.legit.hs_p99_per_second.worst_ms') | $(jqv "$RUN" '.groups.legit.hs_p99_per_second.median_ms') \
| $(jqv "$RUN" '.groups.slowloris.peak_open') \
| $(jqv "$RUN" '.gateway.peak_rss_bytes / 1048576 | . * 10 | round / 10') \
| $(jqv "$RUN" '.gateway.cpu_s * 100 | round / 100') ($(jqv "$RUN" '.gateway.mean_cpu_cores * 100 | round / 100')) |")
  done
done

# Optional: RSS per stalled handshake (STALLED=5000): that many partial
# heads from 40 addresses, opened at STALLED_RATE/s, held (reopened when
# cut), the server's RSS read from /proc after a 1 s settle.
STALLED_ROWS=()
if [ -n "${STALLED:-}" ]; then
  for s in $SERVERS; do
    RUN="$s-stalled$STALLED"
    log "$RUN: $STALLED partial heads"
    start_server "$s"
    cmd=("$LT" capacity --mode stalled --url "ws://127.0.0.1:$PORT/" --gateway-pid "$SERVER_PID"
      --count "$STALLED" --step "$STALLED" --rate "${STALLED_RATE:-2000}" --settle 1s --hold 1s
      --source-ips "$SLOW_IPS" --duration 120s --quiet --json "json/$RUN.json")
    printf '%s\t%s\n' "$RUN" "${cmd[*]}" | sed "s|$ROOT/||g; s|$OUT/||g" >>commands.txt
    timeout --kill-after=10 300 "${cmd[@]}" >"logs/$RUN.txt" 2>"logs/$RUN.err" ||
      log "warning: load run $RUN exited with $? (logs/$RUN.err)"
    stop_servers
    name=$([ "$s" = pp ] && echo "Portcullis, defaults" || echo "HAProxy")
    STALLED_ROWS+=("| $name | $(jqv "$RUN" '.capacity.steps[-1].open') \
| $(jqv "$RUN" '.capacity.figures[] | select(.name == "RSS per connection") | .value | round') |")
  done
fi

{
  echo "| server | slowloris | legit success | legit sessions | hs p50 ms | hs p99 ms | p99/s worst ms | p99/s median ms | slowloris peak open | peak RSS MiB | CPU s (mean cores) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf '%s\n' "${ROWS[@]}"
  if [ ${#STALLED_ROWS[@]} -gt 0 ]; then
    echo
    echo "| server | partial heads held | RSS per stalled handshake, B |"
    echo "|---|---:|---:|"
    printf '%s\n' "${STALLED_ROWS[@]}"
  fi
} >table.md
cat table.md
log "results in $OUT"
