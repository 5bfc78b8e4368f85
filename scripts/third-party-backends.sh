#!/usr/bin/env bash
# scripts/third-party-backends.sh: real backends nobody here wrote, through
# the gateway and a backend pool.
#
#   bash scripts/third-party-backends.sh [path-to-portcullis-binary]   (default: target/debug/portcullis)
#
# 1. MQTT over WebSocket: two Mosquitto brokers (Debian's package) in one
#    round-robin pool; paho-mqtt clients (PyPI) connect through the gateway
#    with the header carrier and subprotocol `mqtt`, each publishing to
#    itself; then one broker is killed and every new client still gets in
#    (retried on the other before the 101).
# 2. GraphQL over WebSocket: two `graphql-ws` servers (npm, on Node `ws`)
#    in one pool behind a route `/graphql`; the `graphql-ws` browser client
#    in headless Chromium, through the subprotocol carrier beside its own
#    protocol (`new WebSocket(url, ["graphql-transport-ws", "bearer", T])`),
#    runs a query. The client refuses a socket whose `protocol` is not
#    `graphql-transport-ws`, so this passes only if the 101 names the
#    backend's choice.
#
# Installs what is missing (mosquitto, chromium: apt; paho-mqtt: pip; the npm
# packages into a temp dir). Every step is bounded; exit 0 only if all pass.
# Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/portcullis}
[ -x "$BIN" ] || { echo "build first: cargo build ($BIN missing)" >&2; exit 2; }
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $*"; exit 1; }
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # wait_port PORT
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
python3 -c "import paho.mqtt" 2>/dev/null || python3 -m pip install -q paho-mqtt
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

SECRET=third-party-secret-0123456789abcdef
gateway() { # gateway NAME TOML-UPSTREAM-AND-AUTH → sets GW_PUBLIC, GW_ADMIN
  local name=$1 extra=$2 pub adm
  pub=$(freeport); adm=$(freeport)
  cat >"$WORK/$name.toml" <<EOF
[listen]
public = "127.0.0.1:$pub"
admin = "127.0.0.1:$adm"
[auth]
hmac_secret = "$SECRET"
$extra
[revocation]
path = "$WORK/$name-revocations.log"
EOF
  "$BIN" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
  PIDS+=($!)
  wait_port "$pub" || { cat "$WORK/$name.log"; fail "$name gateway did not start"; }
  GW_PUBLIC=127.0.0.1:$pub
  GW_ADMIN=127.0.0.1:$adm
  TOKEN=$("$BIN" token --config "$WORK/$name.toml" --sub "third-party" --ttl 1h)
}

# ------------------------------------------------------------ 1. MQTT
M1=$(freeport); M2=$(freeport)
for p in "$M1" "$M2"; do
  # Mosquitto 2.0.11 starts no WebSocket-only broker ("Unable to start any
  # listening sockets"): a plain MQTT listener goes first.
  printf 'listener %s 127.0.0.1\nlistener %s 127.0.0.1\nprotocol websockets\nallow_anonymous true\n' \
    "$(freeport)" "$p" >"$WORK/mosquitto-$p.conf"
  "$MOSQUITTO" -c "$WORK/mosquitto-$p.conf" >"$WORK/mosquitto-$p.log" 2>&1 &
  PIDS+=($!)
  eval "MPID_$p=$!"
  wait_port "$p" || fail "mosquitto on $p did not start"
done
gateway mqtt "carriers = [\"header\"]
[limits]
per_user_max_connections = 100
[upstream]
backends = [\"ws://127.0.0.1:$M1/\", \"ws://127.0.0.1:$M2/\"]
balance = \"round_robin\"
health_interval_ms = 500"
cat >"$WORK/mqtt.py" <<'EOF'
import sys, threading, paho.mqtt.client as mqtt
host, port = sys.argv[1].split(":")
token, n = sys.argv[2], int(sys.argv[3])
ok = 0
for i in range(n):
    got = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pc-{i}", transport="websockets")
    c.ws_set_options(path="/", headers={"Authorization": f"Bearer {token}"})
    topic = f"portcullis/{i}"
    c.on_connect = lambda cl, u, f, rc, p, topic=topic: (cl.subscribe(topic), cl.publish(topic, "hello", qos=1))
    c.on_message = lambda cl, u, m: got.set() if m.payload == b"hello" else None
    try:
        c.connect(host, int(port), keepalive=10)
    except Exception as e:
        print(f"client {i}: connect failed: {e}"); continue
    c.loop_start()
    if got.wait(5):
        ok += 1
    else:
        print(f"client {i}: no message back")
    c.loop_stop(); c.disconnect()
print(f"{ok}/{n}")
sys.exit(0 if ok == n else 1)
EOF
out=$(timeout 60 python3 "$WORK/mqtt.py" "$GW_PUBLIC" "$TOKEN" 10) || fail "MQTT through the pool: $out"
pass "MQTT over WebSocket through a 2-broker pool: $out clients published and received"
kill "$(eval echo "\$MPID_$M1")"
out=$(timeout 60 python3 "$WORK/mqtt.py" "$GW_PUBLIC" "$TOKEN" 10) || fail "MQTT with one broker killed: $out"
pass "one broker killed: $out new clients still got in (retried before the 101)"
sleep 1.5
list=$(curl -s "http://$GW_ADMIN/admin/backends")
echo "$list" | python3 -c "import json,sys; l=json.load(sys.stdin); sys.exit(0 if any(e['url']=='ws://127.0.0.1:$M1/' and not e['healthy'] for e in l) else 1)" \
  || fail "the killed broker is not marked down: $list"
pass "the killed broker is marked down: $list"

# ------------------------------------------------------------ 2. graphql-ws in a browser
command -v node >/dev/null 2>&1 || fail "needs node and npm"
(cd "$WORK" && npm init -y >/dev/null && timeout 300 npm install --silent --no-audit --no-fund graphql graphql-ws ws >/dev/null) \
  || fail "npm install graphql graphql-ws ws"
cat >"$WORK/gql-server.mjs" <<'EOF'
import { WebSocketServer } from "ws";
import { useServer } from "graphql-ws/use/ws";
import { buildSchema } from "graphql";
const [port, tag] = process.argv.slice(2);
const schema = buildSchema("type Query { hello: String }");
const roots = { query: { hello: () => `hello from ${tag}` } };
const wss = new WebSocketServer({ port: Number(port), host: "127.0.0.1", path: "/graphql" });
useServer({ schema, roots }, wss);
EOF
# Older graphql-ws releases export the ws helper as graphql-ws/lib/use/ws.
[ -e "$WORK/node_modules/graphql-ws/dist/use/ws.js" ] || [ -e "$WORK/node_modules/graphql-ws/use/ws.js" ] \
  || sed -i 's|graphql-ws/use/ws|graphql-ws/lib/use/ws|' "$WORK/gql-server.mjs"
G1=$(freeport); G2=$(freeport)
for p in "$G1" "$G2"; do
  (cd "$WORK" && exec node gql-server.mjs "$p" "gql-$p" >"$WORK/gql-$p.log" 2>&1) &
  PIDS+=($!)
  wait_port "$p" || { cat "$WORK/gql-$p.log"; fail "graphql-ws server on $p did not start"; }
done
gateway gql "carriers = [\"subprotocol\"]
[upstream]
health_interval_ms = 500
[[upstream.routes]]
path_prefix = \"/graphql\"
backends = [\"ws://127.0.0.1:$G1/graphql\", \"ws://127.0.0.1:$G2/graphql\"]"
UMD=$(ls "$WORK"/node_modules/graphql-ws/umd/graphql-ws.min.js 2>/dev/null || ls "$WORK"/node_modules/graphql-ws/umd/*.js | head -1)
SITE=$(freeport)
mkdir -p "$WORK/site"
cp "$UMD" "$WORK/site/graphql-ws.js"
cat >"$WORK/site/index.html" <<EOF
<!doctype html><html><body><pre id="out">pending</pre>
<script src="graphql-ws.js"></script>
<script>
const out = document.getElementById("out");
class WithToken extends WebSocket {
  constructor(url, protocol) { super(url, [protocol, "bearer", "$TOKEN"]); }
}
const client = graphqlWs.createClient({
  url: "ws://$GW_PUBLIC/graphql", webSocketImpl: WithToken, retryAttempts: 0,
  on: { closed: (e) => { if (out.textContent === "pending") out.textContent = "closed=" + e.code + " " + e.reason; } },
});
client.subscribe({ query: "{ hello }" }, {
  next: (r) => { out.textContent = "result=" + JSON.stringify(r.data); },
  error: (e) => { out.textContent = "error=" + (e && (e.message || e.reason || e.code || JSON.stringify(e))); },
  complete: () => {},
});
</script></body></html>
EOF
(cd "$WORK/site" && exec python3 -m http.server "$SITE" --bind 127.0.0.1 >/dev/null 2>&1) &
PIDS+=($!)
wait_port "$SITE" || fail "page server did not start"
# Let the first health checks pass before the page loads (the page makes
# one attempt: retryAttempts 0).
sleep 1
dom=$(timeout 60 chromium --headless --no-sandbox --disable-gpu --no-first-run --virtual-time-budget=10000 \
  --user-data-dir="$WORK/profile" --dump-dom "http://127.0.0.1:$SITE/" 2>"$WORK/chromium.log") || true
echo "$dom" | grep -q 'result={"hello":"hello from gql-' || fail "graphql-ws browser client: $(echo "$dom" | grep -o '<pre id="out">[^<]*')"
pass "graphql-ws browser client in headless Chromium through a route pool: $(echo "$dom" | grep -o 'result={[^<]*')"
echo "RESULT: PASS"
