#!/usr/bin/env bash
# scripts/pool-failover.sh: a backend of a 3-backend pool dies under load
# and comes back; how many handshakes are lost (goal 0), how long until it
# is taken out, how long until it is put back. Shipped defaults for every
# key but the addresses (balance least_connections, retries 2, checks every
# 2000 ms, unhealthy_after / healthy_after 2).
#
#   bash scripts/pool-failover.sh [RATE] [SECONDS]      (default 200 handshakes/s for 20 s)
#
# Needs target/{debug,release}/portcullis, portcullis-loadtest and
# echo-backend (BUILD=release to use release binaries). Loopback only;
# everything it starts is stopped on exit. Two phases:
#   1. under load: a valid-token handshake load from 40 addresses at RATE;
#      backend 2 is killed at 1/4 of the run and restarted at 5/8;
#   2. idle: the same kill without load (only the active checks can see it).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-200}
SECS=${2:-20}
T=target/${BUILD:-debug}
for b in portcullis portcullis-loadtest echo-backend; do
  [ -x "$T/$b" ] || { echo "missing $T/$b (cargo build --workspace${BUILD:+ --release})" >&2; exit 2; }
done
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
now_ms() { date +%s%3N; }

B=("$(freeport)" "$(freeport)" "$(freeport)")
declare -A BPID
start_backend() { "$T/echo-backend" "127.0.0.1:$1" 2>/dev/null & BPID[$1]=$!; PIDS+=($!); wait_port "$1"; }
for p in "${B[@]}"; do start_backend "$p"; done
PUB=$(freeport); ADM=$(freeport)
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/secret"
cat >"$WORK/gw.toml" <<EOF
[listen]
public = "127.0.0.1:$PUB"
admin = "127.0.0.1:$ADM"
[auth]
hmac_secret_file = "$WORK/secret"
[revocation]
path = "$WORK/revocations.log"
[upstream]
backends = ["ws://127.0.0.1:${B[0]}/", "ws://127.0.0.1:${B[1]}/", "ws://127.0.0.1:${B[2]}/"]
[log]
level = "warn"
EOF
"$T/portcullis" serve --config "$WORK/gw.toml" 2>"$WORK/gw.log" &
PIDS+=($!)
wait_port "$PUB"
DEAD="ws://127.0.0.1:${B[1]}/"
up() { curl -s "http://127.0.0.1:$ADM/metrics" | awk -v s="portcullis_backend_up{backend=\"$DEAD\"}" '$1==s {print $2}'; }
errors() { curl -s "http://127.0.0.1:$ADM/metrics" | awk -v s="portcullis_backend_connect_errors_total{backend=\"$DEAD\"}" '$1==s {print $2}'; }
wait_up() { # wait_up VALUE → ms waited (bounded 15 s)
  local t0 t; t0=$(now_ms)
  while [ "$(up)" != "$1" ]; do
    t=$(( $(now_ms) - t0 )); [ $t -lt 15000 ] || { echo "timeout"; return; }
    sleep 0.01
  done
  echo $(( $(now_ms) - t0 ))
}

echo "phase 1: $RATE valid handshakes/s for ${SECS}s through a 3-backend pool; backend 2 dies at $((SECS / 4))s"
"$T/portcullis-loadtest" handshake --url "ws://127.0.0.1:$PUB/" --secret-file "$WORK/secret" --kinds valid \
  --rate "$RATE" --duration "${SECS}s" --count 100000000 --concurrency 64 --source-ips 127.0.0.2-127.0.0.41 \
  --quiet --json "$WORK/load.json" >"$WORK/load.out" 2>&1 &
LOAD=$!
PIDS+=($LOAD)
sleep $((SECS / 4))
kill "${BPID[${B[1]}]}"
echo "  killed backend 2 ($DEAD)"
echo "  taken out after: $(wait_up 0) ms"
sleep $((SECS * 3 / 8))
start_backend "${B[1]}"
echo "  restarted; put back after: $(wait_up 1) ms"
wait "$LOAD" || true
python3 - "$WORK/load.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
def find(o, key):
    if isinstance(o, dict):
        if key in o: yield o[key]
        for v in o.values(): yield from find(v, key)
    elif isinstance(o, list):
        for v in o: yield from find(v, key)
st = {}
for s in find(d, "status"):
    if isinstance(s, dict):
        for k, v in s.items(): st[k] = st.get(k, 0) + v
total = sum(st.values())
print(f"  handshakes: {st.get('101', 0)} upgraded of {total} ({st})")
for h in find(d, "handshake_ms"):
    if isinstance(h, dict):
        print("  handshake ms:", {k: h[k] for k in ("p50", "p99", "p999") if k in h})
        break
EOF
echo "  connect errors counted for backend 2: $(errors)"

echo "phase 2: no load; backend 2 dies"
kill "${BPID[${B[1]}]}"
echo "  taken out after: $(wait_up 0) ms (active checks only: 2 failed checks, 2000 ms apart)"
start_backend "${B[1]}"
echo "  put back after: $(wait_up 1) ms (2 good checks)"
