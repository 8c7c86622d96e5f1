# Sourced (not run) by scripts/probe-peers.sh and scripts/bench.sh: starts mailroom, Credo
# 0.6.3's mediator (tests/interop/credo/mediator.mjs) or ACA-Py 1.7.0 (--open-mediation) on
# 127.0.0.1 (free ports), from the interop suite's installs (scripts/interop-setup.sh; cached in
# ~/.cache/mailroom), and learns each one's invitation URL. Processes are ended by PID.
#
# The caller sets ROOT, WORK (a scratch directory), BIN (the mailroom binary) and a `say`
# function; then:
#   peer_setup "mailroom,credo,acapy"   # installs/locates Credo and ACA-Py when named
#   start_mediator NAME                 # sets MED_PID, MED_URL (invitation URL), MED_WS
#                                       # (ws URL to pass when the invitation names none)
#   stop_mediator
# MAILROOM_TOML_EXTRA is appended to mailroom's config (e.g. a [delivery] section; not [limits]:
# this script sets that section itself, with the per-wallet queue cap lifted for the benchmarks).

PY=$(command -v python3)
MED_PID=""
MED_URL=""
MED_WS=""

stop_mediator() {
  if [ -n "$MED_PID" ] && kill -0 "$MED_PID" 2>/dev/null; then
    kill "$MED_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$MED_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$MED_PID" 2>/dev/null || true
  fi
  MED_PID=""
}

peer_setup() {
  case ",$1," in *,credo,*|*,acapy,*)
    local setup_out env_line
    setup_out=$(bash "$ROOT/scripts/interop-setup.sh") || { say "interop setup failed"; return 1; }
    env_line=$(printf '%s\n' "$setup_out" | tail -n1)
    LIB_ASKAR_PATH=$(printf '%s' "$env_line" | sed -n 's/.*LIB_ASKAR_PATH=\([^ ]*\).*/\1/p')
    ACAPY_BIN=$(printf '%s' "$env_line" | sed -n 's/.*ACAPY_BIN=\([^ ]*\).*/\1/p')
    export LIB_ASKAR_PATH
    ;;
  esac
}

# shellcheck source=scripts/ports.sh
. "$ROOT/scripts/ports.sh"

wait_http() {
  local url=$1 deadline=$(( $(date +%s) + $2 ))
  while :; do
    if "$PY" -c 'import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; then return 0; fi
    if ! kill -0 "$MED_PID" 2>/dev/null; then say "the mediator exited before $url answered"; tail -n 30 "$WORK/$3.log"; return 1; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then say "$url not ready after $2 s"; tail -n 30 "$WORK/$3.log"; return 1; fi
    sleep 0.2
  done
}

# start_mediator NAME: mailroom (sled, one node), credo or acapy. Returns 1 when it cannot start.
start_mediator() {
  local PORT ADMIN_PORT WS_PORT CLUSTER_PORT
  read -r PORT ADMIN_PORT WS_PORT CLUSTER_PORT <<<"$(free_ports 4)"
  MED_URL=""; MED_WS=""
  case "$1" in
    mailroom)
      cat >"$WORK/cluster.toml" <<EOF
[cluster]
name = "peers"
secret = "peers-secret"
public_url = "http://127.0.0.1:$PORT"

[store]
backend = "sled"
path = "$WORK/mailroom-data"

# A wallet's queue is capped at 10,000 messages by default (limits.max_queue_messages): a fast
# box fills 16 wallets' queues within an ingest window and the rest is refused (HTTP 429). The
# peers have no such cap; the benchmark measures throughput, not the cap.
[limits]
max_queue_messages = 10000000
max_queue_bytes = 100000000000
${MAILROOM_TOML_EXTRA:-}

[[node]]
id = "n1"
listen = "127.0.0.1:$PORT"
cluster = "127.0.0.1:$CLUSTER_PORT"
admin = "127.0.0.1:$ADMIN_PORT"
EOF
      NO_COLOR=1 "$BIN" run --config "$WORK/cluster.toml" --node n1 >"$WORK/mailroom.log" 2>&1 &
      MED_PID=$!
      wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 60 mailroom || { say "mailroom did not start"; return 1; }
      MED_URL="http://127.0.0.1:$PORT/invitation"
      ;;
    credo)
      (cd "$ROOT/tests/interop/credo" && exec node mediator.mjs --port "$PORT" --admin-port "$ADMIN_PORT" \
          --data "$WORK/credo-mediator" --strategy QueueAndLiveModeDelivery) >"$WORK/credo.log" 2>&1 &
      MED_PID=$!
      wait_http "http://127.0.0.1:$ADMIN_PORT/ready" 90 credo || { say "Credo's mediator did not start"; return 1; }
      MED_URL="http://127.0.0.1:$PORT/invitation"
      ;;
    acapy)
      [ -n "${ACAPY_BIN:-}" ] || { say "ACA-Py is not installed (no Python 3.13/3.12)"; return 1; }
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
      wait_http "http://127.0.0.1:$ADMIN_PORT/status/ready" 120 acapy || { say "ACA-Py did not start"; return 1; }
      MED_URL=$("$PY" - "http://127.0.0.1:$ADMIN_PORT" <<'PYEOF'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/out-of-band/create-invitation?multi_use=true&auto_accept=true",
    data=json.dumps({"handshake_protocols": ["https://didcomm.org/didexchange/1.1"], "use_public_did": False}).encode(),
    headers={"content-type": "application/json"}, method="POST")
print(json.load(urllib.request.urlopen(req, timeout=30))["invitation_url"])
PYEOF
) || { say "ACA-Py gave no invitation"; tail -n 30 "$WORK/acapy.log"; return 1; }
      # ACA-Py's invitation and DID name only its http endpoint.
      MED_WS="ws://127.0.0.1:$WS_PORT"
      ;;
    *) say "unknown mediator $1 (mailroom, credo, acapy)"; return 1;;
  esac
}
