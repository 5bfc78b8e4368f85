#!/usr/bin/env bash
# System calls per relayed 1 KiB message, and messages per server CPU-second,
# for three relays in front of the same echo backend:
#
#   portcullis  the gateway ($BIN) in proxy mode (loadtest/peers/portcullis-proxy.toml)
#   haproxy     HAProxy 2.6 with loadtest/peers/haproxy.cfg (as compare.sh)
#   tunnel      loadtest/src/bin/tcp-tunnel.rs: tokio's copy_bidirectional,
#               nothing parsed or checked; the floor of any relay
#
# Each run: the echo backend and the server on core $SERVER_CPU, the load
# tester's `echo` scenario (CONCURRENCY connections, each echoing SIZE-byte
# messages back to back for DURATION) on core $LOAD_CPU, and `perf stat`
# counting the server's system calls (tracepoints: exact counts, little
# overhead) over the whole load run. Per message = count / messages the load
# tester got back; a message is relayed twice (client to backend and back),
# so the floor is two reads and two writes. Servers alternate, ROUNDS times.
#
#   scripts/relay-syscalls.sh                     build, then 2 rounds
#   BUILD=0 ROUNDS=5 DURATION=8s scripts/relay-syscalls.sh
#
# Environment: BUILD (1), ROUNDS (2), DURATION (10s), SIZE (1KiB),
# CONCURRENCY (50), SERVERS (portcullis haproxy tunnel), BIN (gateway binary),
# OUT (raw files; default a mktemp dir), SERVER_CPU (1), LOAD_CPU (0).
# Ports 38080-38084, apart from compare.sh's. Needs perf (Debian: linux-perf),
# haproxy, taskset, ss, openssl, jq. Stops everything it started on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-1}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
SIZE=${SIZE:-1KiB}
CONCURRENCY=${CONCURRENCY:-50}
SERVERS=${SERVERS:-portcullis haproxy tunnel}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
RELEASE=${CARGO_TARGET_DIR:-$ROOT/target}/release
BIN=${BIN:-$RELEASE/portcullis}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/relay-syscalls.XXXXXX")}
GW_PORT=38080 ADMIN_PORT=38090 BE_PORT=38081 HAP_PORT=38082 TUN_PORT=38084

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
for tool in perf haproxy taskset ss openssl jq; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is needed"
done
if [ "$BUILD" = 1 ]; then
  (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-loadtest)
fi
for b in "$BIN" "$RELEASE/portcullis-loadtest" "$RELEASE/echo-backend" "$RELEASE/tcp-tunnel"; do
  [ -x "$b" ] || die "$b is missing (BUILD=1 builds it)"
done

mkdir -p "$OUT"
cd "$OUT"
openssl rand -hex 32 >hs256.secret
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out es256.pem
openssl pkey -in es256.pem -pubout -out es256.pub.pem 2>/dev/null
: >revoked-jti.map
sed -e "s|^public = .*|public = \"127.0.0.1:$GW_PORT\"|" \
  -e "s|^admin = .*|admin = \"127.0.0.1:$ADMIN_PORT\"|" \
  -e "s|^url = .*|url = \"ws://127.0.0.1:$BE_PORT/\"|" \
  -e "s|keys/||" "$ROOT/loadtest/peers/portcullis-proxy.toml" >portcullis.toml

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_listen() {
  for _ in $(seq 1 100); do
    ss -Hltn "( sport = :$1 )" | grep -q . && return 0
    sleep 0.1
  done
  die "nothing listens on port $1"
}
start_bg() { # name cmd...
  local name=$1
  shift
  taskset -c "$SERVER_CPU" "$@" >"$name.log" 2>&1 &
  PIDS+=($!)
}

EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_write,context-switches
printf 'server\tround\tmessages\tserver_cpu_s\tsyscalls\trecvfrom\tsendto\tepoll_wait\twrite\tcontext_switches\n' >runs.tsv
one_run() { # server round
  local s=$1 r=$2 port pid be
  start_bg "backend-$s-$r" "$RELEASE/echo-backend" "127.0.0.1:$BE_PORT"
  be=$!
  wait_listen $BE_PORT
  case $s in
    portcullis)
      start_bg "$s-$r" "$BIN" serve --config portcullis.toml
      port=$GW_PORT
      ;;
    haproxy)
      HAP_BIND=127.0.0.1:$HAP_PORT HAP_BACKEND=127.0.0.1:$BE_PORT HAP_MAXCONN=9950 HAP_PER_IP_MAX_CONN=1000 \
        HAP_PER_IP_RATE=100000 HAP_TUNNEL_TIMEOUT=120s HAP_HS256_SECRET="$(cat hs256.secret)" \
        HAP_ES256_PUBKEY="$OUT/es256.pub.pem" HAP_REVOKED_MAP="$OUT/revoked-jti.map" \
        HAP_STATS_SOCKET="$OUT/haproxy.sock" start_bg "$s-$r" haproxy -db -f "$ROOT/loadtest/peers/haproxy.cfg"
      port=$HAP_PORT
      ;;
    tunnel)
      start_bg "$s-$r" "$RELEASE/tcp-tunnel" "127.0.0.1:$TUN_PORT" "127.0.0.1:$BE_PORT"
      port=$TUN_PORT
      ;;
    *) die "unknown server $s" ;;
  esac
  pid=$!
  wait_listen $port
  sleep 0.5
  local t0 t1
  t0=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  perf stat -x, -e "$EVENTS" -p "$pid" -o "perf-$s-$r.csv" &
  local perf_pid=$!
  timeout --kill-after=10 300 taskset -c "$LOAD_CPU" "$RELEASE/portcullis-loadtest" echo \
    --url "ws://127.0.0.1:$port/" --secret-file hs256.secret --concurrency "$CONCURRENCY" --size "$SIZE" \
    --duration "$DURATION" --source-ips 127.0.0.2-127.0.0.41 --quiet --json "lt-$s-$r.json" >/dev/null 2>&1 ||
    log "warning: load run $s-$r exited with $?"
  kill -INT "$perf_pid" 2>/dev/null || true
  wait "$perf_pid" 2>/dev/null || true
  t1=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  kill "$pid" "$be" 2>/dev/null || true
  wait "$pid" "$be" 2>/dev/null || true
  local msgs ev
  msgs=$(jq -r '.groups[.group_order[0]].counters.messages_received // 0' "lt-$s-$r.json")
  ev() { awk -F, -v e="$1" '$3 == e { print $1 }' "perf-$s-$r.csv"; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$s" "$r" "$msgs" \
    "$(awk -v a="$t0" -v b="$t1" -v t="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", (b - a) / t }')" \
    "$(ev raw_syscalls:sys_enter)" "$(ev syscalls:sys_enter_recvfrom)" "$(ev syscalls:sys_enter_sendto)" \
    "$(ev syscalls:sys_enter_epoll_wait)" "$(ev syscalls:sys_enter_write)" "$(ev context-switches)" >>runs.tsv
  sleep 1
}

for r in $(seq 1 "$ROUNDS"); do
  order=$SERVERS
  [ $((r % 2)) = 0 ] && order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' ')
  for s in $order; do
    log "round $r: $s"
    one_run "$s" "$r"
  done
done

# Per message, summed over rounds; messages per CPU-second, mean of rounds.
{
  echo "| server | messages | system calls per message | recvfrom | sendto | epoll_wait | write | context switches | messages per server-CPU-s (rounds) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for s in $SERVERS; do
    awk -F'\t' -v s="$s" '$1 == s {
        m += $3; c += $4; sc += $5; rf += $6; st += $7; ew += $8; w += $9; cs += $10
        per = per (per == "" ? "" : " / ") sprintf("%.0f", ($4 > 0 ? $3 / $4 : 0)); sum += ($4 > 0 ? $3 / $4 : 0); n++ }
      END { if (m == 0) exit
        printf "| %s | %d | %.2f | %.2f | %.2f | %.3f | %.3f | %.3f | %.0f (%s) |\n",
          s, m, sc / m, rf / m, st / m, ew / m, w / m, cs / m, sum / n, per }' runs.tsv
  done
} | tee summary.md
log "raw files in $OUT"
