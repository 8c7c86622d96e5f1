#!/usr/bin/env bash
# Compares mailroom node binaries on the `scripts/bench.sh peers` scenarios, interleaved, so that
# each pair of runs sees the same box (figures swing with whatever else runs: compare inside one
# sitting, never across sittings). One load generator (this tree's) drives every binary.
#
#   scripts/bench-ab.sh ROUNDS SCENARIOS NAME=BINARY NAME=BINARY ...
#   scripts/bench-ab.sh 3 ingest,fanout before=/tmp/mailroom-main after=target/release/mailroom
#
# Build each variant with `cargo build --release --locked --bin mailroom` and copy
# target/release/mailroom aside before changing the tree. Prints one line per run: the name,
# the round, the time, the load average before it, then the `peer-*` result lines (rate, p50,
# p99, mediator and load generator cores). LOADGEN_SECS (10) sets each window.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -lt 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 64
fi
rounds=$1 scenarios=$2
shift 2
for spec in "$@"; do
  bin=${spec#*=}
  [ "$spec" != "$bin" ] && [ -x "$bin" ] || { echo "bench-ab: not NAME=executable: $spec" >&2; exit 64; }
done
export LOADGEN_SECS=${LOADGEN_SECS:-10}
for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    name=${spec%%=*} bin=$(realpath "${spec#*=}")
    load=$(cut -d' ' -f1 /proc/loadavg)
    out=$(MAILROOM_BIN=$bin PEERS=mailroom SCENARIOS=$scenarios scripts/bench.sh peers 2>&1) || {
      echo "== $name round $round: bench failed" >&2
      echo "$out" | tail -20 >&2
      exit 1
    }
    echo "== $name round $round $(date -u +%H:%M:%S) load $load"
    echo "$out" | grep -E '^peer-[a-z]+ name' | sed 's/ env_bytes=.*//'
  done
done
