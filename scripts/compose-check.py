#!/usr/bin/env python3
"""compose.yaml cannot be run here (no Docker engine, no registry), so what can be checked
without one is checked: each mailroom service's environment, with its secret files, against
the config the service mounts, through the real `mailroom check-config`; each node's fixed
address in compose.yaml against its entry in that config; nginx's upstreams against the
services. Usage: compose-check.py ROOT MAILROOM_BIN. Exit 1 with the reason on a mismatch."""
import os
import re
import subprocess
import sys
import tempfile
import tomllib

import yaml

root, binary = sys.argv[1], sys.argv[2]
compose = yaml.safe_load(open(os.path.join(root, "compose.yaml")))
services = compose["services"]
nodes = sorted(n for n, s in services.items() if s.get("image", "").startswith("mailroom"))
if not nodes:
    sys.exit("compose-check: no mailroom service in compose.yaml")
secrets = compose.get("secrets", {})
tmp = tempfile.mkdtemp(prefix="compose-check.")
fail = []
for name in nodes:
    svc = services[name]
    mounts = {}
    for v in svc.get("volumes", []):
        host, inside = v.split(":")[:2]
        mounts[inside] = os.path.join(root, host)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    for k, v in svc["environment"].items():
        v = str(v)
        if v.startswith("/run/secrets/"):
            sec = v.rsplit("/", 1)[1]
            if sec not in svc.get("secrets", []) or sec not in secrets:
                fail.append(f"{name}: {k} reads secret {sec}, which the service is not given")
                continue
            path = os.path.join(tmp, sec)
            with open(path, "w") as f:
                f.write("postgres://mailroom:pw@postgres:5432/mailroom" if sec == "store_url" else f"test-{sec}")
            v = path
        elif v in mounts:
            v = mounts[v]
        env[k] = v
    config_path = env.get("MAILROOM_CONFIG", "")
    if not os.path.exists(config_path):
        fail.append(f"{name}: MAILROOM_CONFIG {config_path!r} is not mounted from the repository")
        continue
    out = subprocess.run([binary, "check-config"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        fail.append(f"{name}: check-config exit {out.returncode}: {out.stdout}{out.stderr}".strip())
    else:
        print(f"compose-check: {name}: {out.stdout.strip()}")
    cfg = tomllib.load(open(config_path, "rb"))
    entry = next((n for n in cfg.get("node", []) if n["id"] == env.get("MAILROOM_NODE")), None)
    ip = next(iter(svc.get("networks", {}).values()), {}).get("ipv4_address")
    if entry is None:
        fail.append(f"{name}: MAILROOM_NODE {env.get('MAILROOM_NODE')!r} is not a node of {config_path}")
    elif not all(entry[k].startswith(f"{ip}:") for k in ("listen", "cluster", "admin")):
        fail.append(f"{name}: its address {ip} is not the one of node {entry['id']} in the config: {entry}")
nginx = open(os.path.join(root, "container", "nginx.conf")).read()
upstreams = set(re.findall(r"^\s*server\s+([\w.-]+):\d+", nginx, re.M))
if upstreams != set(nodes):
    fail.append(f"nginx.conf upstreams {sorted(upstreams)} are not the mailroom services {nodes}")
for f in fail:
    print(f"compose-check: FAIL {f}", file=sys.stderr)
sys.exit(1 if fail else 0)
