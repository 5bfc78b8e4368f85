#!/usr/bin/env bash
# RSS per idle echo-mode connection with and without permessage-deflate:
# N connections from Python `websockets` (pip install websockets) offering no
# compression (`plain`), offering it (`deflate`: the gateway agrees), or
# offering it and sending one compressed message each before going idle
# (`deflate-msg`: an inflater was taken and given back). RSS from /proc after
# all are open, minus RSS before. Loopback only; bounded by N.
#
#   scripts/idle-rss-deflate.sh                       # N=5000, every mode, debug binary
#   PORTCULLIS_BIN=target/release/portcullis N=9000 MODES="plain deflate" scripts/idle-rss-deflate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-5000}
MODES=${MODES:-plain deflate deflate-msg}
BIN=${PORTCULLIS_BIN:-target/debug/portcullis}
PORT=${PORT:-18880}
D=$(mktemp -d /tmp/idle-rss-deflate.XXXX)
GP=
trap '[ -n "$GP" ] && kill $GP 2>/dev/null; rm -rf "$D"' EXIT
cat >"$D/client.py" <<'PY'
import asyncio, os, sys, websockets
port, n, mode, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def one(conns):
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/", additional_headers={"Authorization": f"Bearer {token}"},
                                  compression=None if mode == "plain" else "deflate", ping_interval=None, max_size=None)
    if mode == "deflate-msg":
        await ws.send("hello compressed world " * 50)
        await ws.recv()
    conns.append(ws)
async def main():
    conns = []
    for k in range(0, n, 20):
        await asyncio.gather(*(one(conns) for _ in range(k, min(n, k + 20))))
    print("open", len(conns), "extensions:", conns[0].response.headers.get("Sec-WebSocket-Extensions"), flush=True)
    await asyncio.sleep(float(os.environ.get("HOLD", "8")))
asyncio.run(main())
PY
cat >"$D/g.toml" <<CONF
[listen]
public = "127.0.0.1:$PORT"
admin = "127.0.0.1:$((PORT + 10))"
[limits]
per_ip_max_connections = 100000
per_ip_max_handshakes = 1000
per_ip_rate = 100000.0
per_ip_burst = 100000
per_user_max_connections = 100000
[heartbeat]
ping_interval_ms = 3600000
[auth]
hmac_secret = "idle-secret-0123456789abcdef0123"
[revocation]
path = "$D/r.log"
[log]
level = "warn"
CONF
rss() { awk '/VmRSS/ { print $2 }' "/proc/$1/status"; }
for mode in $MODES; do
  "$BIN" serve --config "$D/g.toml" 2>"$D/gateway.log" &
  GP=$!
  sleep 1.5
  T=$("$BIN" token --config "$D/g.toml" --sub idle --ttl 1h)
  # Warm-up: the per-thread buffers exist before the baseline.
  HOLD=0.5 python3 "$D/client.py" "$PORT" 50 "$mode" "$T" >/dev/null
  sleep 1
  before=$(rss $GP)
  HOLD=8 python3 "$D/client.py" "$PORT" "$N" "$mode" "$T" >"$D/client.log" &
  CP=$!
  for _ in $(seq 1 600); do grep -q open "$D/client.log" && break; sleep 0.1; done
  sleep 2
  held=$(rss $GP)
  wait $CP
  kill $GP; wait $GP 2>/dev/null || true
  GP=
  echo "$mode: N=$N RSS ${before} kB -> ${held} kB: $(((held - before) * 1024 / N)) B per connection ($(cat "$D/client.log"))"
done
