#!/usr/bin/env bash
# scripts/pool-compare.sh: handshakes through a 3-backend pool, Portcullis
# against HAProxy with the same pool, in the same run (release binaries).
#
#   bash scripts/pool-compare.sh [ROUNDS]        (default 2; OUT=dir keeps the raw output)
#
# Servers, each started afresh per measurement, pinned to core 1 with the
# three echo backends; the load generator on core 0 (as loadtest/peers/compare.sh):
#   pp1   Portcullis, upstream.url = one backend (what existed before pools)
#   pp3   Portcullis, upstream.backends = the three, every pool key at its
#         default (least_connections, retries 2, WebSocket health checks every 2 s)
#   hap3  HAProxy 2.6 (loadtest/peers/haproxy.cfg, the JWT-checking door), its
#         backend the same three servers: balance leastconn, check inter 2s
#         fall 2 rise 2 (TCP checks: HAProxy has no WebSocket-upgrade check)
# Measurements per round, servers in reversed order every other round:
#   latency  valid handshakes at 200/s, 4,000 of them: p50 / p99 (ms), from the
#            load generator (connect to parsed 101)
#   cpu      20,000 valid handshakes as fast as 64 in flight allow: server CPU
#            (utime + stime, /proc/PID/stat) per handshake, in µs
# The admission keys are raised as in compare.sh (loadtest/peers/portcullis-proxy.toml)
# so the generator's few addresses are not throttled.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${1:-2}
T=$ROOT/target/release
for b in portcullis portcullis-loadtest echo-backend; do
  [ -x "$T/$b" ] || { echo "missing $T/$b (cargo build --release --workspace)" >&2; exit 2; }
done
command -v haproxy >/dev/null || { echo "needs haproxy (apt-get install haproxy)" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/keys" "$OUT/json" "$OUT/logs"
cd "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
openssl rand -hex 32 >keys/hs256.secret
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out keys/es256.pem
openssl pkey -in keys/es256.pem -pubout -out keys/es256.pub.pem 2>/dev/null
: >revoked-jti.map
TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
BE=(18181 18182 18183)
for p in "${BE[@]}"; do
  taskset -c 1 "$T/echo-backend" "127.0.0.1:$p" 2>/dev/null &
  PIDS+=($!)
  wait_port "$p"
done
PORT=18180
BACKENDS="\"ws://127.0.0.1:${BE[0]}/\", \"ws://127.0.0.1:${BE[1]}/\", \"ws://127.0.0.1:${BE[2]}/\""
sed "s|^url = .*|backends = [$BACKENDS]|; s|^public = .*|public = \"127.0.0.1:$PORT\"|" \
  "$ROOT/loadtest/peers/portcullis-proxy.toml" >pp3.toml
sed "s|^url = .*|url = \"ws://127.0.0.1:${BE[0]}/\"|; s|^public = .*|public = \"127.0.0.1:$PORT\"|" \
  "$ROOT/loadtest/peers/portcullis-proxy.toml" >pp1.toml
python3 - "$ROOT/loadtest/peers/haproxy.cfg" "${BE[@]}" >hap3.cfg <<'EOF'
import sys
cfg, ports = open(sys.argv[1]).read(), sys.argv[2:]
servers = "".join(f"    server be{i} 127.0.0.1:{p} check inter 2s fall 2 rise 2\n" for i, p in enumerate(ports))
old = '    server echo1 "${HAP_BACKEND}"\n'
assert old in cfg
print(cfg.replace(old, "    balance leastconn\n" + servers), end="")
EOF

SERVER_PID=""
start_server() { # start_server NAME
  case $1 in
    pp1 | pp3) taskset -c 1 "$T/portcullis" serve --config "$1.toml" >"logs/$1.out" 2>"logs/$1.err" & ;;
    hap3)
      HAP_BIND=127.0.0.1:$PORT HAP_BACKEND=unused HAP_MAXCONN=9950 HAP_PER_IP_MAX_CONN=1000 \
        HAP_PER_IP_RATE=100000 HAP_TUNNEL_TIMEOUT=120s HAP_HS256_SECRET="$(cat keys/hs256.secret)" \
        HAP_ES256_PUBKEY="$OUT/keys/es256.pub.pem" HAP_REVOKED_MAP="$OUT/revoked-jti.map" \
        HAP_STATS_SOCKET="$OUT/haproxy.sock" taskset -c 1 haproxy -db -f hap3.cfg >"logs/hap3.out" 2>"logs/hap3.err" &
      ;;
  esac
  SERVER_PID=$!
  wait_port "$PORT" || { cat "logs/$1.err"; exit 1; }
  sleep 0.5
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; sleep 0.3; }
lt() { # lt NAME ARGS...
  local name=$1
  shift
  taskset -c 0 "$T/portcullis-loadtest" handshake --url "ws://127.0.0.1:$PORT/" --secret-file keys/hs256.secret \
    --kinds valid --source-ips 127.0.0.2-127.0.0.41 "$@" --quiet --json "json/$name.json" >"logs/$name.lt" 2>&1 || true
}
field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); g=d['groups']['valid']; print(eval(sys.argv[2]))" "json/$1.json" "$2"; }

printf 'round\tserver\tok\tattempts\tp50_ms\tp99_ms\tcpu_us_per_handshake\n' >results.tsv
for r in $(seq 1 "$ROUNDS"); do
  order=(pp1 pp3 hap3)
  [ $((r % 2)) = 0 ] && order=(hap3 pp3 pp1)
  for s in "${order[@]}"; do
    start_server "$s"
    lt "lat-$s-r$r" --rate 200 --count 4000 --duration 25s --concurrency 64
    stop_server
    start_server "$s"
    t0=$(cpu_ticks "$SERVER_PID")
    lt "cpu-$s-r$r" --count 20000 --duration 120s --concurrency 64
    t1=$(cpu_ticks "$SERVER_PID")
    stop_server
    ok=$(field "lat-$s-r$r" "g['status'].get('101', 0)")
    att=$(field "lat-$s-r$r" "sum(g['status'].values())")
    p50=$(field "lat-$s-r$r" "g['handshake_ms']['p50']")
    p99=$(field "lat-$s-r$r" "g['handshake_ms']['p99']")
    n=$(field "cpu-$s-r$r" "g['status'].get('101', 0)")
    us=$(awk -v a="$t0" -v b="$t1" -v t="$TCK" -v n="$n" 'BEGIN { printf "%.1f", (b - a) / t * 1e6 / (n > 0 ? n : 1) }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s (%s ok)\n' "$r" "$s" "$ok" "$att" "$p50" "$p99" "$us" "$n" | tee -a results.tsv
  done
done
echo "raw output in $OUT"
