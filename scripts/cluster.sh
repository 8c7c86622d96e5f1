#!/usr/bin/env bash
# A local mailroom cluster as an operator would run it: PostgreSQL (the local server), the
# nodes of cluster.toml, and nginx round-robin in front of them at the cluster's public_url
# (WebSocket upgrade included), so a wallet and a sender land on different nodes.
#
#   scripts/cluster.sh up       start PostgreSQL (if needed), every node, nginx
#   scripts/cluster.sh status   each node's `mailroom status`, nginx
#   scripts/cluster.sh reload   SIGHUP every node (re-read the peer list of cluster.toml)
#   scripts/cluster.sh down     SIGTERM the nodes and nginx started by `up` (by PID)
#   scripts/cluster.sh lb       start (or reload) nginx only, for nodes started by other means
#                               (scripts/chaos.sh: pid files in CLUSTER_RUN, so `down` stops them)
#
# CLUSTER_CONFIG (default cluster.toml), MAILROOM_BIN (default target/release/mailroom, built
# when absent), CLUSTER_RUN (state: PIDs, logs, nginx.conf; default .cluster).
# CLUSTER_LB_KEEPALIVE=N: nginx keeps up to N idle connections to the nodes (default 0: a new
# connection to a node per request, as before); scripts/pgload.sh sets it.
# MAILROOM_IMAGE (e.g. localhost/mailroom:test): run each node as a podman container of that
# image instead (host network, the config mounted at /etc/mailroom/cluster.toml, MAILROOM_NODE);
# its .pid file holds the container's main process, .cid the container, and `down` stops it
# with SIGTERM and prints its exit code.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CLUSTER_CONFIG:-cluster.toml}
RUN=${CLUSTER_RUN:-.cluster}
BIN=${MAILROOM_BIN:-target/release/mailroom}
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)

# node lines: "id listen admin"; and the public listen address of the load balancer
nodes() {
  python3 - "$CONFIG" <<'PY'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
for n in c.get("node", []):
    print(n["id"], n["listen"], n["admin"])
PY
}
public_addr() {
  python3 - "$CONFIG" <<'PY'
import sys, tomllib, urllib.parse
c = tomllib.load(open(sys.argv[1], "rb"))
u = urllib.parse.urlparse(c.get("cluster", {}).get("public_url", "http://127.0.0.1:8000"))
print(f"{u.hostname}:{u.port or 80}")
PY
}
backend() {
  python3 - "$CONFIG" <<'PY'
import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb")).get("store", {}).get("backend", "sled"))
PY
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_ready() { # url
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster.sh: $1 not ready (see $RUN/*.log)" >&2
  return 1
}

ensure_nginx() {
  command -v nginx >/dev/null && return 0
  echo "cluster.sh: installing nginx (Debian package)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq nginx-light >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq nginx >/dev/null
}

write_nginx_conf() {
  local servers="" keepalive=${CLUSTER_LB_KEEPALIVE:-0} plain=close
  while read -r id listen admin; do servers+="    server ${listen} max_fails=1 fail_timeout=2s;"$'\n'; done < <(nodes)
  if [ "$keepalive" -gt 0 ]; then
    # Idle upstream connections are kept only when requests do not say "Connection: close".
    servers+="    keepalive ${keepalive};"$'\n'
    plain="''"
  fi
  cat > "$RUN/nginx.conf" <<NGINX
worker_processes 1;
pid $RUN/nginx.pid;
error_log $RUN/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $RUN/nginx-tmp;
  proxy_temp_path $RUN/nginx-tmp;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' $plain; }
  upstream mailroom {
$servers  }
  server {
    listen $(public_addr);
    client_max_body_size 8m;
    location / {
      proxy_pass http://mailroom;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header Host \$host;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
      proxy_next_upstream error timeout http_502 http_503;
    }
  }
}
NGINX
  mkdir -p "$RUN/nginx-tmp"
}

up() {
  [ "$(backend)" = "postgres" ] && scripts/ensure-postgres.sh
  [ -x "$BIN" ] || cargo build --release --locked --bin mailroom
  "$BIN" check-config --config "$CONFIG" >/dev/null
  while read -r id listen admin; do
    if alive "$RUN/$id.pid"; then echo "$id already running (pid $(cat "$RUN/$id.pid"))"; continue; fi
    if [ -n "${MAILROOM_IMAGE:-}" ]; then
      . scripts/podman-env.sh
      pm run -d "${PM_RUN_FLAGS[@]}" --log-driver k8s-file --log-opt "path=$RUN/$id.log" \
        -v "$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG"):/etc/mailroom/cluster.toml:ro" \
        -e MAILROOM_NODE="$id" "$MAILROOM_IMAGE" > "$RUN/$id.cid"
      pm inspect -f '{{.State.Pid}}' "$(cat "$RUN/$id.cid")" > "$RUN/$id.pid"
    else
      nohup "$BIN" run --config "$CONFIG" --node "$id" >"$RUN/$id.log" 2>&1 &
      echo $! > "$RUN/$id.pid"
    fi
  done < <(nodes)
  while read -r id listen admin; do wait_ready "http://$admin/ready"; echo "$id ready: http://$listen (admin http://$admin)"; done < <(nodes)
  ensure_nginx
  write_nginx_conf
  if alive "$RUN/nginx.pid"; then
    nginx -c "$RUN/nginx.conf" -s reload
  else
    nginx -c "$RUN/nginx.conf"
  fi
  wait_ready "http://$(public_addr)/invitation"
  echo "load balancer: http://$(public_addr)  invitation: http://$(public_addr)/invitation"
}

down() {
  if alive "$RUN/nginx.pid"; then nginx -c "$RUN/nginx.conf" -s quit || true; fi
  while read -r id listen admin; do
    if [ -s "$RUN/$id.cid" ]; then
      . scripts/podman-env.sh
      cid=$(cat "$RUN/$id.cid")
      pm stop -t 30 "$cid" >/dev/null || true
      echo "$id stopped (container exit code $(pm inspect -f '{{.State.ExitCode}}' "$cid"))"
      pm rm -f "$cid" >/dev/null || true
      rm -f "$RUN/$id.cid" "$RUN/$id.pid"
      continue
    fi
    if alive "$RUN/$id.pid"; then
      pid=$(cat "$RUN/$id.pid")
      kill -TERM "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "$id stopped"
    fi
    rm -f "$RUN/$id.pid"
  done < <(nodes)
}

status() {
  while read -r id listen admin; do
    if alive "$RUN/$id.pid"; then "$BIN" status --admin "http://$admin" || true; else echo "$id: not running"; fi
    echo
  done < <(nodes)
  if alive "$RUN/nginx.pid"; then echo "nginx: running at http://$(public_addr)"; else echo "nginx: not running"; fi
}

reload() {
  while read -r id listen admin; do
    alive "$RUN/$id.pid" && kill -HUP "$(cat "$RUN/$id.pid")" && echo "$id: SIGHUP sent"
  done < <(nodes)
  # Nodes new in the file are started; nginx learns them too.
  up
}

lb() {
  ensure_nginx
  write_nginx_conf
  if alive "$RUN/nginx.pid"; then nginx -c "$RUN/nginx.conf" -s reload; else nginx -c "$RUN/nginx.conf"; fi
  echo "load balancer: http://$(public_addr)"
}

case "${1:-}" in
  up) up ;;
  lb) lb ;;
  down) down ;;
  status) status ;;
  reload) reload ;;
  *) echo "usage: $0 up|down|status|reload|lb" >&2; exit 64 ;;
esac
