#!/usr/bin/env bash
# The test command: every Rust test (unit, store conformance on sled and PostgreSQL, whole
# nodes and clusters on 127.0.0.1:0), checks of the interop runner itself, today's envelopes
# opened by ACA-Py's independent Python code (and the reverse), then the interop suite with
# real Credo 0.6.3 and ACA-Py 1.7.0 peers, then a short chaos run (scripts/chaos.sh). Installs
# what a fresh machine lacks (PostgreSQL start, npm packages, the askar library, the ACA-Py
# venv, nginx; cached under ~/.cache/mailroom).
#
# MAILROOM_SKIP_INTEROP=1 leaves out everything that needs those peers, MAILROOM_SKIP_FUZZ=1
# the bounded fuzz run (both for a quick local run only: .ci/run refuses them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
# nginx in front of nodes (tests/push.rs, the cluster scripts): Debian's nginx-light.
if ! command -v nginx >/dev/null; then
  echo "test.sh: installing nginx-light (Debian package)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq nginx-light >/dev/null
fi
# The status page is checked in headless Chromium (Debian's package).
[ -x scripts/install-chromium.sh ] && scripts/install-chromium.sh
cargo build --locked --bins
cargo test --locked -- --test-threads="${MAILROOM_TEST_THREADS:-4}"
scripts/interop-runner-check.sh
# Coverage-guided fuzzing, bounded: each of the nine targets of fuzz/ for 20 s from its seed
# corpus (scripts/fuzz.sh, docs/FUZZING.md); fails on any crash, panic, hang or memory blow-up
# and keeps the input in fuzz/artifacts/. ~3.5 min warm. Installs cargo-fuzz when missing; the
# build lives in ~/.cache/mailroom/fuzz-target: cold, it is ~10.5 min of CPU (6 min wall on an
# idle 2-core box, 72 min at load 14-19), then a new checkout only rebuilds mailroom and the
# targets (not yet timed).
if [ "${MAILROOM_SKIP_FUZZ:-}" = "1" ]; then
  echo "fuzz: SKIPPED (MAILROOM_SKIP_FUZZ=1): no fuzz run; this is not a full run"
else
  scripts/fuzz.sh 20
fi
if [ "${MAILROOM_SKIP_INTEROP:-}" = "1" ]; then
  echo "interop: SKIPPED (MAILROOM_SKIP_INTEROP=1): no envelope cross-check, no interop suite; this is not a full run"
  exit 0
fi
scripts/envelope-crosscheck.sh
# DIDComm v2 peers (Veramo, Indicio's didcomm-messaging) too, unless INTEROP_V2=0.
export INTEROP_V2=${INTEROP_V2:-1}
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/interop.sh
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/interop-cluster.sh
# Chaos, short: the 3-node PostgreSQL cluster behind nginx under forwards to live, polling and
# offline-then-back wallets while nodes are killed -9, links cut and PostgreSQL restarted
# (40-60 s on the shared 2-core machine, 1-7 faults in a random order: the next fault waits for
# the last one to heal); fails if a forward answered 2xx is never delivered.
# The operator's run is `scripts/chaos.sh` (60 s; README, "Reliability").
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/chaos.sh --duration 25s --hold 3s --fault-gap 500ms
# `mailroom probe` against mailroom, Credo 0.6.3's and ACA-Py 1.7's mediators, side by side: a
# report (a peer failing checks does not fail the run; a peer that cannot start or a probe that
# crashes does). ~2 min 35 s.
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/probe-peers.sh
# The container image (podman with runc): the Dockerfile's runtime-prebuilt target with this
# build's binary, the Credo interop scenario through nginx in front of 3 containers, SIGTERM
# (live session closed 1001, exit 0) and the health check (~1-2.5 min; installs podman, runc and
# debootstrap when missing and caches a Debian base image in ~/.cache/mailroom).
MAILROOM_BIN="$PWD/target/debug/mailroom" scripts/container-test.sh
