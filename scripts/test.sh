#!/usr/bin/env bash
# The test command: every Rust test (unit, store conformance on sled and PostgreSQL, whole
# nodes and clusters on 127.0.0.1:0), checks of the interop runner itself, today's envelopes
# opened by ACA-Py's independent Python code (and the reverse), then the interop suite with
# real Credo 0.6.3 and ACA-Py 1.7.0 peers. Installs what a fresh machine lacks (PostgreSQL
# start, npm packages, the askar library, the ACA-Py venv; cached under ~/.cache/mailroom).
#
# MAILROOM_SKIP_INTEROP=1 leaves out everything that needs those peers (for a quick local
# run only: .ci/run refuses it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
# The status page is checked in headless Chromium (Debian's package).
[ -x scripts/install-chromium.sh ] && scripts/install-chromium.sh
cargo build --locked --bins
cargo test --locked -- --test-threads="${MAILROOM_TEST_THREADS:-4}"
scripts/interop-runner-check.sh
if [ "${MAILROOM_SKIP_INTEROP:-}" = "1" ]; then
  echo "interop: SKIPPED (MAILROOM_SKIP_INTEROP=1): no envelope cross-check, no interop suite; this is not a full run"
  exit 0
fi
scripts/envelope-crosscheck.sh
# DIDComm v2 peers (Veramo, Indicio's didcomm-messaging) too, unless INTEROP_V2=0.
export INTEROP_V2=${INTEROP_V2:-1}
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/interop.sh
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/interop-cluster.sh
# `mailroom probe` against mailroom, Credo 0.6.3's and ACA-Py 1.7's mediators, side by side: a
# report (a peer failing checks does not fail the run; a peer that cannot start or a probe that
# crashes does). ~2 min 15 s.
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/probe-peers.sh
# The container image test (podman: the interop scenario through 3 containers + nginx, SIGTERM,
# the health check) is run by hand for now: `scripts/container-test.sh` (see README). It joins
# this command once a full run of it has passed twice in a row on a clean machine.
