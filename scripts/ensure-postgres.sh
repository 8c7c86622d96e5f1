#!/usr/bin/env bash
# Makes sure the local PostgreSQL server on 127.0.0.1:5432 is running (tests use the real
# server). Installs and starts Debian's server when the machine has none.
set -euo pipefail
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then exit 0; fi
if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "ensure-postgres: installing PostgreSQL (Debian package)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null && apt-get -o DPkg::Lock::Timeout=300 install -y -qq postgresql >/dev/null
  ver=$(ls /etc/postgresql | head -n1)
  # trust auth on loopback, as on the project's machines
  sed -i 's/^\(host\s\+all\s\+all\s\+127.0.0.1\/32\s\+\)\S\+/\1trust/; s/^\(local\s\+all\s\+postgres\s\+\)\S\+/\1trust/' "/etc/postgresql/$ver/main/pg_hba.conf"
fi
ver=$(ls /etc/postgresql | head -n1)
pg_ctlcluster --skip-systemctl-redirect "$ver" main start >/dev/null 2>&1 || true
for _ in $(seq 1 100); do
  pg_isready -q -h 127.0.0.1 -p 5432 && exit 0
  sleep 0.2
done
echo "ensure-postgres: PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
