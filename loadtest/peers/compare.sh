#!/usr/bin/env bash
# Portcullis side by side with HAProxy 2.6 (Debian's haproxy, configured as
# a JWT-checking WebSocket door in haproxy.cfg), on this machine, loopback
# only. Installs haproxy when missing, builds the release binaries, then runs
# the same load-tester scenarios against:
#
#   pe     Portcullis, built-in echo upstream    (portcullis-echo.toml)
#   pp     Portcullis, proxy mode                (portcullis-proxy.toml) ─┐ same echo
#   hap    HAProxy, proxy mode                   (haproxy.cfg)           ─┤ backend
#   tun    a bare TCP tunnel (tcp-tunnel)                                ─┘ (echo
#          sections only: the relay floor, bytes copied and nothing checked)
#   floor  a trivial server answering a fixed 401 (refusals only)
#
# Servers (and the echo backend) run on core $SERVER_CPU, the load generator
# on core $LOAD_CPU (taskset). Runs alternate between servers, round after
# round; each server is started fresh for each run. Every load run is bounded
# by --duration (and by `timeout` around it), every wait by a count.
#
#   loadtest/peers/compare.sh                       everything (~25 min)
#   SECTIONS="rss refusals" loadtest/peers/compare.sh
#   ROUNDS=1 SCALE=0.1 MIXED_DURATION=10s HB_WINDOW=5 loadtest/peers/compare.sh
#                                                   a quick smoke run
#   PORTCULLIS_BIN=/path/to/portcullis PORTCULLIS_REV="abc1234" loadtest/peers/compare.sh
#                                                   another gateway binary, same script
#   SERVERS="pp hap" SECTIONS=bigmsg loadtest/peers/compare.sh
#                                                   only these servers
#
# Sections: rss (RSS per idle connection at 9,000), refusals (refusals per
# second of server CPU), latency (valid handshakes at a fixed rate), echo
# (1 KiB echo throughput), mixed (legit clients under attack), heartbeat (CPU
# of pings at 9,000 idle connections, 1 s vs 60 s interval), rss5k (RSS per
# idle connection at 5,000, echo mode), bigmsg (RSS kept per connection after
# 1,000 connections each carried one 1 MiB message and went idle, next to the
# same 1,000 idle without it; bigmsg-after: the messages sent 5 s after each
# handshake, once all are open), echo64 (64 KiB echo throughput, MB per server
# CPU-second).
#
# Output in $OUT (default target/compare/<date>): runs.tsv (one line per
# measurement), summary.md (means over rounds, ratios against HAProxy),
# commands.txt (every command, exactly), json/ and logs/ per run, html/ for the
# mixed runs, machine.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=$ROOT/loadtest/peers
OUT=${OUT:-$ROOT/target/compare/$(date +%Y%m%d-%H%M%S)}
SECTIONS=${SECTIONS:-"rss refusals latency echo mixed heartbeat rss5k"}
ROUNDS=${ROUNDS:-2}
MIXED_ROUNDS=${MIXED_ROUNDS:-$ROUNDS}
SCALE=${SCALE:-1}
MIXED_DURATION=${MIXED_DURATION:-60s}
HB_WINDOW=${HB_WINDOW:-30}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}

# Fixed loopback ports (checked free before each start).
PE_PORT=${PE_PORT:-18080}       # Portcullis public (both modes)
ADMIN_PORT=${ADMIN_PORT:-19090} # Portcullis admin
BE_PORT=${BE_PORT:-18081}       # echo backend
HAP_PORT=${HAP_PORT:-18082}     # HAProxy
FLOOR_PORT=${FLOOR_PORT:-18083} # fixed 401
TUN_PORT=${TUN_PORT:-18084}     # bare TCP tunnel
ATTACK_IPS=127.0.0.2-127.0.0.41   # 40 source addresses
LEGIT_IPS=127.0.0.42-127.0.0.49

BIN=$ROOT/target/release
# PORTCULLIS_BIN: another gateway binary (e.g. a copy built from an earlier
# commit) measured by the very same script, for before/after runs.
PORTCULLIS=${PORTCULLIS_BIN:-$BIN/portcullis}
LT=$BIN/portcullis-loadtest
ECHO_BACKEND=$BIN/echo-backend
FIXED_401=$BIN/fixed-401
TCP_TUNNEL=$BIN/tcp-tunnel

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
# n × SCALE, at least 1.
scaled() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 1 ? 1 : v) }'; }

install_missing() {
  command -v haproxy >/dev/null 2>&1 && return 0
  log "installing haproxy from Debian's packages (its service is not started)"
  export DEBIAN_FRONTEND=noninteractive
  local had_policy=0
  if [ -e /usr/sbin/policy-rc.d ]; then
    had_policy=1
    cp /usr/sbin/policy-rc.d /tmp/policy-rc.d.bak
  fi
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends haproxy >/dev/null
  if [ $had_policy = 1 ]; then mv /tmp/policy-rc.d.bak /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
  command -v haproxy >/dev/null 2>&1 || die "haproxy did not install"
}

for tool in taskset ss openssl jq python3 timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is needed"
done
install_missing
log "building release binaries"
(cd "$ROOT" && cargo build --release -p portcullis -p portcullis-loadtest)
for b in "$PORTCULLIS" "$LT" "$ECHO_BACKEND" "$FIXED_401" "$TCP_TUNNEL"; do
  [ -x "$b" ] || die "$b is missing after the build"
done

mkdir -p "$OUT"/{keys,json,logs,html}
cd "$OUT"
: >runs.tsv
: >commands.txt

# Keys of this run: an HS256 secret (hex, so HAProxy's config takes it as a
# plain word) and an ES256 key pair (the gateways get the public half only;
# bad-es256 tokens are signed with another key by the load tester).
openssl rand -hex 32 >keys/hs256.secret
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null |
  openssl pkcs8 -topk8 -nocrypt -out keys/es256.pem
openssl pkey -in keys/es256.pem -pubout -out keys/es256.pub.pem 2>/dev/null
printf 'revoked-example-jti 1\n' >revoked-jti.map

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "nproc: $(nproc)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "kernel: $(uname -sr)"
  echo "ram: $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
  echo "open files per process: $(ulimit -Hn)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "rustc: $(rustc -V)"
  echo "portcullis: ${PORTCULLIS_REV:-$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "server core: $SERVER_CPU, load generator core: $LOAD_CPU, rounds: $ROUNDS, scale: $SCALE"
} >machine.txt
cat machine.txt >&2

# ---------------------------------------------------------------- processes

STARTED=()
cleanup() {
  local p
  for p in "${STARTED[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
  done
  sleep 0.5
  for p in "${STARTED[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

port_busy() { ss -Hltn "( sport = :$1 )" | grep -q .; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

# Waits (at most 40 s) until COUNT connections are established on PORT.
wait_established() { # port count
  for _ in $(seq 1 80); do
    [ "$(established "$1")" -ge "$2" ] && return 0
    sleep 0.5
  done
  log "warning: $(established "$1") of $2 connections after 40 s"
}

wait_listen() { # port
  for _ in $(seq 1 100); do
    port_busy "$1" && return 0
    sleep 0.1
  done
  die "nothing listens on port $1 after 10 s (see $OUT/logs)"
}

# start_bg NAME CMD... : runs CMD on the server core; sets LAST_PID.
LAST_PID=
start_bg() {
  local name=$1
  shift
  taskset -c "$SERVER_CPU" "$@" >"logs/$name.out" 2>"logs/$name.err" &
  LAST_PID=$!
  STARTED+=("$LAST_PID")
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
}

# A Portcullis config for this run: the committed file with `key = value`
# lines replaced (e.g. per_ip_rate=5.0).
render_conf() { # src dst key=value...
  local src=$1 dst=$2 kv
  shift 2
  cp "$src" "$dst"
  for kv in "$@"; do
    grep -q "^${kv%%=*} = " "$dst" || die "render_conf: no key ${kv%%=*} in $src"
    sed -i "s|^${kv%%=*} = .*|${kv%%=*} = ${kv#*=}|" "$dst"
  done
}

SERVER_PID=
BACKEND_PID=
PORT=
# start_server KIND [conf overrides...]: pe | pp | hap | floor. HAProxy
# overrides come from the environment (HAP_PER_IP_RATE, HAP_TUNNEL_TIMEOUT).
start_server() {
  local kind=$1
  shift
  local p
  for p in $PE_PORT $ADMIN_PORT $BE_PORT $HAP_PORT $FLOOR_PORT $TUN_PORT; do
    port_busy "$p" && die "port $p is already in use"
  done
  BACKEND_PID=
  case $kind in
    pp | hap | tun)
      start_bg "$RUN.backend" "$ECHO_BACKEND" "127.0.0.1:$BE_PORT"
      BACKEND_PID=$LAST_PID
      wait_listen "$BE_PORT"
      ;;
  esac
  case $kind in
    pe | pp)
      local src=$PEERS/portcullis-echo.toml
      [ "$kind" = pp ] && src=$PEERS/portcullis-proxy.toml
      rm -f portcullis-revocations.log
      local ports=("public=\"127.0.0.1:$PE_PORT\"" "admin=\"127.0.0.1:$ADMIN_PORT\"")
      [ "$kind" = pp ] && ports+=("url=\"ws://127.0.0.1:$BE_PORT/\"")
      render_conf "$src" "conf/$RUN.toml" "${ports[@]}" "$@"
      start_bg "$RUN.server" "$PORTCULLIS" serve --config "conf/$RUN.toml"
      PORT=$PE_PORT
      ;;
    hap)
      HAP_BIND=127.0.0.1:$HAP_PORT HAP_BACKEND=127.0.0.1:$BE_PORT HAP_MAXCONN=9950 \
        HAP_PER_IP_MAX_CONN=1000 HAP_PER_IP_RATE=${HAP_PER_IP_RATE:-100000} \
        HAP_TUNNEL_TIMEOUT=${HAP_TUNNEL_TIMEOUT:-120s} HAP_HS256_SECRET="$(cat keys/hs256.secret)" \
        HAP_ES256_PUBKEY="$OUT/keys/es256.pub.pem" HAP_REVOKED_MAP="$OUT/revoked-jti.map" \
        HAP_STATS_SOCKET="$OUT/haproxy.sock" \
        start_bg "$RUN.server" haproxy -db -f "$PEERS/haproxy.cfg"
      PORT=$HAP_PORT
      ;;
    floor)
      start_bg "$RUN.server" "$FIXED_401" "127.0.0.1:$FLOOR_PORT"
      PORT=$FLOOR_PORT
      ;;
    tun)
      start_bg "$RUN.server" "$TCP_TUNNEL" "127.0.0.1:$TUN_PORT" "127.0.0.1:$BE_PORT"
      PORT=$TUN_PORT
      ;;
    *) die "unknown server $kind" ;;
  esac
  SERVER_PID=$LAST_PID
  wait_listen "$PORT"
  sleep 0.5
  kill -0 "$SERVER_PID" 2>/dev/null || die "$kind exited at start (logs/$RUN.server.err)"
}

stop_servers() {
  stop_pid "$SERVER_PID"
  stop_pid "$BACKEND_PID"
  SERVER_PID=
  BACKEND_PID=
  # Let the kernel finish closing before the next run binds the ports.
  sleep 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# utime + stime of a whole process (every thread), in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# Prints its arguments as one shell command line, quoting only what needs it.
shell_words() {
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}

# lt NAME SCENARIO ARGS... : the load generator on its core, bounded by
# `timeout` beyond its own --duration; JSON to json/NAME.json.
lt() {
  local name=$1
  shift
  local cmd=(taskset -c "$LOAD_CPU" "$LT" "$@" --quiet --json "json/$name.json")
  {
    printf '%s\t' "$name"
    shell_words "${cmd[@]}" | sed "s|$ROOT/||g; s|$OUT/||g"
  } >>commands.txt
  timeout --kill-after=10 600 "${cmd[@]}" >"logs/$name.txt" 2>"logs/$name.err" ||
    log "warning: load run $name exited with $? (logs/$name.err)"
}

# rec SECTION SERVER METRIC VALUE
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$ROUND" "$3" "$4" >>runs.tsv; }
jqv() { jq -r "$2 // empty" "json/$1.json" 2>/dev/null || true; }

mkdir -p conf
ROUND=0
RUN=

# The server order of a round: reversed every other round, so no server
# always runs first (or after the same neighbour).
# SERVERS (e.g. "pp hap") keeps only those servers.
order() { # round servers...
  local r=$1 s keep=()
  shift
  for s in "$@"; do
    case " ${SERVERS:-$*} " in *" $s "*) keep+=("$s") ;; esac
  done
  set -- "${keep[@]}"
  if [ $((r % 2)) = 1 ]; then echo "$@"; else echo "$@" | tr ' ' '\n' | tac | tr '\n' ' '; fi
}

TOKEN_ARGS=(--secret-file keys/hs256.secret)

# ---------------------------------------------------------------- sections

# RSS per idle authenticated connection: open COUNT connections, wait until
# the server holds them all, read VmRSS; (RSS - RSS before) / connections.
# In proxy modes the echo backend's RSS is measured apart.
rss_run() { # section server count [idle options...]
  local section=$1 s=$2 count=$3
  shift 3
  RUN="$section-$s-r$ROUND"
  log "$RUN: $count idle connections"
  start_server "$s"
  # Warm-up: the first connections pay for lazily built state (allocator
  # arenas, caches, pools); the baseline is taken after them.
  lt "warmup-$RUN" handshake --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --kinds valid \
    --count 200 --concurrency 16 --duration 20s --source-ips "$ATTACK_IPS"
  sleep 1
  local base_s base_b=0
  base_s=$(rss_kib "$SERVER_PID")
  [ -n "$BACKEND_PID" ] && base_b=$(rss_kib "$BACKEND_PID")
  local hold=${HOLD:-$((count / 1500 + 25))}
  lt "$RUN" idle --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --count "$count" --rate 1500 \
    --duration "${hold}s" --source-ips "$ATTACK_IPS" "$@" &
  local ltpid=$! n
  # 99 %: a handshake lost under load must not stall the measurement.
  wait_established "$PORT" "$((count * 99 / 100))"
  sleep "${SETTLE:-3}"
  n=$(established "$PORT")
  local rss_s rss_b=0 nb=0
  rss_s=$(rss_kib "$SERVER_PID")
  if [ -n "$BACKEND_PID" ]; then
    rss_b=$(rss_kib "$BACKEND_PID")
    nb=$(established "$BE_PORT")
  fi
  log "$RUN: $n connections, server RSS $base_s -> $rss_s KiB, backend $base_b -> $rss_b KiB ($nb)"
  if [ "$n" -lt $((count * 99 / 100)) ]; then
    log "warning: only $n of $count connections open in $RUN"
  fi
  rec "$section" "$s" connections "$n"
  rec "$section" "$s" server_bytes_per_conn "$(((rss_s - base_s) * 1024 / (n > 0 ? n : 1)))"
  if [ -n "$BACKEND_PID" ]; then
    rec "$section" "$s" backend_bytes_per_conn "$(((rss_b - base_b) * 1024 / (nb > 0 ? nb : 1)))"
  fi
  wait "$ltpid" || true
  stop_servers
}

section_rss() {
  local s
  for ROUND in $(seq 1 "$ROUNDS"); do
    for s in $(order "$ROUND" pe pp hap); do
      rss_run rss "$s" "$(scaled 9000)"
    done
  done
}

section_rss5k() {
  for ROUND in $(seq 1 "$ROUNDS"); do
    rss_run rss5k pe "$(scaled 5000)"
  done
}

# RSS kept after a large message: COUNT connections each send one 1 MiB
# message, take it back, and idle; the same COUNT idle without it, same
# round. (RSS - RSS before) / connections for both.
section_bigmsg() {
  local s
  for ROUND in $(seq 1 "$ROUNDS"); do
    for s in $(order "$ROUND" pe pp hap); do
      rss_run bigidle "$s" "$(scaled 1000)"
      HOLD=90 SETTLE=8 rss_run bigmsg "$s" "$(scaled 1000)" --first-message 1MiB
      # The same messages 5 s after each handshake: they pass once every
      # connection is open, so what they leave is told apart from what
      # handshakes slowed by the relays leave.
      HOLD=90 SETTLE=16 rss_run bigmsg-after "$s" "$(scaled 1000)" --first-message 1MiB --message-after 5s
    done
  done
}

# Refusals per second of server CPU: COUNT attempts of one token kind as
# fast as 64 in flight allow; server utime+stime over the run.
refusal_run() { # server kind status count [conf overrides...]
  local s=$1 kind=$2 status=$3 count=$4
  shift 4
  local label=$kind
  [ "$status" = 429 ] && label=rate-limited
  RUN="refusals-$label-$s-r$ROUND"
  start_server "$s" "$@"
  local t0 t1
  t0=$(cpu_ticks "$SERVER_PID")
  lt "$RUN" handshake --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --kinds "$kind" \
    --count "$count" --concurrency 64 --duration 60s --source-ips "$ATTACK_IPS"
  t1=$(cpu_ticks "$SERVER_PID")
  local refused cpu_s
  refused=$(jqv "$RUN" ".groups[\"$kind\"].status[\"$status\"]")
  refused=${refused:-0}
  cpu_s=$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
  log "$RUN: $refused × $status in $cpu_s s of server CPU"
  rec "refusals-$label" "$s" refused "$refused"
  rec "refusals-$label" "$s" cpu_s "$cpu_s"
  rec "refusals-$label" "$s" per_cpu_s "$(awk -v r="$refused" -v c="$cpu_s" 'BEGIN { printf "%.0f", (c > 0 ? r / c : 0) }')"
  stop_servers
}

section_refusals() {
  local s kind n
  for ROUND in $(seq 1 "$ROUNDS"); do
    for kind in missing bad-hs256 bad-es256; do
      n=$(scaled 20000)
      [ "$kind" = bad-es256 ] && n=$(scaled 10000)
      for s in $(order "$ROUND" pe hap floor); do
        [ "$s" = floor ] && [ "$kind" != missing ] && continue
        refusal_run "$s" "$kind" 401 "$n"
      done
    done
    # Per-IP rate: 1 handshake per second per address (HAProxy: more than 1
    # request in the last second); 40 addresses, tokens missing, so the few
    # admitted cost a cheap 401. Only the 429s are counted.
    for s in $(order "$ROUND" pe hap); do
      HAP_PER_IP_RATE=1 refusal_run "$s" missing 429 "$(scaled 20000)" per_ip_rate=1.0 per_ip_burst=1
    done
  done
}

# Valid-handshake latency at a fixed rate.
section_latency() {
  local s
  for ROUND in $(seq 1 "$ROUNDS"); do
    for s in $(order "$ROUND" pe pp hap); do
      RUN="latency-$s-r$ROUND"
      start_server "$s"
      lt "$RUN" handshake --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --kinds valid --rate 200 \
        --count "$(scaled 4000)" --duration 25s --concurrency 64 --source-ips "$ATTACK_IPS"
      rec latency "$s" upgraded "$(jqv "$RUN" '.groups.valid.status["101"]')"
      rec latency "$s" attempts "$(jqv "$RUN" '.groups.valid.counters.attempts')"
      rec latency "$s" p50_ms "$(jqv "$RUN" '.groups.valid.handshake_ms.p50')"
      rec latency "$s" p99_ms "$(jqv "$RUN" '.groups.valid.handshake_ms.p99')"
      rec latency "$s" p999_ms "$(jqv "$RUN" '.groups.valid.handshake_ms.p999')"
      stop_servers
    done
  done
}

# Echo throughput, 1 KiB binary messages, 50 connections.
section_echo() { echo_section echo 1KiB 1024; }
# The same with 64 KiB messages: MB per server CPU-second.
section_echo64() { echo_section echo64 64KiB 65536; }

echo_section() { # section size bytes
  local section=$1 size=$2 bytes=$3 s
  for ROUND in $(seq 1 "$ROUNDS"); do
    for s in $(order "$ROUND" pe pp hap tun); do
      RUN="$section-$s-r$ROUND"
      start_server "$s"
      local t0 t1 b0=0 b1=0
      t0=$(cpu_ticks "$SERVER_PID")
      [ -n "$BACKEND_PID" ] && b0=$(cpu_ticks "$BACKEND_PID")
      lt "$RUN" echo --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --concurrency 50 --size "$size" \
        --duration 15s --source-ips "$ATTACK_IPS"
      t1=$(cpu_ticks "$SERVER_PID")
      [ -n "$BACKEND_PID" ] && b1=$(cpu_ticks "$BACKEND_PID")
      local g msgs mps cpu_s
      g=$(jqv "$RUN" '.group_order[0]')
      msgs=$(jqv "$RUN" ".groups[\"$g\"].counters.messages_received")
      mps=$(jqv "$RUN" ".groups[\"$g\"].messages_per_s")
      cpu_s=$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
      rec "$section" "$s" msgs_per_s "$(printf '%.0f' "${mps:-0}")"
      rec "$section" "$s" server_cpu_s "$cpu_s"
      rec "$section" "$s" msgs_per_server_cpu_s "$(awk -v m="${msgs:-0}" -v c="$cpu_s" 'BEGIN { printf "%.0f", (c > 0 ? m / c : 0) }')"
      rec "$section" "$s" mb_per_server_cpu_s "$(awk -v m="${msgs:-0}" -v c="$cpu_s" -v b="$bytes" 'BEGIN { printf "%.1f", (c > 0 ? m * b / c / 1e6 : 0) }')"
      rec "$section" "$s" backend_cpu_s "$(awk -v a="$b0" -v b="$b1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')"
      rec "$section" "$s" rtt_p50_ms "$(jqv "$RUN" ".groups[\"$g\"].rtt_ms.p50")"
      rec "$section" "$s" rtt_p99_ms "$(jqv "$RUN" ".groups[\"$g\"].rtt_ms.p99")"
      rec "$section" "$s" mismatches "$(jqv "$RUN" ".groups[\"$g\"].counters.echo_mismatch")"
      stop_servers
    done
  done
}

# Legit clients under attack: 4,000 slowloris sockets from 40 addresses,
# 500 zombies that never answer pings, a 2,000/s flood of invalid tokens.
# HAProxy's tunnel timeout is 30 s here, Portcullis's zombie bound
# (ping_interval 20 s + pong_timeout 10 s).
section_mixed() {
  local s
  for ROUND in $(seq 1 "$MIXED_ROUNDS"); do
    for s in $(order "$ROUND" pp hap pe); do
      RUN="mixed-$s-r$ROUND"
      HAP_TUNNEL_TIMEOUT=30s start_server "$s"
      local t0 t1
      t0=$(cpu_ticks "$SERVER_PID")
      lt "$RUN" mixed --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --duration "$MIXED_DURATION" \
        --legit 50 --source-ips "$LEGIT_IPS" \
        --slowloris "$(scaled 4000)" --zombies "$(scaled 500)" --flood-rate "$(scaled 2000)" \
        --flood-kinds garbage,bad-hs256,bad-es256 --attack-source-ips "$ATTACK_IPS" \
        --html "html/$RUN.html"
      t1=$(cpu_ticks "$SERVER_PID")
      rec mixed "$s" success_ratio "$(jqv "$RUN" '.groups.legit.success_ratio')"
      rec mixed "$s" sessions "$(jqv "$RUN" '.groups.legit.counters.sessions')"
      rec mixed "$s" hs_p50_ms "$(jqv "$RUN" '.groups.legit.handshake_ms.p50')"
      rec mixed "$s" hs_p99_ms "$(jqv "$RUN" '.groups.legit.handshake_ms.p99')"
      rec mixed "$s" hs_p999_ms "$(jqv "$RUN" '.groups.legit.handshake_ms.p999')"
      rec mixed "$s" rtt_p50_ms "$(jqv "$RUN" '.groups.legit.rtt_ms.p50')"
      rec mixed "$s" rtt_p99_ms "$(jqv "$RUN" '.groups.legit.rtt_ms.p99')"
      rec mixed "$s" rtt_p999_ms "$(jqv "$RUN" '.groups.legit.rtt_ms.p999')"
      rec mixed "$s" slowloris_reaped "$(jqv "$RUN" '[.groups.slowloris.ends // {} | to_entries[] | select(.key != "held_to_end") | .value] | add // 0')"
      rec mixed "$s" zombies_reaped "$(jqv "$RUN" '[.groups.zombie.ends // {} | to_entries[] | select(.key != "held_to_end") | .value] | add // 0')"
      rec mixed "$s" server_cpu_s "$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')"
      stop_servers
    done
  done
}

# The heartbeat's cost: 9,000 idle connections (echo mode), server CPU over
# a 30 s window with pings every 1 s, and every 60 s.
section_heartbeat() {
  local interval count window=$HB_WINDOW
  count=$(scaled 9000)
  for ROUND in $(seq 1 "$ROUNDS"); do
    for interval in 1000 60000; do
      RUN="heartbeat-${interval}ms-r$ROUND"
      log "$RUN"
      start_server pe ping_interval_ms="$interval"
      lt "$RUN" idle --url "ws://127.0.0.1:$PORT/" "${TOKEN_ARGS[@]}" --count "$count" --rate 1500 \
        --duration "$((count / 1500 + window + 20))s" --source-ips "$ATTACK_IPS" &
      local ltpid=$!
      wait_established "$PORT" "$count"
      sleep 3
      local t0 t1 n
      t0=$(cpu_ticks "$SERVER_PID")
      sleep "$window"
      t1=$(cpu_ticks "$SERVER_PID")
      n=$(established "$PORT")
      rec heartbeat "ping-${interval}ms" connections "$n"
      rec heartbeat "ping-${interval}ms" cpu_s "$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN { printf "%.2f", (b - a) / t }')"
      rec heartbeat "ping-${interval}ms" window_s "$window"
      wait "$ltpid" || true
      stop_servers
    done
  done
}

for section in $SECTIONS; do
  case $section in
    rss | rss5k | refusals | latency | echo | echo64 | bigmsg | mixed | heartbeat) "section_$section" ;;
    *) die "unknown section $section" ;;
  esac
done

python3 "$PEERS/summarize.py" "$OUT" >summary.md
log "done: $OUT/summary.md"
cat summary.md
