#!/usr/bin/env bash
# Supply chain: `cargo deny` checks Cargo.lock against the RustSec advisories (offline, from
# the snapshot in ../shared/advisory-db), the licence allow-list, the allowed sources
# (crates.io only) and the bans in deny.toml. Every accepted advisory is listed in deny.toml
# with its reason. Installs cargo-deny into ~/.cargo/bin if it is missing.
#
# Reproducible builds are already given by `--locked` on every cargo command of the test
# command and CI (Cargo.lock is the only source of versions); `cargo deny` here checks what
# that lock file pins.
#
# MAILROOM_ADVISORY_DB=<dir> names another snapshot (a copy of github.com/rustsec/advisory-db).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# ../shared beside the project; from a git worktree elsewhere, beside its main checkout.
candidates=("$root/../shared/advisory-db")
if common=$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null); then
  candidates+=("$(dirname "$common")/../shared/advisory-db")
fi
[ -n "${MAILROOM_ADVISORY_DB:-}" ] && candidates=("$MAILROOM_ADVISORY_DB")
snapshot=
for c in "${candidates[@]}"; do
  if [ -d "$c/crates" ]; then snapshot=$c; break; fi
done
if [ -z "$snapshot" ]; then
  echo "supply-chain: no RustSec advisory snapshot (a folder with crates/) at: ${candidates[*]};" \
       "set MAILROOM_ADVISORY_DB to a copy of github.com/rustsec/advisory-db" >&2
  exit 2
fi
snapshot=$(cd "$snapshot" && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deny --version >/dev/null 2>&1; then
  echo "supply-chain: installing cargo-deny (from crates.io, --locked)"
  cargo install --locked cargo-deny
fi
# cargo-deny reads a database as a git checkout named after its URL's hash under db-path
# (the default URL's name below), and --offline keeps both it and `cargo metadata` off the
# network: the crates must be in the local registry first.
dbs=$(mktemp -d)
trap 'rm -rf "$dbs"' EXIT
db="$dbs/advisory-db-3157b0e258782691"
cp -r "$snapshot" "$db"
chmod -R u+w "$db"
(cd "$db" && git init -q && git add -A &&
  git -c user.name=supply-chain -c user.email=ci@localhost commit -qm "snapshot of $snapshot")
cargo fetch --locked
MAILROOM_ADVISORY_DBS="$dbs" cargo deny --offline --locked check
