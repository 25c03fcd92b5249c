#!/usr/bin/env bash
# Makes sure a second PostgreSQL server answers at SECOND_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5433/postgres): the store-move test restores a dump of the first
# server into it with pg_dump/pg_restore. A server of its own, not a second database, because
# what the test needs is another transaction counter and another system identifier. Started, if
# it is not up, from the PostgreSQL binaries on this machine into a throwaway data directory
# (trust authentication, localhost only, fsync off). Idempotent.
set -euo pipefail
url="${SECOND_DATABASE_URL:-postgres://postgres@127.0.0.1:5433/postgres}"
port="${url##*:}"; port="${port%%/*}"
data="${CQRS_SECOND_PGDATA:-/tmp/cqrs-second-postgres}"

ready() { pg_isready -q -d "$url" 2>/dev/null; }

command -v pg_isready >/dev/null 2>&1 || { echo "error: pg_isready not found: install the PostgreSQL client (postgresql-client)" >&2; exit 1; }
ready && exit 0

# The newest server binaries installed (Debian puts them under /usr/lib/postgresql/<version>/bin).
bin=""
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"; do
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then bin="$dir"; break; fi
done
if [ -z "$bin" ]; then
  cat >&2 <<MSG
error: no second PostgreSQL server at $url, and no initdb/pg_ctl to start one.
The store-move test restores a dump into a second server. Install the PostgreSQL server
package (e.g. apt-get install postgresql), or point SECOND_DATABASE_URL at a second server.
MSG
  exit 1
fi

# initdb refuses to run as root: as root, the cluster belongs to the postgres user.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

echo "==> starting a second PostgreSQL server on port $port ($bin, data in $data)"
if [ ! -f "$data/PG_VERSION" ]; then
  rm -rf "$data"
  mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres "$data"
  as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust >/dev/null
fi
as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
  -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp -c fsync=off -c max_connections=50" \
  start >/dev/null
for _ in $(seq 1 30); do
  ready && exit 0
  sleep 1
done
echo "error: the second PostgreSQL server did not come up; see $data/server.log" >&2
exit 1
