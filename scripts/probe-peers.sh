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
# 64 = it could not read the invitation). Prints each probe's lines, then one table
# (check x mediator). Every listener binds 127.0.0.1 on a free port; processes are ended by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PROBE_PEERS:-mailroom,credo,acapy}
BIN=${MAILROOM_BIN:-$ROOT/target/debug/mailroom}
T_START=$(date +%s)
say() { echo "[probe-peers] $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-probe-peers.XXXXXX")
MED_PID=""
stop_mediator() {
  if [ -n "$MED_PID" ] && kill -0 "$MED_PID" 2>/dev/null; then
    kill "$MED_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$MED_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$MED_PID" 2>/dev/null || true
  fi
  MED_PID=""
}
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

case ",$PEERS," in *,credo,*|*,acapy,*)
  setup_out=$(bash "$ROOT/scripts/interop-setup.sh") || { say "interop setup failed"; exit 1; }
  env_line=$(printf '%s\n' "$setup_out" | tail -n1)
  LIB_ASKAR_PATH=$(printf '%s' "$env_line" | sed -n 's/.*LIB_ASKAR_PATH=\([^ ]*\).*/\1/p')
  ACAPY_BIN=$(printf '%s' "$env_line" | sed -n 's/.*ACAPY_BIN=\([^ ]*\).*/\1/p')
  export LIB_ASKAR_PATH
  ;;
esac
PY=$(command -v python3)
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  local url=$1 deadline=$(( $(date +%s) + $2 ))
  while :; do
    if "$PY" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; then return 0; fi
    if ! kill -0 "$MED_PID" 2>/dev/null; then say "the mediator exited before $url answered"; tail -n 30 "$WORK/$3.log"; return 1; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then say "$url not ready after $2 s"; tail -n 30 "$WORK/$3.log"; return 1; fi
    sleep 0.2
  done
}

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
for peer in ${PEERS//,/ }; do
  PORT=$(free_port); ADMIN_PORT=$(free_port)
  case "$peer" in
    mailroom)
      # 5 s leases instead of the default 30 s, so `redelivery` does not wait half a minute
      # (the probe waits PROBE_REDELIVERY_WAIT, 15 s, for any mediator to redeliver).
      cat >"$WORK/cluster.toml" <<EOF
[cluster]
name = "probe"
secret = "probe-secret"
public_url = "http://127.0.0.1:$PORT"

[store]
backend = "sled"
path = "$WORK/mailroom-data"

[delivery]
lease_ms = 5000

[[node]]
id = "n1"
listen = "127.0.0.1:$PORT"
cluster = "127.0.0.1:$(free_port)"
admin = "127.0.0.1:$ADMIN_PORT"
EOF
      NO_COLOR=1 "$BIN" run --config "$WORK/cluster.toml" --node n1 >"$WORK/mailroom.log" 2>&1 &
      MED_PID=$!
      wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 60 mailroom || { say "mailroom did not start"; exit 1; }
      probe mailroom "http://127.0.0.1:$PORT/invitation"
      ;;
    credo)
      (cd "$ROOT/tests/interop/credo" && exec node mediator.mjs --port "$PORT" --admin-port "$ADMIN_PORT" \
          --data "$WORK/credo-mediator" --strategy QueueAndLiveModeDelivery) >"$WORK/credo.log" 2>&1 &
      MED_PID=$!
      wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 90 credo || { say "Credo's mediator did not start"; exit 1; }
      probe credo "http://127.0.0.1:$PORT/invitation"
      ;;
    acapy)
      [ -n "${ACAPY_BIN:-}" ] || { say "ACA-Py is not installed (no Python 3.13/3.12)"; exit 1; }
      WS_PORT=$(free_port)
      mkdir -p "$WORK/acapy-home"
      ACAPY_HOME="$WORK/acapy-home" "$ACAPY_BIN" start --label acapy-mediator \
        --inbound-transport http 127.0.0.1 "$PORT" --inbound-transport ws 127.0.0.1 "$WS_PORT" \
        --outbound-transport http --outbound-transport ws \
        --endpoint "http://127.0.0.1:$PORT" "ws://127.0.0.1:$WS_PORT" \
        --admin 127.0.0.1 "$ADMIN_PORT" --admin-insecure-mode \
        --wallet-type askar --wallet-name acapy-mediator --wallet-key probe-key --wallet-storage-type default \
        --auto-provision --no-ledger --open-mediation --enable-undelivered-queue \
        --auto-accept-invites --auto-accept-requests --log-level warning >"$WORK/acapy.log" 2>&1 &
      MED_PID=$!
      wait_http "http://127.0.0.1:$ADMIN_PORT/status/ready" 120 acapy || { say "ACA-Py did not start"; exit 1; }
      INV=$("$PY" - "http://127.0.0.1:$ADMIN_PORT" <<'PYEOF'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/out-of-band/create-invitation?multi_use=true&auto_accept=true",
    data=json.dumps({"handshake_protocols": ["https://didcomm.org/didexchange/1.1"], "use_public_did": False}).encode(),
    headers={"content-type": "application/json"}, method="POST")
print(json.load(urllib.request.urlopen(req, timeout=30))["invitation_url"])
PYEOF
) || { say "ACA-Py gave no invitation"; tail -n 30 "$WORK/acapy.log"; exit 1; }
      # ACA-Py's invitation and DID name only its http endpoint: tell the probe its socket.
      probe acapy "$INV" --ws "ws://127.0.0.1:$WS_PORT"
      ;;
    *) say "unknown peer $peer (mailroom, credo, acapy)"; exit 1;;
  esac
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
