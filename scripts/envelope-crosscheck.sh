#!/usr/bin/env bash
# Today's envelopes against an independent implementation, both ways (part of scripts/test.sh):
#   1. tests/envelope_crosscheck.rs packs fresh envelopes (new keys, random plaintexts, every
#      mode: authcrypt/anoncrypt, 1-3 recipients, did:key recipients, XChaCha20, a forward
#      through a mediator) with today's pack();
#   2. ACA-Py 1.7.0's Python code (acapy_agent.wallet.crypto, PyNaCl) opens each of them;
#   3. it packs fresh envelopes of its own, and Rust's unpack() opens those.
# The committed vectors (tests/fixtures/didcomm, scripts/didcomm-vectors/gen.py) stay as the
# fixed record; this is what catches a pack() that changed since they were made.
# Needs the ACA-Py venv from scripts/interop-setup.sh (installed here when missing).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
say() { echo "[envelope-crosscheck] $*"; }
setup_out=$(bash scripts/interop-setup.sh)
ACAPY_BIN=$(printf '%s\n' "$setup_out" | tail -n1 | sed -n 's/.*ACAPY_BIN=\([^ ]*\).*/\1/p')
[ -n "$ACAPY_BIN" ] || { say "FAIL: the ACA-Py venv is not installed (no Python 3.13/3.12 found; set INTEROP_PYTHON)"; exit 1; }
PY=$(dirname "$ACAPY_BIN")/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailroom-envelope-crosscheck.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# run_ignored TEST ENV=VALUE: runs one ignored test of tests/envelope_crosscheck.rs and
# requires that it ran and passed (a filter that matches nothing would pass with 0 tests).
run_ignored() {
  local test=$1 envset=$2 out
  if ! out=$(env "$envset" cargo test --locked -q --test envelope_crosscheck -- --ignored --exact "$test" --nocapture 2>&1); then
    printf '%s\n' "$out"; say "FAIL: $test"; return 1
  fi
  if ! printf '%s\n' "$out" | grep -q "test result: ok. 1 passed"; then
    printf '%s\n' "$out"; say "FAIL: $test did not run"; return 1
  fi
  printf '%s\n' "$out" | grep -E '^(wrote|opened) ' | sed 's/^/[envelope-crosscheck] rust: /'
}

run_ignored pack_fresh_envelopes "MAILROOM_CROSSCHECK_OUT=$WORK/rust.json"
"$PY" scripts/didcomm-vectors/crosscheck.py open "$WORK/rust.json" || { say "FAIL: ACA-Py's Python could not open today's envelopes"; exit 1; }
"$PY" scripts/didcomm-vectors/crosscheck.py pack "$WORK/python.json"
run_ignored unpack_python_envelopes "MAILROOM_CROSSCHECK_IN=$WORK/python.json"
say "ok: Rust -> Python and Python -> Rust"
