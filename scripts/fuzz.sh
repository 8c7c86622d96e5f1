#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo-fuzz, on the stable toolchain): builds the
# targets of fuzz/ (its own workspace and lock file) and runs each for a bounded time from its
# seed corpus (fuzz/corpus/<target>, never written to: new inputs go to a scratch copy).
# Fails on any crash, panic, timeout or out-of-memory, leaving the input in
# fuzz/artifacts/<target>/; prints per target: execs, execs/s, coverage (libFuzzer's cov and
# ft), corpus size before and after. docs/FUZZING.md says how to reproduce a finding.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 s, every target)
#
# `--sanitizer none`: AddressSanitizer needs a nightly toolchain (-Zsanitizer), which these
# machines cannot fetch; the targets are safe Rust, where libFuzzer still catches panics,
# aborts, stack overflows, hangs (-timeout) and memory blow-ups (-rss_limit_mb).
# `--debug-assertions`: overflow checks and debug_assert! on (cargo fuzz leaves them off in its
# default release build), so length arithmetic that wraps panics instead of passing.
# Installs cargo-fuzz into ~/.cargo/bin if it is missing (from crates.io, --locked: 1.5 min idle, 12 min at load 15).
#
# The build goes to ${MAILROOM_CACHE:-~/.cache/mailroom}/fuzz-target, outside the checkout, so
# the next run on this machine (a fresh CI clone included) reuses it. A cold build compiles the
# whole dependency tree with coverage instrumentation: ~10.5 min of CPU (about 6 min wall on an
# idle 2-core box, 15 min at load 5-8). Warm, only what changed is rebuilt; another checkout
# changes the fingerprint of `mailroom` (its absolute path is hashed in), so switching
# checkouts rebuilds `mailroom` and the nine targets (not yet timed), never the dependencies.
# Checkouts share the directory under a lock (flock) held from the build until the binaries
# are copied out, so each runs its own build even when two run at once.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
case "$secs" in '' | *[!0-9]*) echo "fuzz: seconds per target must be a number, got '$secs'" >&2; exit 2 ;; esac
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
t0=$(date +%s)
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (from crates.io, --locked)"
  cargo install --locked cargo-fuzz
  echo "fuzz: cargo-fuzz installed in $(( $(date +%s) - t0 )) s"
fi
cd fuzz
# cargo fuzz has no --locked: refuse a lock file that would change.
cargo metadata --locked --format-version 1 >/dev/null
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cache=${MAILROOM_CACHE:-$HOME/.cache/mailroom}
export CARGO_TARGET_DIR="$cache/fuzz-target"
mkdir -p "$CARGO_TARGET_DIR"
exec 9>"$cache/fuzz-target.lock"
if ! flock -n 9; then
  echo "fuzz: waiting for another checkout's fuzz build ($cache/fuzz-target.lock)"
  flock 9
fi
t1=$(date +%s)
[ -x "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/${targets[0]}" ] || \
  echo "fuzz: cold build in $CARGO_TARGET_DIR (~10.5 min of CPU)"
cargo fuzz build --sanitizer none --debug-assertions --codegen-units 16
echo "fuzz: built the targets in $(( $(date +%s) - t1 )) s"
# This checkout's binaries, out of the shared directory before another checkout rebuilds it.
bin=$scratch/bin
mkdir -p "$bin"
for t in "${targets[@]}"; do
  src=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$t
  [ -x "$src" ] || { echo "fuzz: no target $t (cargo fuzz list)" >&2; exit 2; }
  cp "$src" "$bin/$t"
done
exec 9>&-
failed=()
rows=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  seeds=$(find "corpus/$t" -type f 2>/dev/null | wc -l)
  log="$scratch/$t.log"
  echo "fuzz: $t for ${secs} s from $seeds seeds"
  set +e
  "$bin/$t" "$scratch/$t" "corpus/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  # libFuzzer's last status line (DONE, or the line before a crash) and its final stats.
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
  status=ok
  if [ "$rc" -ne 0 ]; then
    status="FAILED (exit $rc)"
    failed+=("$t")
    echo "---- $t: libFuzzer output (tail) ----" >&2
    grep -v '^#[0-9]' "$log" | tail -40 >&2
    echo "---- input kept in fuzz/$(ls -t "artifacts/$t"/* 2>/dev/null | head -1) ----" >&2
  fi
  rows+=("$(printf '%-18s %10s %8s %6s %6s %6s %12s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$seeds" "${corp:-?}" "$status")")
done
echo
printf '%-18s %10s %8s %6s %6s %6s %12s  %s\n' target execs execs/s cov ft seeds corpus result
printf '%s\n' "${rows[@]}"
echo "fuzz: ${#targets[@]} targets, ${secs} s each, $(( $(date +%s) - t0 )) s in all (load: $(cut -d' ' -f1-3 /proc/loadavg))"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/; see docs/FUZZING.md)" >&2
  exit 1
fi
