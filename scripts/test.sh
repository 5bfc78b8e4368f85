#!/usr/bin/env bash
# The project's test command (README "Testing"): installs what the tests
# need when it is missing, then runs the whole suite.
#   ./scripts/test.sh            everything
#   ./scripts/test.sh -- <args>  extra arguments for `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# redis-server (its package brings redis-tools: redis-cli, which the Cluster test uses to create the cluster).
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-server redis-tools)
# A real browser: the demo page's test (tests/demo_page.rs), and a browser's
# view of the subprotocol the 101 names (tests/backends.rs).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "test.sh: installing ${need_apt[*]} from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  # Never start the packaged services: the tests start their own on free ports.
  had_policy=0
  [ -e /usr/sbin/policy-rc.d ] && had_policy=1 && cp /usr/sbin/policy-rc.d /tmp/policy-rc.d.bak
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ $had_policy = 1 ]; then mv /tmp/policy-rc.d.bak /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
fi

# Python's `websockets`: the deflate-capable peer of the relay tests.
python3 -c "import websockets" 2>/dev/null || python3 -m pip install -q websockets
# Autobahn|Testsuite for the echo-mode conformance run below (Python 2.7).
PY2=$(PYENV_VERSION=2.7.18 pyenv which python2.7 2>/dev/null || command -v python2.7 || true)
if [ ! -x "$HOME/.local/bin/wstest" ] && [ -n "$PY2" ]; then
  "$PY2" -m pip install -q --user autobahntestsuite
fi
# Its masking and UTF-8 validation in C rather than Python: the compression
# cases (12.*, 13.*) send 1,000 messages each.
if [ -n "$PY2" ] && ! "$PY2" -c "import wsaccel" 2>/dev/null; then
  "$PY2" -m pip install -q --user wsaccel || echo "test.sh: wsaccel not installed; Autobahn runs slower"
fi

# The certified OpenID provider (Node's `oidc-provider`) for
# tests/oidc_provider.rs, which skips with a message without it.
if command -v npm >/dev/null 2>&1 && [ ! -d scripts/oidc-provider/node_modules/oidc-provider ]; then
  npm install --prefix scripts/oidc-provider --no-audit --no-fund --silent \
    || echo "test.sh: oidc-provider not installed; tests/oidc_provider.rs will skip"
fi

shift_args=()
if [ "${1:-}" = "--" ]; then shift; shift_args=("$@"); fi

bash scripts/check-module-cycles.sh
cargo build --locked --bin portcullis
# The load tester's tests also run against the real gateway binary.
PORTCULLIS_BIN="$PWD/target/debug/portcullis" cargo test --workspace --locked "${shift_args[@]}"
bash scripts/check-dashboard.sh target/debug/portcullis
# WebSocket conformance of echo mode: every case OK or informational.
PORTCULLIS_BIN="$PWD/target/debug/portcullis" bash scripts/autobahn.sh
