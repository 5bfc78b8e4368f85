#!/usr/bin/env bash
# RSS per stalled handshake: N sockets (default 5,000) from 40 loopback
# addresses each send the start of a request head and stall. The server's
# RSS (from /proc/PID/status) before and while they are held gives the cost
# of one. Portcullis (echo mode, release build) and HAProxy (Debian's 2.6,
# http mode) are measured in the same run, one after the other.
#
#   scripts/stalled-rss.sh            # 5,000 sockets
#   N=2000 scripts/stalled-rss.sh
#   BUILD=0 scripts/stalled-rss.sh    # use target/release/portcullis as it is
#   PORTCULLIS_BIN=/path/to/portcullis BUILD=0 scripts/stalled-rss.sh
#                                     # another gateway binary (before/after)
#   DEFAULTS=1 N=640 scripts/stalled-rss.sh
#                                     # the shipped defaults: 40 addresses may
#                                     # hold 16 heads each (640), read within
#                                     # the default 5 s deadline
#
# Tuned keys for this run (the shipped defaults would not let 40 addresses
# hold 5,000 heads at all, which is the point of them): per_ip_max_handshakes
# 200, max_handshakes 6000, and a 60 s deadline that does not shrink, so that
# every socket is still held when RSS is read.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
OUT=$(mktemp -d /tmp/stalled-rss.XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT

command -v haproxy >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }
[ "${BUILD:-1}" = 1 ] && cargo build --release --locked --bin portcullis -q

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

hold() { # hold PORT: opens N stalled heads, prints "ready", waits for stdin EOF
  python3 - "$1" "$N" <<'PY'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
async def main():
    held = []
    for i in range(n):
        src = f"127.0.0.{2 + i % 40}"
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        await w.drain()
        held.append(w)
    await asyncio.sleep(2)
    print("ready", len(held), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
PY
}

measure() { # measure NAME PID PORT
  local name=$1 pid=$2 port=$3 before after
  sleep 1
  before=$(rss_kb "$pid")
  exec {fd}> >(hold "$port" > "$OUT/$name.hold")
  for _ in $(seq 1 600); do grep -q ready "$OUT/$name.hold" 2>/dev/null && break; sleep 0.1; done
  after=$(rss_kb "$pid")
  echo "$name: RSS $before kB -> $after kB with $(awk '{print $2}' "$OUT/$name.hold") stalled heads:" \
    "$(( (after - before) * 1024 / N )) B per stalled handshake"
  exec {fd}>&-
  sleep 1
}

LIMITS='[limits]
max_handshakes = 6000
per_ip_max_handshakes = 200
per_ip_max_connections = 1000
handshake_timeout_ms = 60000
handshake_timeout_min_ms = 60000'
[ "${DEFAULTS:-0}" = 1 ] && LIMITS=""
cat > "$OUT/gw.toml" <<EOF
[listen]
public = "127.0.0.1:18091"
admin = "127.0.0.1:19091"
$LIMITS
[auth]
hmac_secret = "stalled-rss-secret-0123456789abcdef"
[revocation]
path = "$OUT/rev.log"
[log]
level = "warn"
EOF
"${PORTCULLIS_BIN:-target/release/portcullis}" serve --config "$OUT/gw.toml" 2> "$OUT/gw.log" &
GW=$!
sleep 1
measure portcullis "$GW" 18091
kill $GW; wait $GW 2>/dev/null || true

cat > "$OUT/hap.cfg" <<EOF
global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 3s
    timeout client 60s
    timeout server 60s
    timeout http-request 60s
frontend ws
    bind 127.0.0.1:18092
    default_backend none
backend none
    server none 127.0.0.1:9
EOF
haproxy -db -f "$OUT/hap.cfg" 2> "$OUT/hap.log" &
HAP=$!
sleep 1
measure haproxy "$HAP" 18092
kill $HAP; wait $HAP 2>/dev/null || true
