#!/usr/bin/env bash
# `scripts/bench.sh peers`: the same loads of benches/loadgen/ against mailroom (sled, one node,
# release build), Credo 0.6.3's mediator and ACA-Py 1.7's, one mediator at a time, each
# scenario on a freshly started mediator:
#   ingest  (section `peer`): LOADGEN_SENDERS concurrent senders (64), a LOADGEN_SECS window
#           (30; 10 with --quick) after a 1 s warm-up, 16 wallets, one forward envelope size;
#   backlog (`peer-backlog`): one wallet drains 10,000 queued messages (LOADGEN_BACKLOG);
#   fanout  (`peer-fanout`): 100 wallets on WebSockets (live mode, or implicit delivery on a
#           mediator without pickup), forwards for the window, each delivery acknowledged.
# Prints one table per scenario with mailroom's ratio to each peer.
#   scripts/bench.sh peers [--quick]; PEERS=mailroom,credo SCENARIOS=ingest scripts/bench.sh peers
#   PEERS_MD=file.md: also write the tables as Markdown.
#   PEERS_ROUNDS=N (1): run every mediator N times, alternating (mailroom, acapy, mailroom,
#   acapy, ...), and report each mediator's median round and the ratio of each round's pair:
#   the mediators run one after the other, and a shared box's speed moves between them.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECS=30
BACKLOG=10000
WALLETS=100
# --quick: 10 s windows, a 2,000-message backlog and 25 wallets (Credo onboards ~1 wallet/s
# and takes ~60 forwards/s, so the full sizes take minutes there).
[[ "${1:-}" == --quick ]] && { SECS=10; BACKLOG=2000; WALLETS=25; }
export LOADGEN_BACKLOG=${LOADGEN_BACKLOG:-$BACKLOG} LOADGEN_FANOUT_WALLETS=${LOADGEN_FANOUT_WALLETS:-$WALLETS}
export LOADGEN_SECS=${LOADGEN_SECS:-$SECS}
PEERS=${PEERS:-mailroom,credo,acapy}
SCENARIOS=${SCENARIOS:-ingest,backlog,fanout}
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

ROUNDS=${PEERS_ROUNDS:-1}
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { say "PEERS_ROUNDS must be a positive integer, not '$ROUNDS'"; exit 2; }
LOAD_BEFORE=$(uptime)
DONE=()
for round in $(seq 1 "$ROUNDS"); do
for peer in ${PEERS//,/ }; do
  for sc in ${SCENARIOS//,/ }; do
    case "$sc" in
      ingest) section=peer ;;
      backlog) section=peer-backlog ;;
      fanout) section=peer-fanout ;;
      *) say "unknown scenario $sc (ingest, backlog, fanout)"; exit 2 ;;
    esac
    start_mediator "$peer" || exit 1
    say "$peer up (pid $MED_PID) for $sc: $MED_URL"
    # Enough envelopes that none runs out: mailroom takes up to ~14,000/s here, the peers far fewer.
    if [ "$peer" = mailroom ]; then n=$(( (LOADGEN_SECS + 2) * 20000 )); else n=$(( (LOADGEN_SECS + 2) * 1500 )); fi
    [ "$n" -gt 1000000 ] && n=1000000
    if [ "$peer" = mailroom ]; then fan=$(( LOADGEN_SECS * 8000 )); else fan=$(( LOADGEN_SECS * 300 )); fi
    ws=$MED_WS
    # mailroom's default invitation names one (HTTP) service; its WebSocket is the same port.
    if [ -z "$ws" ] && [ "$peer" = mailroom ]; then ws=$(printf '%s' "${MED_URL%/invitation}" | sed 's#^http#ws#'); fi
    set +e
    LOADGEN_ONLY=$section LOADGEN_PEER_NAME=$peer LOADGEN_PEER_URL=$MED_URL LOADGEN_PEER_PID=$MED_PID LOADGEN_PEER_WS=$ws \
      LOADGEN_ENVELOPES=${LOADGEN_ENVELOPES:-$n} LOADGEN_FANOUT_MSGS=${LOADGEN_FANOUT_MSGS:-$fan} \
      cargo bench --locked --bench loadgen 2>"$WORK/$peer.$sc.$round.err" | tee "$WORK/$peer.$sc.$round.out"
    rc=${PIPESTATUS[0]}
    set -e
    grep -E '^\s+->|FAILED' "$WORK/$peer.$sc.$round.err" >&2 || true
    [ "$rc" = 0 ] || say "the $sc run against $peer failed (exit $rc); see $WORK/$peer.$sc.$round.err"
    stop_mediator
  done
  [ "$round" = 1 ] && DONE+=("$peer")
done
done
LOAD_AFTER=$(uptime)

"$PY" - "$WORK" "$LOADGEN_SECS" "${LOADGEN_SENDERS:-64}" "$LOAD_BEFORE" "$LOAD_AFTER" "${DONE[@]}" <<'PYEOF' | tee "$WORK/table.md"
import sys, glob
work, secs, senders, before, after, peers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
rounds = {}  # (tag, peer) -> {round: fields}
for p in peers:
    for path in glob.glob(f"{work}/{p}.*.out"):
        rnd = int(path.rsplit(".", 2)[-2])
        for line in open(path):
            tag = line.split(" ", 1)[0]
            if tag in ("peer-result", "peer-backlog", "peer-fanout"):
                rounds.setdefault((tag, p), {})[rnd] = dict(kv.split("=", 1) for kv in line.split()[1:])
# The table shows each mediator's median round (by rate, or by time for the backlog).
MAIN = {"peer-result": "rate", "peer-backlog": "secs", "peer-fanout": "rate"}
res = {}
for (tag, p), by_round in rounds.items():
    rs = sorted(by_round.values(), key=lambda r: float(r[MAIN[tag]]))
    res[(tag, p)] = rs[(len(rs) - 1) // 2]

def times(base, r, key, higher_is_better):
    """mailroom's figure (`base`) against a peer's (`r`), as "NNx"."""
    a, b = float(base[key]), float(r[key])
    num, den = (a, b) if higher_is_better else (b, a)
    return f"{num / den:.0f}x" if den > 0 else "inf"

def ratio(tag, p, key, higher_is_better=True):
    base, r = res.get((tag, "mailroom")), res.get((tag, p))
    if p == "mailroom" or not base or not r:
        return "-"
    return times(base, r, key, higher_is_better)

print(f"Box load before: {before.strip()}; after: {after.strip()}")
n_rounds = max((len(v) for v in rounds.values()), default=1)
if n_rounds > 1:
    print(f"{n_rounds} rounds, the mediators alternating; each row is the mediator's median round.")
if any(t == "peer-result" for t, _ in res):
    print()
    print(f"Ingest: {senders} senders, {secs} s window after 1 s warm-up, 16 wallets, one envelope size per row.")
    print()
    print("| mediator | forwards/s accepted | p50 ms | p99 ms | refused / errors | mediator CPU (cores) | loadgen CPU (cores) | envelope B | mailroom's ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in peers:
        r = res.get(("peer-result", p))
        if not r:
            print(f"| {p} | FAILED or not run (see the run's output) | | | | | | | |")
            continue
        note = " (pool ran out)" if r.get("exhausted") == "true" else ""
        print(f"| {p} | {float(r['rate']):.0f}{note} | {r['p50_ms']} | {r['p99_ms']} | {r['refused']} / {r['errors']} | {r['mediator_cores']} | {r['loadgen_cores']} | {r['env_bytes']} | {ratio('peer-result', p, 'rate')} |")
def per_round(tag, key, higher_is_better=True):
    """Each round's ratio of mailroom to each peer (the two ran next to each other in time)."""
    base = rounds.get((tag, "mailroom"), {})
    if len(base) < 2:
        return
    for p in peers:
        if p == "mailroom" or (tag, p) not in rounds:
            continue
        out = []
        for rnd in sorted(base):
            r = rounds[(tag, p)].get(rnd)
            if not r:
                continue
            if tag == "peer-backlog" and r["drained"] != r["queued"]:
                out.append("not drained")
            else:
                out.append(times(base[rnd], r, key, higher_is_better))
        print(f"mailroom's ratio to {p}, round by round: {' · '.join(out)}")

if any(t == "peer-result" for t, _ in res):
    per_round("peer-result", "rate")
if any(t == "peer-backlog" for t, _ in res):
    print()
    print("Backlog: one wallet comes back to its queued messages and drains them (pickup 2.0 delivery-request of 100 + messages-received over HTTP; implicit return-route on a mediator without pickup).")
    print()
    print("| mediator | how | queued | drained | seconds | msg/s | duplicates | mailroom's ratio (time) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in peers:
        r = res.get(("peer-backlog", p))
        if not r:
            print(f"| {p} | FAILED or not run | | | | | | |")
            continue
        rate = float(r["drained"]) / max(float(r["secs"]), 1e-6)
        whole = r["drained"] == r["queued"]
        rt = ratio('peer-backlog', p, 'secs', False) if whole else "not drained"
        print(f"| {p} | {r['flavour']} | {r['queued']} | {r['drained']} | {float(r['secs']):.2f} | {rate:.0f} | {r['dups']} | {rt} |")
    per_round("peer-backlog", "secs", False)
if any(t == "peer-fanout" for t, _ in res):
    print()
    nw = next(r["wallets"] for (t, _), r in res.items() if t == "peer-fanout")
    print(f"Live fan-out: {nw} wallets on WebSockets, {senders} senders for {secs} s, every delivery acknowledged on its socket.")
    print()
    print("| mediator | how | accepted | delivered | msg/s delivered | p50 ms | p99 ms | duplicates | mediator CPU | loadgen CPU | mailroom's ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p in peers:
        r = res.get(("peer-fanout", p))
        if not r:
            print(f"| {p} | FAILED or not run | | | | | | | | | |")
            continue
        print(f"| {p} | {r['flavour']} | {r['accepted']} | {r['delivered']} | {float(r['rate']):.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['dups']} | {r['mediator_cores']} | {r['loadgen_cores']} | {ratio('peer-fanout', p, 'rate')} |")
    per_round("peer-fanout", "rate")
PYEOF
if [ -n "${PEERS_MD:-}" ]; then cp "$WORK/table.md" "$PEERS_MD"; say "table written to $PEERS_MD"; fi
