#!/usr/bin/env bash
# Builds mailroom in release and runs the load generator (benches/loadgen/): prints one table
# of the figures the project is measured on (method: docs/BENCHMARKS.md). Everything runs on
# 127.0.0.1 against a mailroom child process or in-process nodes; PostgreSQL on 127.0.0.1:5432
# (a fresh database per run, dropped after it). The runs take ~2 minutes after the build.
#
#   scripts/bench.sh                        # every section
#   LOADGEN_ONLY=sled,live scripts/bench.sh # some sections: crypto,sled,pg,cluster,samenode,sweep,live,sessions
#   LOADGEN_MD=bench.md scripts/bench.sh    # also write the table as Markdown
#   LOADGEN_DIDCOMM=v2 scripts/bench.sh     # the same sections with DIDComm v2 wallets and forwards
#   LOADGEN_ONLY=soak scripts/bench.sh      # memory under steady load (~6 min; not in the default run)
# Other knobs (LOADGEN_SECS, LOADGEN_SENDERS, LOADGEN_ENVELOPES, ...) are listed at the top of
# benches/loadgen/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
# The cluster simulation (benches/cluster_sim.rs, no network, ~2 min; docs/BENCHMARKS.md
# "Adding nodes (simulation)") is a bench of its own:
#   scripts/bench.sh cluster-sim [--quick]
if [[ "${1:-}" == cluster-sim ]]; then
  shift
  exec cargo bench --locked --bench cluster_sim -- "$@"
fi
# The same ingest load (LOADGEN_SENDERS senders, LOADGEN_SECS window, one envelope size) against
# mailroom (sled, one node), Credo 0.6.3's mediator and ACA-Py 1.7's, one after the other, each
# started by scripts/peer-mediators.sh (interop installs, cached); then one table with
# mailroom's ratio to each peer and the load generator's own CPU:
#   scripts/bench.sh peers [--quick]        # --quick: 10 s per mediator (default 30 s)
#   PEERS=mailroom,acapy scripts/bench.sh peers
if [[ "${1:-}" == peers ]]; then
  shift
  exec scripts/bench-peers.sh "$@"
fi
if [[ ",${LOADGEN_ONLY:-pg}," =~ ,(pg|cluster|samenode|sweep), ]]; then
  scripts/ensure-postgres.sh
fi
# The sessions section needs one descriptor per socket on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# In-process nodes print their listen address and invitation on stdout: keep the table readable.
cargo bench --locked --bench loadgen | grep -Ev '^(invitation: |mailroom node )'
