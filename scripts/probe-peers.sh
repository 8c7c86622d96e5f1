#!/usr/bin/env bash
# `mailroom probe` against mailroom and the reference mediators, side by side: Credo 0.6.3's
# mediator (tests/interop/credo/mediator.mjs) and ACA-Py 1.7.0 (--open-mediation), started
# from the interop suite's installs (scripts/interop-setup.sh; cached in ~/.cache/mailroom).
#
#   scripts/probe-peers.sh                        # all three; MAILROOM_BIN=... (default target/debug/mailroom)
#   PROBE_PEERS=credo,acapy scripts/probe-peers.sh
#   PROBE_TABLE=docs/probe-table.md scripts/probe-peers.sh   # also write the table as Markdown
#   PROBE_REDELIVERY_WAIT=40 scripts/probe-peers.sh           # wait longer for redelivery (default 15 s)
#
# A REPORT, not a gate: a peer failing checks does not fail this script. It fails only when a
# mediator cannot be started or the probe itself breaks (exit code other than 0/1: a crash, or
# 64 = bad arguments or no invitation at the URL; a mediator that does not answer its invitation
# URL, or answers 5xx, is `FAIL invitation`, exit 1, in the report). Prints each probe's lines, then one table
# (check x mediator). Every listener binds 127.0.0.1 on a free port; processes are ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PROBE_PEERS:-mailroom,credo,acapy}
BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
T_START=$(date +%s)
say() { echo "[probe-peers] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-probe-peers.XXXXXX")
# shellcheck source=scripts/peer-mediators.sh
. "$ROOT/scripts/peer-mediators.sh"
cleanup() {
  local rc=$?
  stop_mediator
  if [ "$rc" = 0 ] && [ "${PROBE_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else say "work dir kept: $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$BIN" ] || (cd "$ROOT" && cargo build -q --locked --bin mailroom)
[ -x "$BIN" ] || { say "no mailroom binary at $BIN"; exit 1; }

peer_setup "$PEERS" || exit 1

# probe NAME URL [ARGS...]: runs the probe, keeps its output in $WORK/NAME.out.
probe() {
  local name=$1 url=$2; shift 2
  local t0 rc; t0=$(date +%s)
  say "probing $name"
  set +e
  "$BIN" probe "$url" --redelivery-wait-secs "${PROBE_REDELIVERY_WAIT:-15}" "$@" | tee "$WORK/$name.out"
  rc=${PIPESTATUS[0]}
  set -e
  say "$name: probe exit $rc after $(( $(date +%s) - t0 )) s"
  if [ "$rc" != 0 ] && [ "$rc" != 1 ]; then say "the probe itself failed against $name (exit $rc)"; exit 1; fi
}

DONE=()
# 5 s leases instead of the default 30 s, so `redelivery` does not wait half a minute (the probe
# waits PROBE_REDELIVERY_WAIT, 15 s, for any mediator to redeliver).
MAILROOM_TOML_EXTRA=$'\n[delivery]\nlease_ms = 5000'
for peer in ${PEERS//,/ }; do
  start_mediator "$peer" || exit 1
  if [ -n "$MED_WS" ]; then
    probe "$peer" "$MED_URL" --ws "$MED_WS"
  else
    probe "$peer" "$MED_URL"
  fi
  stop_mediator
  DONE+=("$peer")
done

# The table: one row per check, one column per mediator (PASS / FAIL / SKIP, reason on FAIL).
"$PY" - "$WORK" "${DONE[@]}" <<'PYEOF' | tee "$WORK/table.md"
import sys, re
work, peers = sys.argv[1], sys.argv[2:]
rows, res = [], {}
for p in peers:
    for line in open(f"{work}/{p}.out"):
        m = re.match(r"^(PASS|FAIL|SKIP) ([a-z0-9.-]+)(?:: (.*))?$", line.rstrip("\n"))
        if not m:
            continue
        verdict, name, why = m.groups()
        if name not in rows:
            rows.append(name)
        cell = verdict if not why else f"{verdict}: {why}"
        res[(p, name)] = cell.replace("|", "/")[:160]
print("| check | " + " | ".join(peers) + " |")
print("| --- |" + " --- |" * len(peers))
for n in rows:
    print(f"| {n} | " + " | ".join(res.get((p, n), "-") for p in peers) + " |")
totals = []
for p in peers:
    last = [l for l in open(f"{work}/{p}.out") if re.match(r"^\d+ passed", l)]
    totals.append(last[-1].strip() if last else "no summary")
print("| **total** | " + " | ".join(totals) + " |")
PYEOF
if [ -n "${PROBE_TABLE:-}" ]; then cp "$WORK/table.md" "$PROBE_TABLE"; say "table written to $PROBE_TABLE"; fi
say "total $(( $(date +%s) - T_START )) s"
