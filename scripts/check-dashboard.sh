#!/usr/bin/env bash
# scripts/check-dashboard.sh: check grafana/ against a real gateway and a real Prometheus.
#
#   bash scripts/check-dashboard.sh [path-to-portcullis-binary]   (default: target/debug/portcullis)
#
# What it does, in order (every step bounded in time; exit 0 only if all pass):
#   1. installs Debian's `prometheus` package when promtool or prometheus is
#      missing, without letting the package start its service (which would
#      take port 9090); a package-started prometheus on :9090 is stopped;
#   2. `promtool check rules grafana/alerts.yml`;
#   3. extracts every panel target `expr` (and every query variable) from
#      grafana/portcullis-dashboard.json; a panel target without `expr` fails;
#   4. starts `portcullis serve --demo --public 127.0.0.1:0 --admin 127.0.0.1:0`,
#      reads from its stderr the lines
#          listening public=HOST:PORT admin=HOST:PORT
#          token: <TOKEN>
#      and sends some traffic (404s, 401s, 426, 101s, a few echoed messages);
#      and a second gateway with a backend pool (the demo as its backend), so
#      the per-backend series exist too;
#   5. scrapes http://ADMIN/metrics and runs `promtool check metrics` on it
#      (fatal/style classification below);
#   6. checks that every metric name a dashboard query or alert rule names
#      (portcullis_* / process_*) is a series in that scrape;
#   7. starts a real Prometheus (free port, temp TSDB, 1 s scrape of ADMIN,
#      grafana/alerts.yml loaded), waits for up == 1, and evaluates every
#      dashboard query (Grafana's $__rate_interval / $__interval / $__range
#      become 1m, template variables $job / $instance become .*) and every
#      alert rule expr through /api/v1/query; any error fails. Alert rules must
#      also report health "ok" in /api/v1/rules.
#
# `promtool check metrics` classification: promtool exits 3 on lint problems.
#   fatal: a parse error; "no help text" (every metric must have HELP);
#          a non-histogram metric ending in _count/_sum/_bucket (collides with
#          histogram series); any problem text not in the style list below.
#   style (reported, not fatal): snake_case naming, unit naming ("use base
#          unit", "abbreviated units"), "should not include type", the
#          "_total" suffix conventions, reserved ':' in names.
#
# Needs: bash, curl, python3 (standard library only), and root for the
# one-time apt-get install (or promtool and prometheus already on PATH).
# Set PORTCULLIS_CHECK_KEEP=1 to keep the temp dir (logs, scrape) afterwards.
# shellcheck disable=SC2317  # cleanup functions are reached through traps
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target/debug/portcullis}
case "$BIN" in /*) ;; *) BIN=$PWD/$BIN ;; esac   # relative to the caller's directory
cd "$ROOT"

DASHBOARD=$ROOT/grafana/portcullis-dashboard.json
ALERTS=$ROOT/grafana/alerts.yml

# Bounds (seconds).
GATEWAY_START_TIMEOUT=30
PROM_READY_TIMEOUT=30
PROM_UP_TIMEOUT=30
APT_TIMEOUT=900

WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-check.XXXXXX")
GW_PID=""
POOL_PID=""
PROM_PID=""
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_STATE=""      # "" = untouched, "created" = ours (remove), "replaced" = restore backup
FAILURES=()
WARNINGS=()
PASSES=()

log()  { printf '[check-dashboard] %s\n' "$*" >&2; }
pass() { PASSES+=("$*"); log "ok: $*"; }
warn() { WARNINGS+=("$*"); log "WARN: $*"; }
fail() { FAILURES+=("$*"); log "FAIL: $*"; }

restore_policy_rc() {
  case "$POLICY_STATE" in
    created)  rm -f "$POLICY_RC" ;;
    replaced) cp -p "$WORK/policy-rc.d.orig" "$POLICY_RC" ;;
  esac
  POLICY_STATE=""
}

# Stop a child we started: TERM, wait up to 5 s, then KILL.
stop_pid() {
  local pid=$1 _
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  stop_pid "$PROM_PID"
  stop_pid "$GW_PID"
  stop_pid "$POOL_PID"
  restore_policy_rc
  if [ -n "${PORTCULLIS_CHECK_KEEP:-}" ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_log() { # show_log NAME FILE: last lines of a log, for a failure report
  [ -s "$2" ] || return 0
  log "---- last lines of $1 ----"
  tail -n 30 "$2" | sed 's/^/    /' >&2
  log "---- end of $1 ----"
}

summary_and_exit() {
  local p w f
  echo
  echo "================ check-dashboard summary ================"
  for p in "${PASSES[@]+"${PASSES[@]}"}"; do echo "PASS  $p"; done
  for w in "${WARNINGS[@]+"${WARNINGS[@]}"}"; do echo "WARN  $w"; done
  for f in "${FAILURES[@]+"${FAILURES[@]}"}"; do echo "FAIL  $f"; done
  if [ ${#FAILURES[@]} -eq 0 ]; then
    echo "RESULT: PASS (${#PASSES[@]} checks passed, ${#WARNINGS[@]} warnings)"
  else
    echo "RESULT: FAIL (${#FAILURES[@]} failed, ${#PASSES[@]} passed, ${#WARNINGS[@]} warnings)"
  fi
  # The plain closing line CI reads as a test count.
  echo "check-dashboard: ${#PASSES[@]} passed, ${#FAILURES[@]} failed"
  [ ${#FAILURES[@]} -eq 0 ] && exit 0
  exit 1
}

# Stop here: report and exit non-zero (the EXIT trap cleans up).
abort() {
  fail "$*"
  summary_and_exit
}

# ---------------------------------------------------------------- helpers (python3)
cat >"$WORK/check.py" <<'PY'
"""Helpers for scripts/check-dashboard.sh (standard library only)."""
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

METRIC_TOKEN = re.compile(r'(?<![A-Za-z0-9_:])((?:portcullis|process)_[a-z_]+)')
ANSI = re.compile(r'\x1b\[[0-9;?]*[ -/]*[@-~]')


def out(msg):
    print(msg, flush=True)


def err(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------ small utilities
def cmd_freeport():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    out(s.getsockname()[1])
    s.close()


def cmd_listeners(port):
    """PIDs with a TCP socket listening on `port` (any address), from /proc."""
    port = int(port)
    inodes = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(f).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            p = line.split()
            if len(p) > 9 and p[3] == "0A" and int(p[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(p[9])
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                try:
                    comm = open(f"/proc/{pid}/comm").read().strip()
                except OSError:
                    comm = "?"
                out(f"{pid} {comm}")
                break


def cmd_parse_stderr(path):
    """Print 'PUBLIC ADMIN TOKEN' once both lines are in the gateway's stderr."""
    try:
        text = ANSI.sub("", open(path, errors="replace").read())
    except OSError:
        sys.exit(1)
    listen = re.search(r'listening\s+public="?([^\s"]+)"?\s+admin="?([^\s"]+)"?', text)
    token = re.search(r'(?:^|[^A-Za-z0-9_])token:\s+"?([A-Za-z0-9._~+/=-]+)"?', text, re.M)
    if not (listen and token):
        sys.exit(1)
    out(f"{listen.group(1)} {listen.group(2)} {token.group(1)}")


# ------------------------------------------------------------ dashboard queries
def walk_panels(panels):
    for p in panels or []:
        yield p
        yield from walk_panels(p.get("panels"))


NO_QUERY_PANELS = {"row", "text", "news", "dashlist", "alertlist", "annolist"}


def cmd_extract(dash_path, out_path):
    """Every panel target expr and query variable of the dashboard -> JSON list."""
    try:
        dash = json.load(open(dash_path))
    except (OSError, ValueError) as e:
        err(f"cannot read dashboard {dash_path}: {e}")
        sys.exit(1)
    problems, items, npanels = [], [], 0
    for p in walk_panels(dash.get("panels")):
        ptype, title = p.get("type", "?"), p.get("title", "?")
        if ptype in NO_QUERY_PANELS:
            continue
        npanels += 1
        targets = p.get("targets") or []
        if not targets:
            problems.append(f'panel "{title}" ({ptype}) has no targets')
        for t in targets:
            expr = (t.get("expr") or "").strip()
            ref = t.get("refId", "?")
            if not expr:
                problems.append(f'panel "{title}" target {ref} has no expr')
                continue
            items.append({"source": f'panel "{title}" [{ref}]', "kind": "panel", "expr": expr})
    for v in (dash.get("templating") or {}).get("list") or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not q:
            problems.append(f'variable ${v.get("name")} has no query')
            continue
        items.append({"source": f'variable ${v.get("name")}', "kind": "variable", "expr": q.strip()})
    for p in problems:
        err(f"  {p}")
    if problems:
        sys.exit(1)
    json.dump(items, open(out_path, "w"), indent=1)
    n = sum(1 for i in items if i["kind"] == "panel")
    out(f"{npanels} panels, {n} targets, {len(items) - n} query variables")


def substitute(expr):
    """Grafana macros and template variables -> something Prometheus accepts."""
    e = re.sub(r"\$\{?__(?:interval|range)_ms\}?", "60000", expr)
    e = re.sub(r"\$\{?__range_s\}?", "60", e)
    e = re.sub(r"\$\{?__(?:rate_interval|interval|range)\}?", "1m", e)
    # Template variables ($job, ${instance}, ${instance:regex}, [[job]]): the
    # dashboard only uses them inside =~"..." matchers, where .* means "All".
    e = re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+(?::\w+)?\]\]", ".*", e)
    return e


def promql_of(item):
    """(PromQL to evaluate or None, label the variable needs or None)."""
    expr = substitute(item["expr"])
    if item["kind"] != "variable":
        return expr, None
    m = re.match(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", expr, re.S)
    if m:
        return m.group(1), m.group(2)
    m = re.match(r"^\s*query_result\(\s*(.+)\s*\)\s*$", expr, re.S)
    if m:
        return m.group(1), None
    return None, None  # label_names(), metrics(), label_values(label): nothing to evaluate


# ------------------------------------------------------------ /metrics checks
def parse_scrape(path):
    samples, families = set(), {}
    for line in open(path, errors="replace"):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            p = line.split()
            if len(p) >= 4 and p[1] == "TYPE":
                families[p[2]] = p[3]
            continue
        m = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
        if m:
            samples.add(m.group(0))
    return samples, families


def cmd_names(metrics_path, *query_files):
    """Every portcullis_* / process_* name in the queries must be a scraped series."""
    samples, families = parse_scrape(metrics_path)
    wanted = {}
    for qf in query_files:
        for item in json.load(open(qf)):
            for name in METRIC_TOKEN.findall(item["expr"]):
                wanted.setdefault(name, []).append(item["source"])
    missing = 0
    for name in sorted(wanted):
        if name in samples:
            continue
        missing += 1
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        where = ", ".join(sorted(set(wanted[name]))[:3])
        if base != name and base in families:
            why = (f"family {base} is exported as a {families[base]}, without {name} series"
                   + (" (a histogram needs buckets configured)" if families[base] != "histogram" else ""))
        elif name in families and families[name] == "histogram":
            why = f"{name} is a histogram: query {name}_bucket / _sum / _count"
        else:
            why = "not in the scrape at all"
        err(f"  missing metric {name}: {why}; used by {where}")
    out(f"{len(wanted)} metric names referenced, {len(wanted) - missing} found in the scrape, {missing} missing")
    sys.exit(1 if missing else 0)


STYLE_LINTS = [
    r"should be written in 'snake_case'",
    r"use base unit",
    r"abbreviated units",
    r"should not include type",
    r'should have "_total" suffix',
    r'should not have "_total" suffix',
    r"reserved chars|should not contain ':'",
]


def cmd_lint(rc, path):
    """Classify `promtool check metrics` output: exit 1 if anything is fatal."""
    rc = int(rc)
    lines = [l.rstrip() for l in open(path, errors="replace") if l.strip()]
    fatal, style = [], []
    for l in lines:
        if any(re.search(p, l) for p in STYLE_LINTS) and not l.startswith("error"):
            style.append(l)
        else:
            fatal.append(l)
    for l in style:
        err(f"  style lint (not fatal): {l}")
    for l in fatal:
        err(f"  FATAL: {l}")
    if rc != 0 and not lines:
        err(f"  FATAL: promtool exited {rc} without saying why")
        sys.exit(1)
    if rc not in (0, 3) and not fatal:
        err(f"  FATAL: promtool exited {rc} (not a lint result)")
        sys.exit(1)
    out(f"{len(fatal)} fatal, {len(style)} style lint(s)")
    sys.exit(1 if fatal else 0)


# ------------------------------------------------------------ Prometheus API
def api(base, path, params=None, timeout=5):
    data = urllib.parse.urlencode(params).encode() if params is not None else None
    req = urllib.request.Request(base + path, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error body
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "errorType": f"http {e.code}", "error": str(e)}
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {"status": "error", "errorType": "connection", "error": str(e)}


def query(base, q):
    return api(base, "/api/v1/query", {"query": q, "time": f"{time.time():.3f}"})


def cmd_wait_query(base, q, minimum, timeout):
    """Wait until the instant query `q` has a sample >= minimum."""
    deadline = time.time() + float(timeout)
    last = None
    while time.time() < deadline:
        r = query(base, q)
        last = r
        if r.get("status") == "success":
            vals = [float(s["value"][1]) for s in r["data"]["result"]]
            if vals and max(vals) >= float(minimum):
                out(f"{q} = {max(vals):g}")
                return
        time.sleep(0.5)
    err(f"  timed out after {timeout}s waiting for {q} >= {minimum}; last answer: {json.dumps(last)[:300]}")
    sys.exit(1)


def cmd_rules(base, out_path, timeout):
    """Wait until every loaded rule was evaluated once; dump them as query items."""
    deadline = time.time() + float(timeout)
    rules = []
    while time.time() < deadline:
        r = api(base, "/api/v1/rules")
        rules = [rule for g in (r.get("data") or {}).get("groups", []) for rule in g.get("rules", [])]
        if rules and all(not rule.get("lastEvaluation", "0001").startswith("0001") for rule in rules):
            break
        time.sleep(0.5)
    else:
        err(f"  timed out after {timeout}s waiting for the rules to be evaluated ({len(rules)} loaded)")
        sys.exit(1)
    items, bad = [], 0
    for rule in rules:
        name = rule.get("name", "?")
        items.append({"source": f'rule {name}', "kind": "rule", "expr": rule.get("query", "")})
        if rule.get("health") != "ok":
            bad += 1
            err(f"  rule {name}: health {rule.get('health')}: {rule.get('lastError', '')}")
    json.dump(items, open(out_path, "w"), indent=1)
    out(f"{len(rules)} rules loaded and evaluated by Prometheus, {bad} unhealthy")
    sys.exit(1 if bad else 0)


def cmd_evaluate(base, *query_files):
    """Evaluate every query through /api/v1/query; exit 1 if any errors."""
    errors = total = nonempty = 0
    for qf in query_files:
        for item in json.load(open(qf)):
            promql, need_label = promql_of(item)
            if promql is None:
                out(f"  skip  {item['source']}: {item['expr']} (nothing to evaluate)")
                continue
            total += 1
            r = query(base, promql)
            if r.get("status") != "success":
                errors += 1
                err(f"  ERROR {item['source']}: {r.get('errorType')}: {r.get('error')}\n        query: {promql}")
                continue
            result = r["data"]["result"]
            n = len(result) if isinstance(result, list) else 1
            if n:
                nonempty += 1
            if need_label is not None:
                values = sorted({s["metric"].get(need_label, "") for s in result} - {""})
                if not values:
                    errors += 1
                    err(f"  ERROR {item['source']}: no value for label {need_label!r} "
                        f"(the dashboard dropdown would be empty)\n        query: {promql}")
                    continue
                out(f"  ok    {item['source']}: {need_label} = {', '.join(values)}")
                continue
            out(f"  ok    {item['source']}: {n} series")
    out(f"{total} queries evaluated: {errors} errors, {nonempty} returned data, "
        f"{total - errors - nonempty} returned no data yet")
    sys.exit(1 if errors else 0)


# ------------------------------------------------------------ traffic
def cmd_ws_echo(addr, token, count):
    """One WebSocket session: upgrade with the token, send `count` text
    messages, read the echoes, close. Raw socket, standard library only."""
    host, port = addr.rsplit(":", 1)
    host = host.strip("[]")
    s = socket.create_connection((host, int(port)), timeout=3)
    s.settimeout(3)
    s.sendall((f"GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit("connection closed during the handshake")
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 101 " not in status + " ":
        raise SystemExit(f"upgrade refused: {status}")
    buf = head.split(b"\r\n\r\n", 1)[1]

    def frame(opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        hdr = bytes([0x80 | opcode])
        hdr += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        return hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def read_frame():
        nonlocal buf
        while True:
            if len(buf) >= 2:
                n, off = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, off = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127 and len(buf) >= 10:
                    n, off = int.from_bytes(buf[2:10], "big"), 10
                if n < 126 or off > 2:
                    if len(buf) >= off + n:
                        op, payload, buf = buf[0] & 0x0F, buf[off:off + n], buf[off + n:]
                        return op, payload
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("connection closed before the echo")
            buf += chunk

    echoed = 0
    for i in range(int(count)):
        msg = f"check-dashboard message {i}".encode()
        s.sendall(frame(0x1, msg))
        while True:
            op, payload = read_frame()
            if op == 0x9:  # ping: answer it
                s.sendall(frame(0xA, payload))
                continue
            if op == 0x1 and payload == msg:
                echoed += 1
            break
    s.sendall(frame(0x8, (1000).to_bytes(2, "big")))
    try:
        read_frame()
    except (SystemExit, OSError):
        pass
    s.close()
    out(f"{echoed}/{count} messages echoed")
    sys.exit(0 if echoed == int(count) else 1)


COMMANDS = {
    "freeport": cmd_freeport, "listeners": cmd_listeners, "parse-stderr": cmd_parse_stderr,
    "extract": cmd_extract, "names": cmd_names, "lint": cmd_lint, "wait-query": cmd_wait_query,
    "rules": cmd_rules, "evaluate": cmd_evaluate, "ws-echo": cmd_ws_echo,
}

if __name__ == "__main__":
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError) as e:
        err(f"  {sys.argv[1]}: {e}")
        sys.exit(1)
PY
py() { python3 "$WORK/check.py" "$@"; }

# ---------------------------------------------------------------- 0. preconditions
command -v python3 >/dev/null || abort "python3 is required"
command -v curl >/dev/null || abort "curl is required"
[ -f "$DASHBOARD" ] || abort "missing $DASHBOARD"
[ -f "$ALERTS" ] || abort "missing $ALERTS"
if [ ! -x "$BIN" ]; then
  log "gateway binary not found or not executable: $BIN (build it first: cargo build --bin portcullis)"
  exit 2
fi

# ---------------------------------------------------------------- 1. prometheus + promtool
install_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || abort "promtool/prometheus missing; install Debian's prometheus package (needs root)"
  command -v apt-get >/dev/null || abort "promtool/prometheus missing and no apt-get"
  log "installing Debian's prometheus package (its service is kept from starting)"
  # policy-rc.d exit 101 = "action forbidden": invoke-rc.d and deb-systemd-invoke
  # then do not start the service from the package's postinst.
  if [ -e "$POLICY_RC" ]; then
    cp -p "$POLICY_RC" "$WORK/policy-rc.d.orig"
    POLICY_STATE=replaced
  else
    POLICY_STATE=created
  fi
  printf '#!/bin/sh\n# written by scripts/check-dashboard.sh for the duration of an install\nexit 101\n' >"$POLICY_RC"
  chmod 755 "$POLICY_RC"
  local ok=1
  timeout "$APT_TIMEOUT" apt-get update -qq >"$WORK/apt.log" 2>&1 || ok=0
  if [ $ok = 1 ]; then
    DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" \
      apt-get install -y -qq --no-install-recommends prometheus >>"$WORK/apt.log" 2>&1 || ok=0
  fi
  restore_policy_rc
  if [ $ok = 0 ]; then
    show_log "apt-get" "$WORK/apt.log"
    abort "apt-get install prometheus failed"
  fi
  # Belt and braces: if a service manager started it anyway, stop it.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    timeout 30 systemctl stop prometheus.service >/dev/null 2>&1 || true
  fi
  local pid comm _
  while read -r pid comm; do
    [ -n "$pid" ] || continue
    if [ "$comm" = prometheus ]; then
      log "stopping prometheus (pid $pid) holding port 9090 after the install"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    else
      warn "port 9090 is held by $comm (pid $pid), not by prometheus; left alone"
    fi
  done < <(py listeners 9090)
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    abort "prometheus package installed but promtool/prometheus not on PATH"
  fi
}
install_prometheus
log "$(prometheus --version 2>&1 | head -n1)"

# ---------------------------------------------------------------- 2. alert rules
if promtool check rules "$ALERTS" >"$WORK/rules.out" 2>&1; then
  pass "promtool check rules grafana/alerts.yml ($(grep -Eo '[0-9]+ rules found' "$WORK/rules.out" || echo 'rules ok'))"
else
  show_log "promtool check rules" "$WORK/rules.out"
  fail "promtool check rules grafana/alerts.yml"
fi

# ---------------------------------------------------------------- 3. dashboard queries
if summary=$(py extract "$DASHBOARD" "$WORK/dashboard-queries.json"); then
  pass "dashboard JSON: $summary, every target has an expr"
else
  abort "dashboard JSON: unreadable, or a panel target without expr (see above)"
fi

# ---------------------------------------------------------------- 4. gateway + traffic
log "starting $BIN serve --demo"
NO_COLOR=1 RUST_BACKTRACE=0 "$BIN" serve --demo --public 127.0.0.1:0 --admin 127.0.0.1:0 \
  >"$WORK/gateway.stdout" 2>"$WORK/gateway.stderr" </dev/null &
GW_PID=$!

addrs=""
deadline=$((SECONDS + GATEWAY_START_TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
  if addrs=$(py parse-stderr "$WORK/gateway.stderr"); then break; fi
  addrs=""
  kill -0 "$GW_PID" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$addrs" ]; then
  show_log "gateway stderr" "$WORK/gateway.stderr"
  if kill -0 "$GW_PID" 2>/dev/null; then
    abort "gateway printed no 'listening public=… admin=…' and 'token: …' lines within ${GATEWAY_START_TIMEOUT}s"
  fi
  abort "gateway exited before printing its addresses"
fi
read -r PUBLIC ADMIN TOKEN <<<"$addrs"
pass "gateway started: public=$PUBLIC admin=$ADMIN (token parsed, ${#TOKEN} chars)"

# The pool gateway: echo mode has no backend series; this one proxies to
# the demo (whose upgrades it answers 401: the backend is taken out, which
# is the state the backend panels and alerts exist for).
cat >"$WORK/pool.toml" <<EOF
[listen]
public = "127.0.0.1:0"
admin = "127.0.0.1:0"
[auth]
hmac_secret = "check-dashboard-pool-secret-0123456789"
[revocation]
path = "$WORK/pool-revocations.log"
[upstream]
backends = ["ws://$PUBLIC/"]
health_interval_ms = 500
EOF
NO_COLOR=1 RUST_BACKTRACE=0 "$BIN" serve --config "$WORK/pool.toml" \
  >"$WORK/pool.stdout" 2>"$WORK/pool.stderr" </dev/null &
POOL_PID=$!
POOL_ADMIN=""
deadline=$((SECONDS + GATEWAY_START_TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
  POOL_ADMIN=$(grep -o 'admin=[0-9.:]*' "$WORK/pool.stderr" 2>/dev/null | head -1 | cut -d= -f2 || true)
  [ -n "$POOL_ADMIN" ] && break
  kill -0 "$POOL_PID" 2>/dev/null || break
  sleep 0.2
done
if [ -z "$POOL_ADMIN" ]; then
  show_log "pool gateway stderr" "$WORK/pool.stderr"
  abort "the pool gateway printed no 'listening ... admin=...' line"
fi
pass "pool gateway started: admin=$POOL_ADMIN"

UPGRADE=(-H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13'
         -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==')

# status of the first response line, or 000; never fails (a 101 stays open
# until --max-time, which curl reports as exit 28).
http_status() {
  local out first
  out=$(curl -s -i --max-time "$@" 2>/dev/null || true)
  first=${out%%$'\n'*}
  first=${first%$'\r'}
  local -a words
  read -r -a words <<<"$first"
  printf '%s' "${words[1]:-000}"
}

TRAFFIC_OK=0
TRAFFIC_BAD=0
expect() { # expect WHAT WANT GOT
  if [ "$2" = "$3" ]; then
    TRAFFIC_OK=$((TRAFFIC_OK + 1))
  else
    TRAFFIC_BAD=$((TRAFFIC_BAD + 1))
    warn "traffic: $1 answered $3, expected $2"
  fi
}

send_traffic() {
  local _
  for _ in 1 2 3; do
    expect "plain GET /nothing-here" 404 "$(http_status 2 "http://$PUBLIC/nothing-here")"
  done
  for _ in 1 2 3; do
    expect "upgrade without token" 401 "$(http_status 2 "${UPGRADE[@]}" "http://$PUBLIC/")"
  done
  expect "upgrade with a bad token" 401 \
    "$(http_status 2 "${UPGRADE[@]}" -H 'Authorization: Bearer not.a.jwt' "http://$PUBLIC/")"
  expect "upgrade with version 8" 426 \
    "$(http_status 2 -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 8' \
        -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' "http://$PUBLIC/")"
  for _ in 1 2 3; do
    expect "upgrade with the demo token" 101 \
      "$(http_status 1 "${UPGRADE[@]}" -H "Authorization: Bearer $TOKEN" "http://$PUBLIC/")"
  done
  if py ws-echo "$PUBLIC" "$TOKEN" 3 >"$WORK/ws-echo.out" 2>&1; then
    TRAFFIC_OK=$((TRAFFIC_OK + 1))
  else
    TRAFFIC_BAD=$((TRAFFIC_BAD + 1))
    warn "traffic: WebSocket echo session failed: $(tr '\n' ' ' <"$WORK/ws-echo.out")"
  fi
}
send_traffic
log "traffic round 1: $TRAFFIC_OK as expected, $TRAFFIC_BAD not"
sleep 0.5   # let the gateway record the closed sessions

# ---------------------------------------------------------------- 5. /metrics + promtool check metrics
if ! curl -sS --fail --max-time 5 "http://$ADMIN/metrics" -o "$WORK/metrics.txt" 2>"$WORK/scrape.err"; then
  show_log "curl" "$WORK/scrape.err"
  abort "scrape of http://$ADMIN/metrics failed"
fi
pass "scraped http://$ADMIN/metrics ($(grep -vc '^#' "$WORK/metrics.txt" || true) samples)"

rc=0
promtool check metrics <"$WORK/metrics.txt" >"$WORK/promtool-metrics.out" 2>&1 || rc=$?
if lint=$(py lint "$rc" "$WORK/promtool-metrics.out" 2>"$WORK/lint.err"); then
  pass "promtool check metrics on the scrape: $lint"
else
  fail "promtool check metrics on the scrape: ${lint:-fatal problems}"
fi
while IFS= read -r line; do
  case "$line" in
    *"style lint (not fatal): "*) warn "promtool check metrics: ${line#*: }" ;;
    *FATAL:*) fail "promtool check metrics: ${line#*FATAL: }" ;;
  esac
done <"$WORK/lint.err"

# ---------------------------------------------------------------- 6. names in the dashboard vs the scrape
if ! curl -sS --fail --max-time 5 "http://$POOL_ADMIN/metrics" -o "$WORK/pool-metrics.txt" 2>"$WORK/scrape.err"; then
  show_log "curl" "$WORK/scrape.err"
  abort "scrape of the pool gateway http://$POOL_ADMIN/metrics failed"
fi
cat "$WORK/metrics.txt" "$WORK/pool-metrics.txt" >"$WORK/all-metrics.txt"
if names=$(py names "$WORK/all-metrics.txt" "$WORK/dashboard-queries.json"); then
  pass "dashboard metric names: $names"
else
  fail "dashboard metric names: $names"
fi

# ---------------------------------------------------------------- 7. a real Prometheus
PROM_PORT=$(py freeport)
[ "$PROM_PORT" != 9090 ] || PROM_PORT=$(py freeport)
PROM=http://127.0.0.1:$PROM_PORT
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ALERTS
scrape_configs:
  - job_name: portcullis
    static_configs:
      - targets: ["$ADMIN", "$POOL_ADMIN"]
EOF
log "starting prometheus on 127.0.0.1:$PROM_PORT"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn \
  >"$WORK/prometheus.log" 2>&1 </dev/null &
PROM_PID=$!

ready=0
deadline=$((SECONDS + PROM_READY_TIMEOUT))
while [ $SECONDS -lt $deadline ]; do
  if curl -sf --max-time 1 "$PROM/-/ready" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$PROM_PID" 2>/dev/null || break
  sleep 0.3
done
if [ $ready = 0 ]; then
  show_log "prometheus" "$WORK/prometheus.log"
  abort "prometheus not ready within ${PROM_READY_TIMEOUT}s"
fi

if up=$(py wait-query "$PROM" 'up{job="portcullis"}' 1 "$PROM_UP_TIMEOUT"); then
  pass "prometheus scrapes the gateway: $up"
else
  show_log "prometheus" "$WORK/prometheus.log"
  abort "prometheus did not scrape the gateway (up != 1) within ${PROM_UP_TIMEOUT}s"
fi

# A second round of traffic while Prometheus watches, so rate() has something
# to show; then enough scrapes for 1m windows to hold several points.
send_traffic
py wait-query "$PROM" 'count_over_time(up{job="portcullis"}[1m])' 4 20 >/dev/null \
  || warn "fewer than 4 scrapes after 20 s; rate() queries may return no data"

if rules=$(py rules "$PROM" "$WORK/rule-queries.json" 20); then
  pass "alert rules in Prometheus: $rules"
else
  fail "alert rules in Prometheus: ${rules:-not evaluated} (see above)"
fi

if [ -s "$WORK/rule-queries.json" ]; then
  if names=$(py names "$WORK/all-metrics.txt" "$WORK/rule-queries.json"); then
    pass "alert rule metric names: $names"
  else
    fail "alert rule metric names: $names"
  fi
fi

evaluate() { # evaluate WHAT FILE
  local res
  if res=$(py evaluate "$PROM" "$2" 2>"$WORK/eval-$1.err"); then
    printf '%s\n' "$res" | sed '$d' | sed 's/^/    /' >&2
    pass "$1 evaluated by Prometheus: $(printf '%s\n' "$res" | tail -n1)"
  else
    printf '%s\n' "$res" | sed '$d' | sed 's/^/    /' >&2
    cat "$WORK/eval-$1.err" >&2
    fail "$1 evaluated by Prometheus: $(printf '%s\n' "$res" | tail -n1)"
  fi
}
evaluate "dashboard queries" "$WORK/dashboard-queries.json"
[ -s "$WORK/rule-queries.json" ] && evaluate "alert rule exprs" "$WORK/rule-queries.json"

if [ $TRAFFIC_BAD -gt 0 ]; then
  warn "traffic: $TRAFFIC_BAD request(s) answered otherwise than expected (the metrics checks do not depend on it)"
fi
kill -0 "$GW_PID" 2>/dev/null || fail "the gateway exited during the check"

if [ ${#FAILURES[@]} -gt 0 ]; then
  show_log "gateway stderr" "$WORK/gateway.stderr"
  show_log "prometheus" "$WORK/prometheus.log"
fi
summary_and_exit
