#!/usr/bin/env bash
# `scripts/bench.sh peers`: the ingest scenario of benches/loadgen/ (section `peer`) against
# mailroom (sled, one node, release build), Credo 0.6.3's mediator and ACA-Py 1.7's, one
# mediator at a time with the same load: LOADGEN_SENDERS concurrent senders (64), a
# LOADGEN_SECS window (30; 10 with --quick) after a 1 s warm-up, 16 wallets, the same forward
# envelope (one basic message). Prints one table: forwards/s accepted, p50/p99, errors, the
# mediator's and the load generator's CPU, and mailroom's ratio to each peer.
#   scripts/bench.sh peers [--quick]; PEERS=mailroom,credo scripts/bench.sh peers
#   PEERS_MD=file.md: also write the table as Markdown.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECS=30
[[ "${1:-}" == --quick ]] && SECS=10
export LOADGEN_SECS=${LOADGEN_SECS:-$SECS}
PEERS=${PEERS:-mailroom,credo,acapy}
say() { echo "[bench-peers] $*" >&2; }

say "building (release)"
cargo bench --locked --bench loadgen --no-run >&2
BIN=${MAILROOM_BIN:-$ROOT/target/release/mailroom}
[ -x "$BIN" ] || { say "no mailroom binary at $BIN"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-bench-peers.XXXXXX")
# shellcheck source=scripts/peer-mediators.sh
. "$ROOT/scripts/peer-mediators.sh"
cleanup() {
  local rc=$?
  stop_mediator
  if [ "$rc" = 0 ]; then rm -rf "$WORK"; else say "work dir kept: $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
peer_setup "$PEERS" || exit 1

LOAD_BEFORE=$(uptime)
DONE=()
for peer in ${PEERS//,/ }; do
  start_mediator "$peer" || exit 1
  say "$peer up (pid $MED_PID): $MED_URL"
  # Enough envelopes that none runs out: mailroom takes ~10,000/s here, the peers far fewer.
  if [ "$peer" = mailroom ]; then n=$(( (LOADGEN_SECS + 2) * 12000 )); else n=$(( (LOADGEN_SECS + 2) * 1500 )); fi
  [ "$n" -gt 1000000 ] && n=1000000
  set +e
  LOADGEN_ONLY=peer LOADGEN_PEER_NAME=$peer LOADGEN_PEER_URL=$MED_URL LOADGEN_PEER_PID=$MED_PID \
    LOADGEN_ENVELOPES=${LOADGEN_ENVELOPES:-$n} \
    cargo bench --locked --bench loadgen 2>"$WORK/$peer.err" | tee "$WORK/$peer.out"
  rc=${PIPESTATUS[0]}
  set -e
  grep -E '^\s+->|FAILED' "$WORK/$peer.err" >&2 || true
  [ "$rc" = 0 ] || say "the load run against $peer failed (exit $rc); see $WORK/$peer.err"
  stop_mediator
  DONE+=("$peer")
done
LOAD_AFTER=$(uptime)

"$PY" - "$WORK" "$LOADGEN_SECS" "${LOADGEN_SENDERS:-64}" "$LOAD_BEFORE" "$LOAD_AFTER" "${DONE[@]}" <<'PYEOF' | tee "$WORK/table.md"
import sys, re
work, secs, senders, before, after, peers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
res = {}
for p in peers:
    for line in open(f"{work}/{p}.out"):
        if line.startswith("peer-result "):
            res[p] = dict(kv.split("=", 1) for kv in line.split()[1:])
base = res.get("mailroom")
print(f"Same ingest load: {senders} senders, {secs} s window after 1 s warm-up, 16 wallets, one envelope size per row.")
print(f"Box load before: {before.strip()}; after: {after.strip()}")
print()
print("| mediator | forwards/s accepted | p50 ms | p99 ms | refused / errors | mediator CPU (cores) | loadgen CPU (cores) | envelope B | mailroom's ratio |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for p in peers:
    r = res.get(p)
    if not r:
        print(f"| {p} | FAILED (see the run's output) | | | | | | | |")
        continue
    ratio = "-" if p == "mailroom" or not base else (f"{float(base['rate']) / float(r['rate']):.0f}x" if float(r["rate"]) > 0 else "inf")
    note = " (pool ran out)" if r.get("exhausted") == "true" else ""
    print(f"| {p} | {float(r['rate']):.0f}{note} | {r['p50_ms']} | {r['p99_ms']} | {r['refused']} / {r['errors']} | {r['mediator_cores']} | {r['loadgen_cores']} | {r['env_bytes']} | {ratio} |")
PYEOF
if [ -n "${PEERS_MD:-}" ]; then cp "$WORK/table.md" "$PEERS_MD"; say "table written to $PEERS_MD"; fi
