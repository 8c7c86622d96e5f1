#!/usr/bin/env bash
# Interop with real peers: Credo 0.6.3 and ACA-Py 1.7.0 agents using a mediator.
#
#   scripts/interop.sh                      # against mailroom ($MAILROOM_BIN, default target/debug/mailroom)
#   INTEROP_MEDIATOR=credo scripts/interop.sh   # against Credo 0.6.3's own mediator (reference)
#   INTEROP_MEDIATOR=acapy scripts/interop.sh   # against ACA-Py 1.7.0 as mediator (reference)
#
# Knobs: INTEROP_STRATEGY (QueueAndLiveModeDelivery | QueueOnly | DirectDelivery),
# INTEROP_SCENARIOS (comma-separated name prefixes, e.g. s1-PickUpV2,s3), INTEROP_COUNT (20),
# INTEROP_OFFLINE_COUNT (100), INTEROP_VERBOSE=1, INTEROP_KEEP=1 (keep the temp dir),
# INTEROP_NO_SKIP=1 (also run what a reference mediator is known not to pass), INTEROP_REPEAT=N,
# INTEROP_LOG=error|warn|info|debug (Credo agents' log level; their logs stay in the work dir),
# MAILROOM_CACHE (where the askar library and the ACA-Py venv are cached).
#
# Installs what it needs (scripts/interop-setup.sh, idempotent), picks free ports on 127.0.0.1,
# writes the mediator's config into a temp dir, starts the mediator and records its PID,
# waits for its readiness endpoint, runs tests/interop/run.py, ends that PID. The last line
# is `N passed, N failed`; the exit code is non-zero if anything failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MEDIATOR=${INTEROP_MEDIATOR:-mailroom}
STRATEGY=${INTEROP_STRATEGY:-QueueAndLiveModeDelivery}
T_START=$(date +%s)

say() { echo "[interop] $*"; }
SUMMARY=""      # "PASSED FAILED" once the scenarios ran; the closing line is printed last, in cleanup
fail_setup() { say "$*"; SUMMARY="0 1"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-interop.XXXXXX")
MED_PID=""
RUN_PID=""
cleanup() {
  local rc=$?
  # The scenario runner ends the agents it started when it gets SIGTERM.
  if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill "$RUN_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -n "$MED_PID" ] && kill -0 "$MED_PID" 2>/dev/null; then
    kill "$MED_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$MED_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$MED_PID" 2>/dev/null || true
  fi
  if [ "$rc" = 0 ] && [ "${INTEROP_KEEP:-0}" != 1 ]; then rm -rf "${WORK:-/nonexistent}"; elif [ -n "${WORK:-}" ]; then say "logs kept in $WORK"; fi
  [ -n "$SUMMARY" ] || SUMMARY="0 1"
  set -- $SUMMARY
  if [ "${3:-0}" != 0 ]; then echo "$1 passed, $2 failed, $3 skipped"; else echo "$1 passed, $2 failed"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------- install
setup_out=$(bash "$ROOT/scripts/interop-setup.sh") || fail_setup "setup failed (see above)"
env_line=$(printf '%s\n' "$setup_out" | tail -n1)
LIB_ASKAR_PATH=$(printf '%s' "$env_line" | sed -n 's/.*LIB_ASKAR_PATH=\([^ ]*\).*/\1/p')
ACAPY_BIN=$(printf '%s' "$env_line" | sed -n 's/.*ACAPY_BIN=\([^ ]*\).*/\1/p')
export LIB_ASKAR_PATH ACAPY_BIN
# INTEROP_V2=1: the v2 peers (Veramo, Indicio's didcomm-messaging) for the v2 scenarios.
VERAMO_DIR=$(printf '%s' "$env_line" | sed -n 's/.*VERAMO_DIR=\([^ ]*\).*/\1/p')
INDICIO_PYTHON=$(printf '%s' "$env_line" | sed -n 's/.*INDICIO_PYTHON=\([^ ]*\).*/\1/p')
export VERAMO_DIR INDICIO_PYTHON
# The scenario runner needs only the standard library: the ACA-Py venv's Python, else python3.
if [ -n "$ACAPY_BIN" ]; then PY=$(dirname "$ACAPY_BIN")/python; else PY=$(command -v python3); fi
say "setup ready in $(( $(date +%s) - T_START ))s"

# The wallet-side push plugin (@credo-ts/push-notifications 0.7.1 on Credo 0.6.3, issue 7):
# set-device-info acked, get-device-info returns the token, a forward while it is offline
# reaches the FCM stand-in with that token (5-10 s). Required here: no skip.
say "push plugin: Credo 0.6.3 + @credo-ts/push-notifications 0.7.1 (tests/push_credo.rs)"
(cd "$ROOT" && PUSH_CREDO_REQUIRED=1 cargo test --locked --test push_credo -q) || fail_setup "the Credo push-notifications plugin scenario failed (see above)"



# wait_http URL TIMEOUT_S: polls until URL answers 200 (or the mediator process is gone).
wait_http() {
  local url=$1 timeout=$2 deadline=$(( $(date +%s) + $2 ))
  while :; do
    if "$PY" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; then return 0; fi
    if ! kill -0 "$MED_PID" 2>/dev/null; then say "mediator exited before $url answered"; return 1; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then say "$url not ready after ${timeout}s"; return 1; fi
    sleep 0.2
  done
}
show_med_log() {
  # Distinct lines (timestamps dropped) in order of first appearance, with repeat counts, so a
  # message loop shows as one line and the line that started it stays visible.
  say "mediator log (distinct lines of the last 3000, with counts; full log in $WORK/mediator.log):"
  tail -n 3000 "$WORK/mediator.log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[0-9]\{4\}-[0-9-]*T[0-9:.]*Z *//' \
    | awk '{ if (!($0 in n)) order[++k] = $0; n[$0]++ } END { s = (k > 40) ? k - 39 : 1; for (i = s; i <= k; i++) printf "    %5dx %s\n", n[order[i]], substr(order[i], 1, 380) }'
}

# Never the same port twice (scripts/ports.sh).
# shellcheck source=scripts/ports.sh
. "$ROOT/scripts/ports.sh"
read -r PORT ADMIN_PORT CLUSTER_PORT WS_PORT <<<"$(free_ports 4)"
RUN_ARGS=()
case "$MEDIATOR" in
  mailroom)
    BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
    if [ ! -x "$BIN" ] && [ -z "${MAILROOM_BIN:-}" ]; then
      say "building mailroom (cargo build)"
      (cd "$ROOT" && cargo build -q --bin mailroom) >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail_setup "cargo build failed"; }
    fi
    [ -x "$BIN" ] || fail_setup "no mailroom binary at $BIN (set MAILROOM_BIN)"
    cat >"$WORK/cluster.toml" <<EOF
[cluster]
name = "interop"
secret = "interop-secret"
public_url = "http://127.0.0.1:$PORT"

[store]
backend = "sled"
path = "$WORK/data"

[delivery]
strategy = "$STRATEGY"

# Veramo 7 authcrypts in a form a co-recipient could forge (no tag in the 1PU key
# derivation, no apv): it proves its sender only when the operator accepts it.
[mediator]
v2_legacy_authcrypt = true

[[node]]
id = "n1"
listen = "127.0.0.1:$PORT"
cluster = "127.0.0.1:$CLUSTER_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
EOF
    NO_COLOR=1 "$BIN" run --config "$WORK/cluster.toml" --node n1 >"$WORK/mediator.log" 2>&1 &
    MED_PID=$!
    wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 60 || { show_med_log; fail_setup "mailroom did not become ready"; }
    RUN_ARGS=(--mediator-url "http://127.0.0.1:$PORT" --admin-url "http://127.0.0.1:$ADMIN_PORT")
    ;;
  credo)
    (cd "$ROOT/tests/interop/credo" && exec node mediator.mjs --port "$PORT" --admin-port "$ADMIN_PORT" \
        --data "$WORK/credo-mediator" --strategy "$STRATEGY") >"$WORK/mediator.log" 2>&1 &
    MED_PID=$!
    wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 60 || { show_med_log; fail_setup "Credo mediator did not become ready"; }
    RUN_ARGS=(--mediator-url "http://127.0.0.1:$PORT" --admin-url "http://127.0.0.1:$ADMIN_PORT")
    ;;
  acapy)
    [ -n "$ACAPY_BIN" ] || fail_setup "ACA-Py is not installed (no Python 3.13/3.12)"
    mkdir -p "$WORK/acapy-home"
    ACAPY_HOME="$WORK/acapy-home" "$ACAPY_BIN" start --label acapy-mediator \
      --inbound-transport http 127.0.0.1 "$PORT" --inbound-transport ws 127.0.0.1 "$WS_PORT" \
      --outbound-transport http --outbound-transport ws \
      --endpoint "http://127.0.0.1:$PORT" "ws://127.0.0.1:$WS_PORT" \
      --admin 127.0.0.1 "$ADMIN_PORT" --admin-insecure-mode \
      --wallet-type askar --wallet-name acapy-mediator --wallet-key interop-key --wallet-storage-type default \
      --auto-provision --no-ledger --open-mediation --enable-undelivered-queue \
      --auto-accept-invites --auto-accept-requests --log-level warning >"$WORK/mediator.log" 2>&1 &
    MED_PID=$!
    wait_http "http://127.0.0.1:$ADMIN_PORT/status/ready" 90 || { show_med_log; fail_setup "ACA-Py mediator did not become ready"; }
    INV=$("$PY" - "http://127.0.0.1:$ADMIN_PORT" <<'PYEOF'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/out-of-band/create-invitation?multi_use=true&auto_accept=true",
    data=json.dumps({"handshake_protocols": ["https://didcomm.org/didexchange/1.1"], "use_public_did": False}).encode(),
    headers={"content-type": "application/json"}, method="POST")
print(json.load(urllib.request.urlopen(req, timeout=30))["invitation_url"])
PYEOF
) || { show_med_log; fail_setup "ACA-Py mediator gave no invitation"; }
    RUN_ARGS=(--invitation-url "$INV")
    ;;
  *) fail_setup "INTEROP_MEDIATOR must be mailroom, credo or acapy (got $MEDIATOR)";;
esac
say "$MEDIATOR mediator (pid $MED_PID, strategy $STRATEGY) ready on 127.0.0.1:$PORT after $(( $(date +%s) - T_START ))s"

set +e
INTEROP_MEDIATOR="$MEDIATOR" INTEROP_STRATEGY="$STRATEGY" "$PY" "$ROOT/tests/interop/run.py" "${RUN_ARGS[@]}" --work "$WORK/scenarios" \
  --summary-file "$WORK/summary" --no-summary &
RUN_PID=$!
wait "$RUN_PID"
rc=$?
RUN_PID=""
set -e
SUMMARY=$(cat "$WORK/summary" 2>/dev/null || echo "0 1")
if ! kill -0 "$MED_PID" 2>/dev/null; then
  say "FAIL: the mediator process exited during the run"; show_med_log; rc=1
  set -- $SUMMARY; SUMMARY="$1 $(( $2 + 1 )) ${3:-0}"
elif [ "$rc" != 0 ]; then
  show_med_log
fi
say "total $(( $(date +%s) - T_START ))s"
exit "$rc"
