#!/usr/bin/env bash
# Chaos under load, as an operator reruns it: a 3-node mailroom cluster on PostgreSQL behind
# nginx (free ports on 127.0.0.1, a fresh database, a temp dir), a steady load of forwards from
# several senders to wallets that are live (WebSocket live mode), polling (pickup 2.0 over
# HTTP) and offline-then-back, while nodes are killed (-9) and restarted, a node's cluster
# links are cut and restored (a TCP proxy per ordered pair of nodes, in the driver), and the
# machine's PostgreSQL is restarted. Prints sent / accepted / delivered / lost / duplicated,
# delivery latency, and the time each fault took to heal. Exits 1 if any forward answered 2xx
# was never delivered (it lists them), reached the wrong wallet, or a node died on its own.
#
#   scripts/chaos.sh [--duration 60s] [--rate 20] [--seed N] [--keep] [driver options]
#
# Driver options (examples/chaos/, `--help`): --senders --live --polling --offline
# --faults kill,cut,pg --fault-gap 3s --hold 6s --drain 60s --heal-within 45s. MAILROOM_BIN
# (default target/debug/mailroom, built first), CHAOS_LEASE_MS (default 5000: a message
# leased by a killed node is deliverable again after it; the default 30 s would only make the
# final drain longer).
# PostgreSQL is restarted with pg_ctlcluster (the machine's own server, on 127.0.0.1:5432);
# whatever happens, it is running again when the script ends.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
LEASE_MS=${CHAOS_LEASE_MS:-5000}
KEEP=0
DRIVER_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) DRIVER_ARGS+=("$1"); shift ;;
  esac
done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-chaos.XXXXXX")
RUN="$WORK/run"
mkdir -p "$RUN"
DB="mailroom_chaos_$$"
PGVER=$(ls /etc/postgresql 2>/dev/null | head -n1 || true)
DRIVER_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill "$DRIVER_PID" 2>/dev/null || true
    wait "$DRIVER_PID" 2>/dev/null || true
  fi
  # nginx and every node (pid files in $RUN, written by the driver at each (re)start).
  echo "[chaos] stopping nginx and the nodes (SIGTERM)" >&2
  CLUSTER_CONFIG="$WORK/cluster.toml" CLUSTER_RUN="$RUN" MAILROOM_BIN="$BIN" scripts/cluster.sh down >/dev/null 2>&1 || true
  for f in "$RUN"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  done
  # PostgreSQL must be running at the end, whatever happened.
  scripts/ensure-postgres.sh || echo "[chaos] WARNING: PostgreSQL is not running" >&2
  psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  if [ "$rc" = 0 ] && [ "$KEEP" != 1 ]; then rm -rf "$WORK"; else echo "[chaos] logs kept in $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

scripts/ensure-postgres.sh
PGVER=$(ls /etc/postgresql | head -n1)
# The default binary is rebuilt when the sources changed (a no-op otherwise), so a run never
# tests a stale build; a MAILROOM_BIN given is used as it is.
if [ -z "${MAILROOM_BIN:-}" ]; then cargo build --locked --quiet --bin mailroom; fi
[ -x "$BIN" ] || { echo "[chaos] no mailroom binary at $BIN" >&2; exit 2; }
cargo build --locked --quiet --example chaos
DRIVER="$ROOT/target/debug/examples/chaos"
[ -x "$DRIVER" ] || { echo "[chaos] no driver at $DRIVER" >&2; exit 2; }

# Free ports (scripts/ports.sh): the load balancer; per node listen, admin, cluster; one proxy
# per ordered pair of nodes.
NODES=(n1 n2 n3)
N=${#NODES[@]}
# shellcheck source=scripts/ports.sh
. "$ROOT/scripts/ports.sh"
read -r -a PORTS <<<"$(free_ports $((1 + 3 * N + N * (N - 1))))"
LB=${PORTS[0]}
declare -A LISTEN ADMIN CLUSTER PROXY
i=1
for id in "${NODES[@]}"; do
  LISTEN[$id]=127.0.0.1:${PORTS[$i]}; ADMIN[$id]=127.0.0.1:${PORTS[$((i + 1))]}; CLUSTER[$id]=127.0.0.1:${PORTS[$((i + 2))]}
  i=$((i + 3))
done
for a in "${NODES[@]}"; do for b in "${NODES[@]}"; do
  [ "$a" = "$b" ] && continue
  PROXY[$a.$b]=127.0.0.1:${PORTS[$i]}; i=$((i + 1))
done; done

# One config per node: the same cluster, but each node reaches each peer's cluster port
# through the proxy of that pair. cluster.toml (real addresses) is what nginx and `down` read.
common() {
  printf '[cluster]\nname = "chaos"\nsecret = "chaos-cluster-secret"\npublic_url = "http://127.0.0.1:%s"\n' "$LB"
  printf '[store]\nbackend = "postgres"\nurl = "postgres://postgres@127.0.0.1:5432/%s"\npool_size = 4\n' "$DB"
  printf '[delivery]\nlease_ms = %s\n' "$LEASE_MS"
}
node_entry() { printf '[[node]]\nid = "%s"\nlisten = "%s"\ncluster = "%s"\nadmin = "%s"\n' "$1" "${LISTEN[$1]}" "$2" "${ADMIN[$1]}"; }
{ common; for id in "${NODES[@]}"; do node_entry "$id" "${CLUSTER[$id]}"; done; } > "$WORK/cluster.toml"
for me in "${NODES[@]}"; do
  { common
    for id in "${NODES[@]}"; do
      if [ "$id" = "$me" ]; then node_entry "$id" "${CLUSTER[$id]}"; else node_entry "$id" "${PROXY[$me.$id]}"; fi
    done
  } > "$RUN/$me.toml"
  "$BIN" check-config --config "$RUN/$me.toml" >/dev/null
done
{
  printf '{"public_url": "http://127.0.0.1:%s", "bin": "%s", "run_dir": "%s", "lease_ms": %s,\n "nodes": [' "$LB" "$BIN" "$RUN" "$LEASE_MS"
  sep=""
  for id in "${NODES[@]}"; do
    printf '%s\n  {"id": "%s", "listen": "%s", "admin": "%s", "config": "%s"}' "$sep" "$id" "${LISTEN[$id]}" "${ADMIN[$id]}" "$RUN/$id.toml"
    sep=","
  done
  printf '],\n "proxies": ['
  sep=""
  for a in "${NODES[@]}"; do for b in "${NODES[@]}"; do
    [ "$a" = "$b" ] && continue
    printf '%s\n  {"from": "%s", "to": "%s", "listen": "%s", "target": "%s"}' "$sep" "$a" "$b" "${PROXY[$a.$b]}" "${CLUSTER[$b]}"
    sep=","
  done; done
  printf ']}\n'
} > "$WORK/spec.json"

CLUSTER_CONFIG="$WORK/cluster.toml" CLUSTER_RUN="$RUN" scripts/cluster.sh lb | sed 's/^/[chaos] /'
echo "[chaos] work dir $WORK; nodes' logs in $RUN"
set +e
"$DRIVER" --spec "$WORK/spec.json" --pg-restart "pg_ctlcluster --skip-systemctl-redirect $PGVER main restart" \
  "${DRIVER_ARGS[@]}" &
DRIVER_PID=$!
wait "$DRIVER_PID"
rc=$?
DRIVER_PID=""
set -e
# A panic anywhere in a node is a failure even if nothing was lost.
if grep -l 'panicked' "$RUN"/*.log >/dev/null 2>&1; then
  echo "[chaos] FAIL: a node panicked:"; grep -h -A3 'panicked' "$RUN"/*.log | head -n 20 | sed 's/^/    | /'
  [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
