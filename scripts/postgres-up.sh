#!/usr/bin/env bash
# Makes sure PostgreSQL answers at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/test).
# On a machine with a local Debian cluster that is down, starts it; otherwise says what is missing.
# Idempotent.
set -euo pipefail
url="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -d "$url"
  elif command -v psql >/dev/null 2>&1; then
    psql "$url" -qtAc 'select 1' >/dev/null 2>&1
  else
    # No client tools: try the TCP port of a default local URL.
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

if ready; then
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    echo "PostgreSQL is not answering at $url; starting the local cluster $version/main" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do
    ready && exit 0
    sleep 1
  done
fi
cat >&2 <<MSG
error: PostgreSQL is not reachable at $url.
The tests need a PostgreSQL server (13 or newer: they use xid8 and pg_current_xact_id()).
Start one, or point DATABASE_URL at one, e.g.
  DATABASE_URL=postgres://user:password@host:5432/db ./scripts/test.sh
MSG
exit 1
