#!/usr/bin/env bash
# Forwards/s on PostgreSQL driven by wrk with pre-packed envelopes (docs/BENCHMARKS.md,
# "PostgreSQL"): one node, or three nodes behind nginx (scripts/cluster.sh), one fresh
# database each run (dropped afterwards).
#
#   scripts/pgload.sh [one|three] [CONNECTIONS] [SECONDS]      defaults: one 256 10
#
# Onboards 16 wallets, packs 2 s + SECONDS worth of envelopes (PGLOAD_RATE per second
# assumed, 14000 by default; `examples/fwd_cost.rs pack`), then runs wrk (one thread,
# `scripts/wrk-forwards.lua`) for a 2 s warm-up and the SECONDS window, each envelope once.
# Accepted = rows added to mailroom_messages during the window (a repeat would not add one).
# CPU over the window: the node(s) (utime+stime from /proc), the database's server processes
# (pg_stat_activity of the run's database; WAL writer and checkpointer not included), nginx,
# and wrk itself. Prints one line of figures with the load average, wrk's lines, and what the
# nodes refused by reason (their `mailroom_rejected_total`, warm-up included).
# MAILROOM_BIN / FWD_COST_BIN: other builds. PGLOAD_POOL: store.pool_size (default 16).
# PGLOAD_SSLMODE: the store link's sslmode (default: the node's, prefer: TLS when the server
# offers it, as the box's PostgreSQL does; `disable` for plaintext).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-one}
CONNS=${2:-256}
SECS=${3:-10}
RATE=${PGLOAD_RATE:-14000}
POOL=${PGLOAD_POOL:-16}
case "$MODE" in one|three) ;; *) echo "usage: $0 [one|three] [CONNECTIONS] [SECONDS]" >&2; exit 64 ;; esac
command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq wrk >/dev/null
BIN=${MAILROOM_BIN:-target/release/mailroom}
DRV=${FWD_COST_BIN:-target/release/examples/fwd_cost}
if [ -z "${MAILROOM_BIN:-}${FWD_COST_BIN:-}" ]; then
  cargo build --release --locked --bin mailroom --example fwd_cost >&2
fi
BIN=$(realpath "$BIN")
scripts/ensure-postgres.sh >/dev/null
DIR=$(mktemp -d /tmp/pgload.XXXXXX)
DB="mailroom_pgload_$$_$(date +%s)"
PIDS=()
cleanup() {
  if [ "$MODE" = three ] && [ -f "$DIR/cluster.toml" ]; then
    CLUSTER_CONFIG="$DIR/cluster.toml" CLUSTER_RUN="$DIR/run" MAILROOM_BIN="$BIN" scripts/cluster.sh down >/dev/null 2>&1 || true
  fi
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
# shellcheck source=scripts/ports.sh
. scripts/ports.sh
wait_ready() {
  for _ in $(seq 1 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "pgload: $1 not ready" >&2; return 1
}
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB" >/dev/null
URL_DB="postgres://postgres@127.0.0.1:5432/$DB${PGLOAD_SSLMODE:+?sslmode=$PGLOAD_SSLMODE}"

if [ "$MODE" = one ]; then
  read -r PUB ADM <<<"$(free_ports 2)"
  cat > "$DIR/mailroom.toml" <<TOML
[store]
backend = "postgres"
url = "$URL_DB"
pool_size = $POOL

[log]
level = "warn"

[[node]]
id = "n1"
listen = "127.0.0.1:$PUB"
admin = "127.0.0.1:$ADM"
TOML
  "$BIN" run --config "$DIR/mailroom.toml" >"$DIR/n1.log" 2>&1 &
  PIDS+=($!)
  wait_ready "http://127.0.0.1:$ADM/ready"
  TARGET="http://127.0.0.1:$PUB"
  NODE_PIDS="${PIDS[*]}"
  ADMINS="http://127.0.0.1:$ADM"
  LB_PIDS=""
else
  read -r LB P1 P2 P3 P4 P5 P6 P7 P8 P9 <<<"$(free_ports 10)"
  NODE_PORTS=("$P1 $P2 $P3" "$P4 $P5 $P6" "$P7 $P8 $P9")
  {
    cat <<TOML
[cluster]
name = "pgload"
secret = "pgload-secret-not-for-production"
public_url = "http://127.0.0.1:$LB"

[store]
backend = "postgres"
url = "$URL_DB"
pool_size = $POOL

[log]
level = "warn"
TOML
    for n in 1 2 3; do
      read -r L C A <<<"${NODE_PORTS[$((n - 1))]}"
      printf '\n[[node]]\nid = "n%s"\nlisten = "127.0.0.1:%s"\ncluster = "127.0.0.1:%s"\nadmin = "127.0.0.1:%s"\n' \
        "$n" "$L" "$C" "$A"
    done
  } > "$DIR/cluster.toml"
  CLUSTER_LB_KEEPALIVE=${PGLOAD_KEEPALIVE:-128} CLUSTER_CONFIG="$DIR/cluster.toml" CLUSTER_RUN="$DIR/run" MAILROOM_BIN="$BIN" scripts/cluster.sh up >&2
  TARGET="http://127.0.0.1:$LB"
  NODE_PIDS=$(cat "$DIR"/run/n?.pid | tr '\n' ' ')
  ADMINS=""
  for n in 1 2 3; do
    read -r L C A <<<"${NODE_PORTS[$((n - 1))]}"
    ADMINS="$ADMINS http://127.0.0.1:$A"
  done
  LB_PIDS=$(pgrep -P "$(cat "$DIR/run/nginx.pid")" | tr '\n' ' ')
  LB_PIDS="$(cat "$DIR/run/nginx.pid") $LB_PIDS"
fi

WARM_N=$((RATE * 2))
WIN_N=$((RATE * SECS))
"$DRV" pack "$TARGET" "$((WARM_N + WIN_N))" "$DIR/all.txt" >&2
head -n "$WARM_N" "$DIR/all.txt" > "$DIR/warm.txt"
tail -n "+$((WARM_N + 1))" "$DIR/all.txt" > "$DIR/win.txt"

export DIR DB TARGET CONNS SECS NODE_PIDS LB_PIDS MODE POOL WIN_N ADMINS
python3 - <<'PY'
import os, subprocess, time, resource
d = os.environ
tck = os.sysconf("SC_CLK_TCK")
def cpu(pids):
    s = 0.0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            s += (int(f[11]) + int(f[12])) / tck
        except OSError:
            pass
    return s
def psql(sql):
    return subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", sql],
                          capture_output=True, text=True, check=True).stdout.split()
def rows():
    return int(subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", d["DB"], "-Atc",
                               "SELECT count(*) FROM mailroom_messages"], capture_output=True, text=True,
                              check=True).stdout.strip())
lua = os.path.join(os.getcwd(), "scripts/wrk-forwards.lua")
def wrk(file, secs):
    env = dict(os.environ, WRK_ENVELOPES=file, WRK_THREADS="1")
    p = subprocess.Popen(["wrk", "-t1", f"-c{d['CONNS']}", f"-d{secs}s", "--timeout", "10s", "-s", lua, d["TARGET"] + "/"],
                         env=env, stdout=subprocess.PIPE, text=True)
    return p
w = wrk(os.path.join(d["DIR"], "warm.txt"), 2)
w.communicate()
nodes = d["NODE_PIDS"].split()
lb = d["LB_PIDS"].split()
pg = psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{d['DB']}'")
r0 = rows()
c0 = (cpu(nodes), cpu(pg), cpu(lb))
ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.time()
w = wrk(os.path.join(d["DIR"], "win.txt"), d["SECS"])
out, _ = w.communicate()
t1 = time.time()
ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
c1 = (cpu(nodes), cpu(pg), cpu(lb))
pg_after = psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{d['DB']}'")
r1 = rows()
secs = float(d["SECS"])
acc = r1 - r0
wrk_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
reqs = [l for l in out.splitlines() if "requests in" in l or "Non-2xx" in l or "wrk-forwards" in l or "Socket errors" in l]
node_c, pg_c, lb_c = (c1[i] - c0[i] for i in range(3))
load = open("/proc/loadavg").read().split()[:3]
per = lambda c: c * 1e6 / acc if acc else float("nan")
print(f"{time.strftime('%H:%M', time.gmtime())} UTC mode={d['MODE']} conns={d['CONNS']} pool={d['POOL']} "
      f"accepted={acc} in {secs:.0f}s = {acc/secs:.0f} fwd/s; node CPU {node_c/secs:.2f} cores "
      f"({per(node_c):.0f} us/fwd); PG backends ({len(pg)}->{len(pg_after)}) {pg_c/secs:.2f} cores ({per(pg_c):.0f} us/fwd); "
      f"nginx {lb_c/secs:.2f} cores ({per(lb_c):.0f} us/fwd); wrk {wrk_cpu/secs:.2f} cores ({per(wrk_cpu):.0f} us/fwd); "
      f"load {' '.join(load)}")
for l in reqs:
    print("  " + l.strip())
# What the nodes refused (warm-up and window), by reason: `mailroom_rejected_total`.
import urllib.request
refused = {}
for a in d["ADMINS"].split():
    for l in urllib.request.urlopen(a + "/metrics", timeout=10).read().decode().splitlines():
        if l.startswith("mailroom_rejected_total{"):
            reason = l.split('reason="', 1)[1].split('"', 1)[0]
            refused[reason] = refused.get(reason, 0) + int(float(l.split()[-1]))
print("  refused by the nodes: " + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "none"))
PY
