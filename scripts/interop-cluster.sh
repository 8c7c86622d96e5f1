#!/usr/bin/env bash
# Real Credo 0.6.3 agents through the nginx front of a 3-node mailroom cluster on PostgreSQL
# (scripts/cluster.sh with a generated config: free ports on 127.0.0.1, a fresh database).
# nginx round-robins every request, so the wallet's socket and the sender's forwards land on
# different nodes: the credo-ts #1625 situation. Last line: `N passed, N failed`.
#
# MAILROOM_BIN (default target/debug/mailroom), INTEROP_SCENARIOS (default the live-mode,
# polled and offline Credo scenarios and s6-drain: the node holding the live wallet's socket is
# drained, the wallet must reconnect to another node and get everything), INTEROP_KEEP=1 keeps
# the work dir.
#
# nginx routes around a node that fails (max_fails, proxy_next_upstream), so the scenarios can
# pass with a node down: after them, every node must still be running and must have served
# forwards or deliveries (its admin /metrics), or the run fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
SCENARIOS=${INTEROP_SCENARIOS:-s1-PickUpV2LiveMode,s1-PickUpV2,s2-offline,s6-drain}
# INTEROP_V2=1: the v2 wallets' sockets and the senders' forwards land on different nodes too.
if [ "${INTEROP_V2:-0}" = 1 ] && [ -z "${INTEROP_SCENARIOS:-}" ]; then SCENARIOS="$SCENARIOS,v2"; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-interop-cluster.XXXXXX")
DB="mailroom_interop_$$"
SUMMARY=""
RUN_PID=""
cleanup() {
  local rc=$?
  # The scenario runner ends the agents it started when it gets SIGTERM.
  if [ -n "$RUN_PID" ] && kill -0 "$RUN_PID" 2>/dev/null; then
    kill "$RUN_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$RUN_PID" 2>/dev/null || break; sleep 0.1; done
  fi
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
VERAMO_DIR=$(printf '%s' "$env_line" | sed -n 's/.*VERAMO_DIR=\([^ ]*\).*/\1/p')
INDICIO_PYTHON=$(printf '%s' "$env_line" | sed -n 's/.*INDICIO_PYTHON=\([^ ]*\).*/\1/p')
export VERAMO_DIR INDICIO_PYTHON
scripts/ensure-postgres.sh
[ -x "$BIN" ] || cargo build --locked --bin mailroom

# Ten free ports on 127.0.0.1, none the same (scripts/ports.sh).
# shellcheck source=scripts/ports.sh
. "$ROOT/scripts/ports.sh"
read -r -a PORTS <<<"$(free_ports 10)"
LB=${PORTS[0]}
NODES=(n1 n2 n3)
declare -A ADMIN
{
  printf '[cluster]\nname = "interop"\nsecret = "interop-cluster-secret"\npublic_url = "http://127.0.0.1:%s"\n' "$LB"
  printf '[store]\nbackend = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/%s"\npool_size = 4\n' "$DB"
  # Veramo 7's authcrypt (no tag in the 1PU key derivation) proves its sender only if accepted.
  printf '[mediator]\nv2_legacy_authcrypt = true\n'
  i=1
  for id in "${NODES[@]}"; do
    ADMIN[$id]=127.0.0.1:${PORTS[i]}
    printf '[[node]]\nid = "%s"\nlisten = "127.0.0.1:%s"\ncluster = "127.0.0.1:%s"\nadmin = "%s"\n' "$id" "${PORTS[i+1]}" "${PORTS[i+2]}" "${ADMIN[$id]}"
    i=$((i + 3))
  done
} > "$WORK/cluster.toml"
CLUSTER_CONFIG="$WORK/cluster.toml" CLUSTER_RUN="$WORK/run" MAILROOM_BIN="$BIN" scripts/cluster.sh up | sed 's/^/[interop-cluster] /'

if [ -n "$ACAPY_BIN" ]; then PY=$(dirname "$ACAPY_BIN")/python; else PY=$(command -v python3); fi
set +e
INTEROP_MEDIATOR=mailroom "$PY" tests/interop/run.py --mediator-url "http://127.0.0.1:$LB" \
  --mediator-name "mailroom cluster behind nginx" --scenarios "$SCENARIOS" \
  --node-admin-urls "$(for id in "${NODES[@]}"; do printf 'http://%s,' "${ADMIN[$id]}"; done)" \
  --work "$WORK/scenarios" --summary-file "$WORK/summary" --no-summary &
RUN_PID=$!
wait "$RUN_PID"
rc=$?
RUN_PID=""
set -e
SUMMARY=$(cat "$WORK/summary" 2>/dev/null || echo "0 1")
# Every node is still running and took part: nginx would have hidden a node that died or was
# never reached. "Took part" = forwards received + messages delivered + acknowledged, from the
# node's own admin /metrics.
metric_sum() { # TEXT NAME: sum of the samples of counter NAME (any labels)
  printf '%s\n' "$1" | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $NF } END { printf "%d", s }'
}
node_fail=0
for id in "${NODES[@]}"; do
  log="$WORK/run/$id.log"
  pid=$(cat "$WORK/run/$id.pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "[interop-cluster] FAIL: node $id (pid ${pid:-?}) is not running after the scenarios; last lines of its log:"
    tail -n 20 "$log" 2>/dev/null | sed 's/^/    | /'
    node_fail=1
    continue
  fi
  if ! m=$(curl -fsS --max-time 10 "http://${ADMIN[$id]}/metrics"); then
    echo "[interop-cluster] FAIL: node $id does not answer its admin /metrics"
    node_fail=1
    continue
  fi
  fwd=$(metric_sum "$m" mailroom_forwards_received_total)
  del=$(metric_sum "$m" mailroom_delivered_total)
  ack=$(metric_sum "$m" mailroom_acknowledged_total)
  echo "[interop-cluster] $id: $fwd forwards received, $del delivered, $ack acknowledged," \
    "$(grep -c 'session bound' "$log" || true) sessions bound, $(grep -c 'refused' "$log" || true) refusals"
  if [ $((fwd + del + ack)) -eq 0 ]; then
    echo "[interop-cluster] FAIL: node $id served nothing (no forward, delivery or acknowledgement)"
    node_fail=1
  fi
done
if [ "$node_fail" != 0 ]; then
  set -- $SUMMARY
  SUMMARY="$1 $(( $2 + 1 ))"
  rc=1
fi
exit "$rc"
