#!/usr/bin/env bash
# System calls per refusal ("A refusal at the kernel's minimum"):
# how many syscalls a server makes to refuse one upgrade request that comes
# on a NEW TCP connection, counted by `strace -c -f` attached to the server
# process (every thread), for three servers:
#
#   portcullis  the gateway ($BIN), built-in echo upstream
#   haproxy     HAProxy 2.6 with loadtest/peers/haproxy.cfg (as compare.sh)
#   fixed-401   loadtest/src/bin/fixed-401.rs, a naive tokio server answering a
#               fixed 401 to everything: the floor (one row, `missing`)
#
# and four kinds of refusal:
#
#   missing       no token                               401
#   forged-HS256  HS256 token signed with a wrong secret  401 (a signature check)
#   banned        forged HS256 tokens from addresses that are banned: the
#                 gateway bans the load's addresses (POST /admin/bans
#                 127.0.0.0/24) and closes each socket at accept, nothing
#                 read; HAProxy gets its cheapest equivalent, a
#                 `tcp-request connection reject` on the same source range.
#                 Counted as refusals: sockets closed or reset unanswered.
#   rate-limited  no token, per-IP rate 1/s               429 (portcullis:
#                 per_ip_rate = 1.0, per_ip_burst = 1; HAProxy: HAP_PER_IP_RATE=1)
#                 The gateway lets 1/s per address through (401); HAProxy's
#                 http_req_rate counts refused requests too, so a steady flood
#                 gets only 429s there.
#
# Client: the project's load tester (`portcullis-loadtest handshake`, one new
# TCP connection per attempt), N attempts, CONCURRENCY in flight, from 40
# loopback source addresses (127.0.0.2-127.0.0.41), as compare.sh's
# refusal_run. Servers run on core $SERVER_CPU, the load tester on core
# $LOAD_CPU (taskset), so the gateway's tokio runtime runs one worker and
# HAProxy one thread (nbthread 1), as in BENCHMARKS.md.
#
# Gateway config: the shipped defaults (no [limits] key set but these), at
# log level warn (no per-connection logging, as compare.sh), except the keys
# that would otherwise throttle the load generator itself, which comes from
# only 40 addresses: per_ip_rate = 100000, per_ip_burst = 100000,
# per_ip_max_connections = 1000, per_ip_max_handshakes = 100000,
# max_handshakes = 8192 (the values of compare.sh's portcullis-echo.toml and
# for the same reason). The rate-limited row sets per_ip_rate = 1.0 and
# per_ip_burst = 1 on top of that. HAProxy gets compare.sh's HAP_* values;
# its backend address has nothing listening (no request is ever forwarded).
#
# Method, per run: start the server, wait for its port, warm it up with
# WARMUP attempts of the same kind (lazy one-time work: thread spawns, caches,
# allocator arenas), attach `strace -f -c -p PID`, wait until every thread is
# traced, run the N attempts, detach strace (SIGINT; it writes its summary),
# stop the server. Start-up and shutdown are not counted. Syscalls per refusal
# = every syscall counted in the window / refusals actually answered (HTTP 4xx
# counted by the load tester, by status; in the rate-limited rows the 429s
# plus the few 401s of requests the limiter let through, 1/s per address).
# Background work (timers, sweepers) runs in that window too: IDLE_S seconds
# of strace on each idle server (after its first warm-up, no load) give its
# rate, and the "background" column estimates its share per refusal (idle
# calls/s x window / refusals). strace slows every server a lot: the counts
# matter, not the rate. The whole-number parts (accept4, recvfrom, sendto,
# close, epoll_ctl, ...) are per connection; the fractions (epoll_wait,
# accept4 returning EAGAIN, tokio's eventfd writes, HAProxy's clock_gettime)
# are per event-loop turn, so they shrink as each turn finds more connections
# ready: compare runs at the same CONCURRENCY.
#
#   scripts/refusal-syscalls.sh                    build, then every run
#   BUILD=0 N=5000 scripts/refusal-syscalls.sh     no build, shorter
#   BUILD=0 BIN=/path/to/other/portcullis scripts/refusal-syscalls.sh
#                                                  another build of the gateway
#
# Environment: BUILD (1: cargo build --release -p portcullis -p
# portcullis-loadtest first; 0: use what is there), N (attempts per run,
# 20000), CONCURRENCY (16), WARMUP (200), IDLE_S (5; 0 = skip), BIN (gateway
# binary, default $CARGO_TARGET_DIR or target/ + release/portcullis), LT and
# FIXED_401 (load tester and floor, same directory by default), OUT (raw
# files: strace summaries, load-tester JSON, logs, configs; default a mktemp
# dir), SERVER_CPU (1), LOAD_CPU (0), RUN_TIMEOUT_S (bound on each load run,
# 300), SERVERS and KINDS (subsets of the lists above, e.g.
# SERVERS=portcullis), ports PE_PORT ADMIN_PORT HAP_PORT FLOOR_PORT (28080
# 29090 28082 28083, apart from compare.sh's so both can run on one machine).
#
# Besides the system calls, each run measures the server's CPU per refusal
# without strace: a second run of N attempts, the server's utime + stime
# from /proc/PID/stat before and after (clock ticks), gives refusals per
# server CPU-second (the "per CPU-s" column; ratios between servers of one
# run are what to read, the machine is shared).
#
# Output: a markdown table on stdout (also OUT/summary.md); progress on stderr.
# Needs strace and haproxy (installed with apt-get when missing and root),
# taskset, ss, openssl, jq, awk, timeout. Stops everything it started on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-1}
N=${N:-20000}
CONCURRENCY=${CONCURRENCY:-16}
WARMUP=${WARMUP:-200}
IDLE_S=${IDLE_S:-5}
RELEASE=${CARGO_TARGET_DIR:-$ROOT/target}/release
BIN=${BIN:-$RELEASE/portcullis}
LT=${LT:-$RELEASE/portcullis-loadtest}
FIXED_401=${FIXED_401:-$RELEASE/fixed-401}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-300}
PE_PORT=${PE_PORT:-28080}
ADMIN_PORT=${ADMIN_PORT:-29090}
HAP_PORT=${HAP_PORT:-28082}
FLOOR_PORT=${FLOOR_PORT:-28083}
HAP_BACKEND_PORT=${HAP_BACKEND_PORT:-28081} # nothing listens: never used
SOURCE_IPS=127.0.0.2-127.0.0.41
SERVERS=${SERVERS:-portcullis haproxy fixed-401}
KINDS=${KINDS:-missing forged-HS256 rate-limited banned}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/refusal-syscalls.XXXXXX")}

T_START=$(date +%s)
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

for v in N CONCURRENCY WARMUP IDLE_S RUN_TIMEOUT_S; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
[ "$N" -gt 0 ] || die "N must be at least 1"
[ "$CONCURRENCY" -gt 0 ] || die "CONCURRENCY must be at least 1"

# ---------------------------------------------------------------- tools

# strace and haproxy from Debian's packages when missing (root only; their
# services are never started), as scripts/test.sh does for redis-server.
WANT_HAP=0
[[ " $SERVERS " == *" haproxy "* ]] && WANT_HAP=1
need_apt=()
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
[ $WANT_HAP = 0 ] || command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "${need_apt[*]} missing: install ${need_apt[*]} (Debian: apt-get install ${need_apt[*]}), or run as root to let this script do it"
  fi
  log "installing ${need_apt[*]} from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  had_policy=0
  if [ -e /usr/sbin/policy-rc.d ]; then
    had_policy=1
    cp /usr/sbin/policy-rc.d /tmp/policy-rc.d.bak
  fi
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ $had_policy = 1 ]; then mv /tmp/policy-rc.d.bak /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
fi
for tool in strace taskset ss openssl jq awk timeout curl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is needed and missing"
done
if [ $WANT_HAP = 1 ]; then
  command -v haproxy >/dev/null 2>&1 || die "haproxy is needed and missing"
  haproxy -v | head -1 | grep -q 'version 2\.6\.' ||
    log "warning: $(haproxy -v | head -1) (the comparison is against 2.6)"
fi
[ "$(nproc)" -gt "$((SERVER_CPU > LOAD_CPU ? SERVER_CPU : LOAD_CPU))" ] ||
  die "SERVER_CPU=$SERVER_CPU / LOAD_CPU=$LOAD_CPU: this machine has $(nproc) cores"

if [ "$BUILD" = 1 ]; then
  log "building release binaries (BUILD=0 skips)"
  (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-loadtest)
fi
for b in "$BIN" "$LT" "$FIXED_401"; do
  [ -x "$b" ] || die "$b is missing (build with: cargo build --release -p portcullis -p portcullis-loadtest, or drop BUILD=0)"
done
# Absolute paths: the runs work from $OUT.
abs() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
BIN=$(abs "$BIN")
LT=$(abs "$LT")
FIXED_401=$(abs "$FIXED_401")

mkdir -p "$OUT"/{keys,json,logs,conf,strace}
OUT=$(cd "$OUT" && pwd)
cd "$OUT"
log "raw files in $OUT"
: >commands.txt

# Keys of this run, as compare.sh: an HS256 secret (hex: HAProxy's config
# takes it as a plain word) and an ES256 key pair (HAProxy's config loads the
# public key; no ES256 token is sent here).
openssl rand -hex 32 >keys/hs256.secret
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null |
  openssl pkcs8 -topk8 -nocrypt -out keys/es256.pem
openssl pkey -in keys/es256.pem -pubout -out keys/es256.pub.pem 2>/dev/null
printf 'revoked-example-jti 1\n' >revoked-jti.map

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "kernel: $(uname -sr), nproc: $(nproc)"
  echo "strace: $(strace -V | head -1)"
  [ $WANT_HAP = 0 ] || echo "haproxy: $(haproxy -v | head -1)"
  echo "gateway binary: $BIN (this tree: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "attempts per run: $N, concurrency: $CONCURRENCY, warm-up: $WARMUP, idle window: ${IDLE_S}s"
  echo "server core: $SERVER_CPU, load generator core: $LOAD_CPU, sources: $SOURCE_IPS"
} >machine.txt

# ---------------------------------------------------------------- processes

STARTED=() # processes this script started and has not yet seen end
STRACE_PID=
forget() { # pid
  local p keep=()
  for p in "${STARTED[@]}"; do
    [ "$p" = "$1" ] || keep+=("$p")
  done
  STARTED=("${keep[@]}")
}
cleanup() {
  local p
  # strace first, so that it detaches (and writes) before its tracee goes.
  [ -n "$STRACE_PID" ] && kill -INT "$STRACE_PID" 2>/dev/null
  for p in "${STARTED[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  sleep 0.5
  for p in "${STARTED[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { ss -Hltn "( sport = :$1 )" | grep -q .; }

wait_listen() { # port name
  for _ in $(seq 1 100); do
    port_busy "$1" && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || die "$2 exited at start (see $OUT/logs/$RUN.server.err)"
    sleep 0.1
  done
  die "nothing listens on port $1 after 10 s ($2; see $OUT/logs/$RUN.server.err)"
}

stop_pid() { # pid
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

# Portcullis's config: shipped defaults but the keys named in the header.
gateway_conf() { # dst rate burst
  cat >"$1" <<EOF
# refusal-syscalls.sh: the shipped defaults, but the per-address keys that
# would throttle the load generator (40 source addresses) and the log level.
[listen]
public = "127.0.0.1:$PE_PORT"
admin = "127.0.0.1:$ADMIN_PORT"

[limits]
max_handshakes = 8192
per_ip_max_connections = 1000
per_ip_max_handshakes = 100000
per_ip_rate = $2
per_ip_burst = $3

[auth]
hmac_secret_file = "keys/hs256.secret"

# Each refusal is measured as such: automatic bans would turn the forged
# tokens' rows into banned attempts after 20 (their own row below).
[ban]
enabled = false

[revocation]
path = "portcullis-revocations.log"

[log]
level = "warn"
EOF
}

# HAProxy's cheapest refusal, for the banned row: the source range rejected
# at connection time, before any read.
haproxy_ban_conf() { # dst
  cat >"$1" <<EOF
global
    nbthread 1
    maxconn 9950
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend ws
    bind 127.0.0.1:$HAP_PORT
    tcp-request connection reject if { src 127.0.0.0/24 }
    default_backend nothing
backend nothing
    server none 127.0.0.1:$HAP_BACKEND_PORT
EOF
}

SERVER_PID=
PORT=
RUN=
BANNED=0
start_server() { # server rate-limited(0|1)
  local s=$1 limited=$2 p
  for p in "$PE_PORT" "$ADMIN_PORT" "$HAP_PORT" "$FLOOR_PORT"; do
    port_busy "$p" && die "port $p is already in use (set PE_PORT / ADMIN_PORT / HAP_PORT / FLOOR_PORT)"
  done
  case $s in
    portcullis)
      if [ "$limited" = 1 ]; then gateway_conf "conf/$RUN.toml" 1.0 1; else gateway_conf "conf/$RUN.toml" 100000.0 100000; fi
      rm -f portcullis-revocations.log
      taskset -c "$SERVER_CPU" "$BIN" serve --config "conf/$RUN.toml" >"logs/$RUN.server.out" 2>"logs/$RUN.server.err" &
      PORT=$PE_PORT
      ;;
    haproxy)
      if [ "$BANNED" = 1 ]; then
        haproxy_ban_conf "conf/$RUN.cfg"
        taskset -c "$SERVER_CPU" haproxy -db -f "conf/$RUN.cfg" >"logs/$RUN.server.out" 2>"logs/$RUN.server.err" &
        PORT=$HAP_PORT
      else
      local rate=100000
      [ "$limited" = 1 ] && rate=1
      HAP_BIND=127.0.0.1:$HAP_PORT HAP_BACKEND=127.0.0.1:$HAP_BACKEND_PORT HAP_MAXCONN=9950 \
        HAP_PER_IP_MAX_CONN=1000 HAP_PER_IP_RATE=$rate HAP_TUNNEL_TIMEOUT=120s \
        HAP_HS256_SECRET="$(cat keys/hs256.secret)" HAP_ES256_PUBKEY="$OUT/keys/es256.pub.pem" \
        HAP_REVOKED_MAP="$OUT/revoked-jti.map" HAP_STATS_SOCKET="$OUT/haproxy.sock" \
        taskset -c "$SERVER_CPU" haproxy -db -f "$ROOT/loadtest/peers/haproxy.cfg" \
        >"logs/$RUN.server.out" 2>"logs/$RUN.server.err" &
      PORT=$HAP_PORT
      fi
      ;;
    fixed-401)
      taskset -c "$SERVER_CPU" "$FIXED_401" "127.0.0.1:$FLOOR_PORT" >"logs/$RUN.server.out" 2>"logs/$RUN.server.err" &
      PORT=$FLOOR_PORT
      ;;
    *) die "unknown server $s" ;;
  esac
  SERVER_PID=$!
  STARTED+=("$SERVER_PID")
  wait_listen "$PORT" "$s"
  sleep 0.3
  kill -0 "$SERVER_PID" 2>/dev/null || die "$s exited at start (see $OUT/logs/$RUN.server.err)"
  if [ "$s" = portcullis ] && [ "$BANNED" = 1 ]; then
    curl -fsS -XPOST "http://127.0.0.1:$ADMIN_PORT/admin/bans" \
      -d '{"key": "127.0.0.0/24", "duration_s": 86400}' >"logs/$RUN.ban.json" ||
      die "$RUN: POST /admin/bans failed"
  fi
}

# Server CPU so far, in clock ticks (utime + stime, every thread).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$SERVER_PID/stat"; }

# refusals JSON KIND: refusals the load tester counted: 4xx answers, and in
# the banned row the sockets closed or reset without one.
refusals() {
  jq -r --arg k "$2" --argjson banned "$BANNED" '[.groups[$k].status // {} | to_entries[]
    | select((.key | test("^4[0-9][0-9]$")) or ($banned == 1 and (.key == "closed" or .key == "reset")))
    | .value] | add // 0' "$1"
}

stop_server() {
  stop_pid "$SERVER_PID"
  SERVER_PID=
  sleep 0.5 # let the kernel finish closing before the next run binds
}

# Every thread of PID traced (TracerPid set)?
all_traced() { # pid
  local f t
  for f in /proc/"$1"/task/*/status; do
    t=$(awk '/^TracerPid:/ { print $2 }' "$f" 2>/dev/null || echo 0)
    [ "${t:-0}" != 0 ] || return 1
  done
  return 0
}

# strace_on FILE: attach to the server, every thread; returns once all are traced.
strace_on() {
  strace -f -c -o "$1" -p "$SERVER_PID" 2>"$1.err" &
  STRACE_PID=$!
  STARTED+=("$STRACE_PID")
  for _ in $(seq 1 100); do
    all_traced "$SERVER_PID" && return 0
    kill -0 "$STRACE_PID" 2>/dev/null || die "strace could not attach to $SERVER_PID ($1.err: $(head -c 300 "$1.err"))"
    sleep 0.1
  done
  die "strace did not attach to every thread of $SERVER_PID in 10 s"
}

# strace_off FILE: detach (strace writes its summary on SIGINT).
strace_off() {
  local pid=$STRACE_PID
  STRACE_PID=
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && die "strace ($pid) did not detach in 10 s"
  wait "$pid" 2>/dev/null || true
  forget "$pid"
  # No syscall at all in the window leaves the summary empty (an idle floor).
  if ! grep -q ' total$' "$1" && ! { [ ! -s "$1" ] && grep -q 'detached' "$1.err"; }; then
    die "no strace summary in $1 ($1.err: $(head -c 300 "$1.err"))"
  fi
}

# Prints its arguments as one shell command line, quoting only what needs it.
shell_words() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

# lt NAME KIND COUNT: the load tester on its core, bounded by --duration and
# by `timeout` beyond it; JSON to json/NAME.json.
lt() {
  local name=$1 kind=$2 count=$3
  local cmd=(taskset -c "$LOAD_CPU" "$LT" handshake --url "ws://127.0.0.1:$PORT/"
    --secret-file keys/hs256.secret --kinds "$kind" --count "$count" --concurrency "$CONCURRENCY"
    --duration "${RUN_TIMEOUT_S}s" --source-ips "$SOURCE_IPS" --quiet --json "json/$name.json")
  printf '%s\t%s\n' "$name" "$(shell_words "${cmd[@]}" | sed "s|$OUT/||g")" >>commands.txt
  # In the background and waited for: a signal to this script is then acted
  # on at once (bash runs traps only between foreground commands).
  timeout --kill-after=10 "$((RUN_TIMEOUT_S + 30))" "${cmd[@]}" >"logs/$name.txt" 2>"logs/$name.err" &
  local pid=$! rc=0
  STARTED+=("$pid")
  wait "$pid" || rc=$?
  forget "$pid"
  [ $rc = 0 ] || log "warning: load run $name exited with $rc (logs/$name.err)"
}

# calls FILE: "name calls errors" per syscall of a strace -c summary (rows:
# % time, seconds, usecs/call, calls, [errors], syscall; the total row left out).
calls() {
  awk '$1 ~ /^[0-9.]+$/ && $NF != "total" && NF >= 5 { print $NF, $4, (NF >= 6 ? $5 : 0) }' "$1"
}
total_calls() { calls "$1" | awk '{ s += $2 } END { print s + 0 }'; }

# breakdown FILE REFUSALS: "accept4 1.00, recvfrom 1.00 (0.50 err), ..."
# per refusal, largest first, calls under 0.01 per refusal left out.
breakdown() {
  calls "$1" | sort -k2,2nr -k1,1 | awk -v r="$2" '
    { c = $2 / r; e = $3 / r
      if (c < 0.005) next
      s = sprintf("%s %.2f", $1, c)
      if (e >= 0.005) s = s sprintf(" (%.2f err)", e)
      out = out (out == "" ? "" : ", ") s }
    END { print (out == "" ? "-" : out) }'
}

fmt_int() { printf "%'d" "$1" 2>/dev/null || printf '%d' "$1"; }

# ---------------------------------------------------------------- runs

declare -A IDLE_RATE=() # server -> syscalls per second, idle
ROWS=()
IDLE_ROWS=()

idle_window() { # server
  local s=$1 f="strace/idle-$1.txt" t0 t1 n secs
  t0=$(date +%s.%N)
  strace_on "$f"
  sleep "$IDLE_S"
  strace_off "$f"
  t1=$(date +%s.%N)
  n=$(total_calls "$f")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  IDLE_RATE[$s]=$(awk -v n="$n" -v t="$secs" 'BEGIN { printf "%.2f", n / t }')
  IDLE_ROWS+=("| $s | $secs | $n | ${IDLE_RATE[$s]} | $(breakdown "$f" "$secs") |")
  log "$s idle: $n syscalls in $secs s"
}

run() { # server label kind limited
  local s=$1 label=$2 kind=$3 limited=$4
  RUN="$s-$label"
  log "$RUN: warm-up $WARMUP, then $N attempts under strace"
  start_server "$s" "$limited"
  if [ "$WARMUP" -gt 0 ]; then lt "warmup-$RUN" "$kind" "$WARMUP"; fi
  if [ "$IDLE_S" -gt 0 ] && [ "$label" = missing ] && [ -z "${IDLE_RATE[$s]:-}" ]; then
    idle_window "$s"
  fi
  # CPU per refusal, untraced.
  local c0 c1 cpu_refused per_cpu
  c0=$(cpu_ticks)
  lt "cpu-$RUN" "$kind" "$N"
  c1=$(cpu_ticks)
  cpu_refused=$(refusals "json/cpu-$RUN.json" "$kind")
  per_cpu=$(awk -v n="$cpu_refused" -v t="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (t > 0) printf "%d", n / (t / hz); else print 0 }')
  local f="strace/$RUN.txt" t0 t1
  t0=$(date +%s.%N)
  strace_on "$f"
  lt "$RUN" "$kind" "$N"
  strace_off "$f"
  t1=$(date +%s.%N)
  stop_server

  # Answers by status: 4xx are refusals; anything else is reported apart.
  local j="json/$RUN.json" refused by_status other total per window bg
  [ -s "$j" ] || die "no load-tester JSON for $RUN (logs/$RUN.err)"
  refused=$(refusals "$j" "$kind")
  by_status=$(jq -r --arg k "$kind" '[.groups[$k].status // {} | to_entries | sort_by(-.value)[] | select(.key | test("^4[0-9][0-9]$")) | "\(.value) × \(.key)"] | join(" + ")' "$j")
  other=$(jq -r --arg k "$kind" --argjson banned "$BANNED" '[.groups[$k].status // {} | to_entries[] | select((.key | test("^4[0-9][0-9]$")) or ($banned == 1 and (.key == "closed" or .key == "reset")) | not) | "\(.value) \(.key)"] | join(", ")' "$j")
  if [ "$BANNED" = 1 ]; then
    by_status=$(jq -r --arg k "$kind" '[.groups[$k].status // {} | to_entries | sort_by(-.value)[] | select(.key == "closed" or .key == "reset") | "\(.value) × \(.key)"] | join(" + ")' "$j")
  fi
  [ "$refused" -gt 0 ] || die "$RUN: no refusal counted (json/$RUN.json, logs/$RUN.err)"
  total=$(total_calls "$f")
  per=$(awk -v t="$total" -v r="$refused" 'BEGIN { printf "%.2f", t / r }')
  window=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  bg=$(awk -v i="${IDLE_RATE[$s]:-}" -v w="$window" -v r="$refused" 'BEGIN { if (i == "") print "-"; else printf "%.2f", i * w / r }')
  [ -n "$other" ] && by_status="$by_status; not refused: $other"
  log "$RUN: $refused refusals, $total syscalls, $per per refusal, ${window}s window"
  ROWS+=("| $s | $label | $by_status | $(fmt_int "$total") | **$per** | $bg | $window | $(fmt_int "$per_cpu") | $(breakdown "$f" "$refused") |")
}

for label in $KINDS; do
  case $label in
    missing) kind=missing limited=0 ;;
    forged-HS256) kind=bad-hs256 limited=0 ;;
    rate-limited) kind=missing limited=1 ;;
    banned) kind=bad-hs256 limited=0 ;;
    *) die "unknown kind $label (KINDS: missing forged-HS256 rate-limited banned)" ;;
  esac
  BANNED=0
  [ "$label" = banned ] && BANNED=1
  for s in $SERVERS; do
    case $s in
      portcullis | haproxy | fixed-401) ;;
      *) die "unknown server $s (SERVERS: portcullis haproxy fixed-401)" ;;
    esac
    [ "$s" = fixed-401 ] && [ "$label" != missing ] && continue
    run "$s" "$label" "$kind" "$limited"
  done
done

# ---------------------------------------------------------------- report

{
  echo "## System calls per refusal"
  echo
  sed 's/^/    /' machine.txt
  echo
  echo "| server | kind | refusals counted (by status) | total syscalls | syscalls per refusal | background (est.) | window s | refusals per CPU-s (untraced) | per refusal, by syscall |"
  echo "|---|---|---|---:|---:|---:|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Every syscall of the server process (all threads) between strace's attach"
  echo "(after a $WARMUP-attempt warm-up) and its detach, divided by the refusals"
  echo "the load tester counted; \"err\" = calls that returned an error (EAGAIN, ...)."
  echo "fixed-401 answers 401 to everything: its one row is the floor."
  if [ ${#IDLE_ROWS[@]} -gt 0 ]; then
    echo "Background (est.) = the idle rate below x the window / refusals: the part"
    echo "of the count that timers and sweepers make whatever the load."
    echo
    echo "| server, idle | seconds | syscalls | per second | per second, by syscall |"
    echo "|---|---:|---:|---:|---|"
    printf '%s\n' "${IDLE_ROWS[@]}"
  fi
  echo
  echo "Raw strace summaries: $OUT/strace; load-tester JSON: $OUT/json; commands: $OUT/commands.txt"
} >summary.md
cat summary.md
log "done in $(($(date +%s) - T_START)) s; raw files in $OUT"
