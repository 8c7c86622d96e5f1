#!/usr/bin/env bash
# Checks of tests/interop/run.py itself, with stand-in agents (no Credo, no ACA-Py, no
# mediator: a few seconds, standard library only):
#   1. SIGTERM, SIGINT and SIGHUP end every agent process the runner started, also when the
#      signal interrupts a scenario's own cleanup (an agent slow to stop);
#   2. scenario names that match nothing (INTEROP_SCENARIOS=nomatch) fail the run;
#   3. a scenario whose peer died of a signal nobody sent it (a segfault) runs once more, and
#      only once; a peer that exits with a code is a plain failure, not rerun.
# Part of scripts/test.sh. Every process here is started by this script and ended by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNPY=$ROOT/tests/interop/run.py
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-runner-check.XXXXXX")
MED_PID=""
FAILS=0
cleanup() {
  local rc=$?
  [ -n "$MED_PID" ] && kill "$MED_PID" 2>/dev/null || true
  # Anything a failed check left behind (recorded PIDs only).
  for f in "$WORK"/*/pids; do
    [ -f "$f" ] || continue
    while read -r p; do kill -9 "$p" 2>/dev/null || true; done <"$f"
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
say() { echo "[runner-check] $*"; }
fail() { say "FAIL: $*"; FAILS=$((FAILS + 1)); }

# A stand-in mediator: GET /invitation answers an invitation URL (never used by the fakes).
cat >"$WORK/mediator.py" <<'PYEOF'
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"invitation_url": "http://127.0.0.1:9/?oob=e30", "invitation": {}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
PYEOF
"$PY" "$WORK/mediator.py" >"$WORK/port" &
MED_PID=$!
for _ in $(seq 1 100); do [ -s "$WORK/port" ] && break; sleep 0.05; done
MED_URL="http://127.0.0.1:$(cat "$WORK/port")"

# Stand-ins for `node agent.mjs` (the runner's NODE): "starting" never gets ready; "slow" is
# ready at once with a control URL nobody answers (the scenario fails and its cleanup begins)
# and takes 8 s to stop after SIGTERM, longer than the runner waits for it.
cat >"$WORK/starting.sh" <<'SH'
#!/usr/bin/env bash
echo $$ >>"$CHECK_PIDS"
exec sleep 300
SH
cat >"$WORK/slow.sh" <<'SH'
#!/usr/bin/env bash
echo $$ >>"$CHECK_PIDS"
echo 'READY {"control": "http://127.0.0.1:9"}'
trap 'echo $$ >>"$CHECK_STOPPING"; sleep 8; exit 0' TERM
while :; do sleep 0.2; done
SH
# "segv" dies of SIGSEGV before it is ready (as a native crash in a peer's wallet would);
# "exits" exits with code 3.
cat >"$WORK/segv.sh" <<'SH'
#!/usr/bin/env bash
echo $$ >>"$CHECK_PIDS"
ulimit -c 0
exec python3 -c 'import os, signal; os.kill(os.getpid(), signal.SIGSEGV)'
SH
cat >"$WORK/exits.sh" <<'SH'
#!/usr/bin/env bash
echo $$ >>"$CHECK_PIDS"
exit 3
SH
chmod +x "$WORK/starting.sh" "$WORK/slow.sh" "$WORK/segv.sh" "$WORK/exits.sh"

# signal_check NAME FAKE SIGNAL WAIT_FOR: runs one Credo scenario with FAKE agents, sends
# SIGNAL once WAIT_FOR is true, and requires the runner to exit with every agent ended.
signal_check() {
  local name=$1 fake=$2 sig=$3 wait_for=$4 d="$WORK/$1" pid i
  mkdir -p "$d"; : >"$d/pids"
  CHECK_PIDS="$d/pids" CHECK_STOPPING="$d/stopping" NODE="$WORK/$fake" "$PY" "$RUNPY" --mediator-url "$MED_URL" \
    --scenarios s1-PickUpV2LiveMode --work "$d/w" >"$d/out" 2>&1 &
  pid=$!
  for i in $(seq 1 400); do
    if [ "$(wc -l <"$d/pids")" -ge 2 ] && eval "$wait_for"; then break; fi
    sleep 0.05
  done
  if ! { [ "$(wc -l <"$d/pids")" -ge 2 ] && eval "$wait_for"; }; then
    fail "$name: the runner did not get to the point to check (2 agents started, $wait_for)"
    sed 's/^/    | /' "$d/out"; kill -9 "$pid"; return
  fi
  kill "-$sig" "$pid"
  for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then fail "$name: runner still running 15 s after SIG$sig"; kill -9 "$pid"; fi
  wait "$pid" 2>/dev/null || true
  local left=()
  while read -r p; do kill -0 "$p" 2>/dev/null && left+=("$p"); done <"$d/pids"
  if [ "${#left[@]}" -gt 0 ]; then
    fail "$name: SIG$sig left agent processes running: ${left[*]}"; sed 's/^/    | /' "$d/out"
  else
    say "ok: $name (SIG$sig): every agent ended"
  fi
}

signal_check term-while-starting starting.sh TERM true
signal_check int-while-starting starting.sh INT true
signal_check hup-while-starting starting.sh HUP true
# The scenario fails at once (nobody answers the control URL) and its cleanup waits on the
# slow agent: the signal lands inside that cleanup.
signal_check term-during-cleanup slow.sh TERM '[ -s "$d/stopping" ]'

# Scenario selections that match nothing are a failure, not "0 passed, 0 failed".
for sel in nomatch "s1-PickUpV2LiveMode,nomatch"; do
  d="$WORK/select-${sel//[^a-z0-9]/_}"; mkdir -p "$d"
  set +e
  CHECK_PIDS="$d/pids" NODE="$WORK/starting.sh" INTEROP_SCENARIOS="$sel" "$PY" "$RUNPY" \
    --mediator-url "$MED_URL" --work "$d/w" --summary-file "$d/summary" >"$d/out" 2>&1
  rc=$?
  set -e
  if [ "$rc" != 0 ] && grep -q "match no scenario" "$d/out" && [ "$(cat "$d/summary")" = "0 1" ]; then
    say "ok: INTEROP_SCENARIOS=$sel fails (exit $rc)"
  else
    fail "INTEROP_SCENARIOS=$sel: exit $rc, summary '$(cat "$d/summary" 2>/dev/null)'"; sed 's/^/    | /' "$d/out"
  fi
done

# A peer's crash: one rerun, said on a RERUN line, and a second failure counts.
for fake in segv exits; do
  d="$WORK/crash-$fake"; mkdir -p "$d"; : >"$d/pids"
  set +e
  CHECK_PIDS="$d/pids" NODE="$WORK/$fake.sh" "$PY" "$RUNPY" --mediator-url "$MED_URL" \
    --scenarios s1-PickUpV2LiveMode --work "$d/w" --summary-file "$d/summary" >"$d/out" 2>&1
  rc=$?
  set -e
  reruns=$(grep -c '^RERUN ' "$d/out" || true)
  crashes=$(grep -c '^RERUN s1-PickUpV2LiveMode: .*killed by SIGSEGV' "$d/out" || true)
  # Each run of the scenario starts two agents.
  want=1 agents=4; [ "$fake" = exits ] && want=0 agents=2
  if [ "$rc" != 0 ] && [ "$reruns" = "$want" ] && [ "$crashes" = "$want" ] && [ "$(wc -l <"$d/pids")" = "$agents" ] \
    && [ "$(cat "$d/summary")" = "0 1 0" ] && grep -q '^FAIL s1-PickUpV2LiveMode' "$d/out"; then
    say "ok: a peer that $([ "$fake" = segv ] && echo 'dies of SIGSEGV is rerun once' || echo 'exits with a code is not rerun')"
  else
    fail "$fake: exit $rc, $reruns RERUN lines (want $want), $(wc -l <"$d/pids") agents started (want $agents), summary '$(cat "$d/summary" 2>/dev/null)'"
    sed 's/^/    | /' "$d/out"
  fi
done

[ "$FAILS" = 0 ] || { say "$FAILS checks failed"; exit 1; }
say "all checks passed"
