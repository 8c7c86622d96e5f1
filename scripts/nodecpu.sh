#!/usr/bin/env bash
# The node's CPU per accepted forward against the unpack floor, in instructions counted by
# valgrind's callgrind: independent of the load on the box, so before/after comparisons of one
# change are stable on shared cores (docs/BENCHMARKS.md, "The node's own CPU").
#
#   scripts/nodecpu.sh [sled|postgres] [N] [CONCURRENCY]     defaults: sled 2000 16
#
# 1. floor: `examples/fwd_cost.rs floor N` under callgrind with collection only inside
#    `didcomm::envelope::unpack`: instructions of one unpack of a ~1.8 KB anoncrypt forward
#    with the routing key.
# 2. node: `mailroom run` (release, one node, default config; sled in a temporary directory or
#    a fresh PostgreSQL database, dropped afterwards) under callgrind with instrumentation off;
#    `fwd_cost node` onboards 16 wallets, sends one warm-up forward each, turns instrumentation on,
#    POSTs N forwards from CONCURRENCY connections, dumps, turns it off. Every thread of the
#    node is counted (HTTP, protocol, store, sled's own threads, timers).
# Prints instructions per forward for both and their ratio. MAILROOM_BIN / FWD_COST_BIN to
# use other builds (e.g. a "before" binary); NODECPU_KEEP=1 keeps the callgrind files;
# NODECPU_TOP=1 prints the node's top functions (self instructions).
# 3. (NODECPU_NATIVE=M, e.g. 20000) the same node without valgrind, M forwards: its user and
#    system CPU time and context switches per forward from /proc (`fwd_cost cpu`). Time, not
#    instructions: it moves with the load on the box (printed with it), but it shows what
#    callgrind cannot, the kernel's share. Beside it, what any actix-web mediator answering one
#    request per forward cannot go below, in the same sitting: the floor in time (`fwd_cost
#    floor`, one thread), and a bare actix-web server with the node's listener settings
#    (`fwd_cost serve`) that answers 202 (`http`) or also unpacks with its own routing key
#    (`unpack`), driven the same way (`fwd_cost bare-cpu`). node - bare unpack is what mailroom
#    adds: routing, the queue and its durability.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${1:-sled}
N=${2:-2000}
CONC=${3:-16}
case "$BACKEND" in sled|postgres) ;; *) echo "usage: $0 [sled|postgres] [N] [CONCURRENCY]" >&2; exit 64 ;; esac
command -v valgrind >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq valgrind >/dev/null
}
BIN=${MAILROOM_BIN:-target/release/mailroom}
DRV=${FWD_COST_BIN:-target/release/examples/fwd_cost}
if [ -z "${MAILROOM_BIN:-}${FWD_COST_BIN:-}" ]; then
  cargo build --release --locked --bin mailroom --example fwd_cost >&2
fi
DIR=$(mktemp -d /tmp/nodecpu.XXXXXX)
NODE_PID=""
DB=""
# stop_node: ends the process this script started last (NODE_PID): TERM, up to 30 s, KILL.
stop_node() {
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
    kill -TERM "$NODE_PID" 2>/dev/null || true
    for _ in $(seq 1 300); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$NODE_PID" 2>/dev/null || true
  fi
}
cleanup() {
  stop_node
  if [ -n "$DB" ]; then psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true; fi
  if [ -z "${NODECPU_KEEP:-}" ]; then rm -rf "$DIR"; else echo "callgrind files kept in $DIR" >&2; fi
}
trap cleanup EXIT

totals() { # callgrind output file -> instruction count
  awk '/^(totals|summary):/ { print $2; exit }' "$1"
}
# shellcheck source=scripts/ports.sh
. scripts/ports.sh

# 1. the floor
valgrind --tool=callgrind --toggle-collect='*didcomm::envelope::unpack' \
  --callgrind-out-file="$DIR/floor.out" "$DRV" floor "$N" >/dev/null 2>"$DIR/floor.log"
FLOOR=$(totals "$DIR/floor.out")

# 2. the node
read -r PUB ADM <<<"$(free_ports 2)"
if [ "$BACKEND" = postgres ]; then
  scripts/ensure-postgres.sh >/dev/null
  DB="mailroom_nodecpu_$$_$(date +%s)"
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB" >/dev/null
  STORE="[store]
backend = \"postgres\"
url = \"postgres://postgres@127.0.0.1:5432/$DB\""
else
  STORE="[store]
backend = \"sled\"
path = \"$DIR/data\""
fi
cat > "$DIR/mailroom.toml" <<TOML
$STORE

[log]
level = "warn"

[[node]]
id = "n1"
listen = "127.0.0.1:$PUB"
admin = "127.0.0.1:$ADM"
TOML
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$DIR/node.out" \
  "$BIN" run --config "$DIR/mailroom.toml" >"$DIR/node.log" 2>&1 &
NODE_PID=$!
# wait_node LOG TRIES: until the node says ready (0.1 s a try); its log and exit if it died.
wait_node() {
  for _ in $(seq 1 "$2"); do
    curl -fsS "http://127.0.0.1:$ADM/ready" 2>/dev/null | grep -q '"ready":true' && return 0
    kill -0 "$NODE_PID" 2>/dev/null || { cat "$1" >&2; exit 1; }
    sleep 0.1
  done
}
wait_node "$DIR/node.log" 1200
"$DRV" node "http://127.0.0.1:$PUB" "$N" "$CONC" "$NODE_PID" >"$DIR/driver.log" 2>&1 || {
  cat "$DIR/driver.log" >&2
  exit 1
}
DUMP=$(ls "$DIR"/node.out.* 2>/dev/null | head -1)
[ -n "$DUMP" ] || { echo "nodecpu: no callgrind dump from the node" >&2; exit 1; }
NODE=$(totals "$DUMP")
python3 - "$BACKEND" "$N" "$CONC" "$FLOOR" "$NODE" <<'PY'
import sys
backend, n, conc, floor, node = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
f, p = floor / n, node / n
print(f"unpack floor: {f:,.0f} instructions per unpack ({n} unpacks)")
print(f"node ({backend}): {p:,.0f} instructions per accepted forward ({n} forwards, {conc} connections)")
print(f"ratio: {p / f:.2f}x the unpack floor")
PY
if [ -n "${NODECPU_TOP:-}" ]; then
  callgrind_annotate --inclusive=no "$DUMP" 2>/dev/null | sed -n '1,60p'
fi

if [ -n "${NODECPU_NATIVE:-}" ]; then
  stop_node
  sed -i "s#path = \"$DIR/data\"#path = \"$DIR/data-native\"#" "$DIR/mailroom.toml"
  "$BIN" run --config "$DIR/mailroom.toml" >"$DIR/node-native.log" 2>&1 &
  NODE_PID=$!
  wait_node "$DIR/node-native.log" 600
  "$DRV" cpu "http://127.0.0.1:$PUB" "$NODECPU_NATIVE" "$CONC" "$NODE_PID" >"$DIR/native.log" 2>&1 || {
    cat "$DIR/native.log" >&2
    exit 1
  }
  echo "native ($BACKEND, $NODECPU_NATIVE forwards, load average $(cut -d' ' -f1-3 /proc/loadavg)): $(grep '^node CPU' "$DIR/native.log")"
  echo "  $(grep '^by thread' "$DIR/native.log")"
  stop_node
  echo "native floor: $("$DRV" floor 5000)"
  for mode in http unpack; do
    "$DRV" serve 127.0.0.1:0 "$mode" >"$DIR/serve-$mode.log" 2>&1 &
    NODE_PID=$!
    for _ in $(seq 1 100); do grep -q '^serving' "$DIR/serve-$mode.log" && break; sleep 0.1; done
    grep -q '^serving' "$DIR/serve-$mode.log" || {
      echo "nodecpu: fwd_cost serve $mode did not start:" >&2
      cat "$DIR/serve-$mode.log" >&2
      exit 1
    }
    read -r _ URL _ RK <"$DIR/serve-$mode.log"
    "$DRV" bare-cpu "$URL" "$RK" "$NODECPU_NATIVE" "$CONC" "$NODE_PID" >"$DIR/bare-$mode.log" 2>&1 || {
      cat "$DIR/serve-$mode.log" "$DIR/bare-$mode.log" >&2
      exit 1
    }
    echo "bare actix-web server ($mode): $(grep '^node CPU' "$DIR/bare-$mode.log" | sed 's/^node CPU/CPU/')"
    stop_node
  done
fi
