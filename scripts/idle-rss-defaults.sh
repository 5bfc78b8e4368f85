#!/usr/bin/env bash
# RSS per idle authenticated connection at the shipped defaults: the gateway
# runs with a config that sets only its addresses, the HS256 secret, the
# revocation log and the upstream; every limit is the default. 40 client
# addresses open N connections (default 9,000: 225 per address, under the
# default 256) at 700 handshakes a second (under 40 × the default 20 per
# second). RSS before and while they are held, from /proc, gives the cost of
# one. Loopback only; bounded by count and by --duration.
#
#   scripts/idle-rss-defaults.sh              # echo mode and proxy mode
#   MODES=echo N=5000 scripts/idle-rss-defaults.sh
#   PORTCULLIS_BIN=/path/to/portcullis scripts/idle-rss-defaults.sh
#                                             # another gateway binary
#   N=1000 FIRST=1MiB SETTLE=8 scripts/idle-rss-defaults.sh
#                                             # each sends one 1 MiB message
#                                             # first (compare with N=1000 alone)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-9000}
MODES=${MODES:-echo proxy}
[ "${BUILD:-1}" = 1 ] && cargo build --release -q -p portcullis -p portcullis-loadtest
GW_BIN=${PORTCULLIS_BIN:-target/release/portcullis}
LT=target/release/portcullis-loadtest
OUT=$(mktemp -d /tmp/idle-rss.XXXX)
openssl rand -hex 32 > "$OUT/secret"
rss_kib() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
open_conns() { ss -Htn state established "( sport = :$1 )" | wc -l; }
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; }
trap cleanup EXIT

for mode in $MODES; do
  url=echo
  if [ "$mode" = proxy ]; then
    taskset -c 1 target/release/echo-backend 127.0.0.1:18193 > "$OUT/backend.log" 2>&1 &
    PIDS+=($!)
    url=ws://127.0.0.1:18193/
  fi
  cat > "$OUT/gw-$mode.toml" <<EOF
[listen]
public = "127.0.0.1:18190"
admin = "127.0.0.1:18191"
[auth]
hmac_secret_file = "$OUT/secret"
[revocation]
path = "$OUT/rev-$mode.log"
[upstream]
url = "$url"
[log]
level = "warn"
EOF
  taskset -c 1 "$GW_BIN" serve --config "$OUT/gw-$mode.toml" 2> "$OUT/gw-$mode.log" &
  GW=$!
  PIDS+=($GW)
  for _ in $(seq 50); do curl -sf http://127.0.0.1:18191/healthz > /dev/null && break; sleep 0.2; done
  # Warm-up: lazily built state (allocator arenas, caches) before the baseline.
  taskset -c 0 "$LT" handshake --url ws://127.0.0.1:18190/ --secret-file "$OUT/secret" --kinds valid \
    --count 200 --concurrency 16 --rate 500 --duration 20s --source-ips 127.0.0.2-127.0.0.41 --quiet > /dev/null
  sleep 1
  base=$(rss_kib "$GW")
  taskset -c 0 "$LT" idle --url ws://127.0.0.1:18190/ --secret-file "$OUT/secret" --count "$N" --rate 700 \
    --duration "$((N / 700 + 30))s" --source-ips 127.0.0.2-127.0.0.41 ${FIRST:+--first-message "$FIRST"} \
    --quiet > "$OUT/lt-$mode.log" 2>&1 &
  LTP=$!
  for _ in $(seq 600); do [ "$(open_conns 18190)" -ge "$N" ] && break; sleep 0.1; done
  sleep "${SETTLE:-3}"
  n=$(open_conns 18190)
  top=$(rss_kib "$GW")
  echo "$mode: RSS $base -> $top KiB with $n connections at the shipped defaults: $(((top - base) * 1024 / (n > 0 ? n : 1))) B per connection"
  kill "$LTP" "$GW" 2>/dev/null || true
  wait "$LTP" "$GW" 2>/dev/null || true
  [ "$mode" = proxy ] && { kill "${PIDS[0]}" 2>/dev/null || true; }
  PIDS=()
done
