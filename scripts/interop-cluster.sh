#!/usr/bin/env bash
# Real Credo 0.6.3 agents through the nginx front of a 3-node mailroom cluster on PostgreSQL
# (scripts/cluster.sh with a generated config: free ports on 127.0.0.1, a fresh database).
# nginx round-robins every request, so the wallet's socket and the sender's forwards land on
# different nodes: the credo-ts #1625 situation. Last line: `N passed, N failed`.
#
# MAILROOM_BIN (default target/debug/mailroom), INTEROP_SCENARIOS (default the live-mode,
# polled and offline Credo scenarios), INTEROP_KEEP=1 keeps the work dir.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
SCENARIOS=${INTEROP_SCENARIOS:-s1-PickUpV2LiveMode,s1-PickUpV2,s2-offline}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-interop-cluster.XXXXXX")
DB="mailroom_interop_$$"
SUMMARY=""
cleanup() {
  local rc=$?
  CLUSTER_CONFIG="$WORK/cluster.toml" CLUSTER_RUN="$WORK/run" MAILROOM_BIN="$BIN" scripts/cluster.sh down >/dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ] && [ "${INTEROP_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "[interop-cluster] logs kept in $WORK"; fi
  [ -n "$SUMMARY" ] || SUMMARY="0 1"
  set -- $SUMMARY
  echo "$1 passed, $2 failed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setup_out=$(bash scripts/interop-setup.sh)
env_line=$(printf '%s\n' "$setup_out" | tail -n1)
LIB_ASKAR_PATH=$(printf '%s' "$env_line" | sed -n 's/.*LIB_ASKAR_PATH=\([^ ]*\).*/\1/p')
ACAPY_BIN=$(printf '%s' "$env_line" | sed -n 's/.*ACAPY_BIN=\([^ ]*\).*/\1/p')
export LIB_ASKAR_PATH ACAPY_BIN
scripts/ensure-postgres.sh
[ -x "$BIN" ] || cargo build --locked --bin mailroom

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LB=$(port)
{
  printf '[cluster]\nname = "interop"\nsecret = "interop-cluster-secret"\npublic_url = "http://127.0.0.1:%s"\n' "$LB"
  printf '[store]\nbackend = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/%s"\npool_size = 4\n' "$DB"
  for i in 1 2 3; do
    printf '[[node]]\nid = "n%s"\nlisten = "127.0.0.1:%s"\ncluster = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\n' "$i" "$(port)" "$(port)" "$(port)"
  done
} > "$WORK/cluster.toml"
CLUSTER_CONFIG="$WORK/cluster.toml" CLUSTER_RUN="$WORK/run" MAILROOM_BIN="$BIN" scripts/cluster.sh up | sed 's/^/[interop-cluster] /'

if [ -n "$ACAPY_BIN" ]; then PY=$(dirname "$ACAPY_BIN")/python; else PY=$(command -v python3); fi
set +e
INTEROP_MEDIATOR=mailroom "$PY" tests/interop/run.py --mediator-url "http://127.0.0.1:$LB" \
  --mediator-name "mailroom cluster behind nginx" --scenarios "$SCENARIOS" \
  --work "$WORK/scenarios" --summary-file "$WORK/summary" --no-summary
rc=$?
set -e
SUMMARY=$(cat "$WORK/summary" 2>/dev/null || echo "0 1")
# Every node took part: the wallet and the senders were spread over the cluster.
for f in "$WORK"/run/n[0-9]*.log; do
  echo "[interop-cluster] $(basename "$f" .log): $(grep -c 'session bound' "$f" || true) sessions bound, $(grep -c 'refused' "$f" || true) refusals"
done
exit "$rc"
