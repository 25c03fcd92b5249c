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

# The TLS tests need a server that offers TLS: a local cluster without it gets a self-signed
# certificate (as Debian's own clusters have) and `ssl = on`, applied by a reload.
tls_on() {
  command -v psql >/dev/null 2>&1 || return 0
  [ "$(psql "$url" -qtAc 'show ssl' 2>/dev/null)" = on ] && return 0
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && command -v openssl >/dev/null 2>&1; then
    dir=/var/lib/postgresql/cqrs-tls
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=localhost" \
      -addext "basicConstraints=critical,CA:FALSE" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -keyout "$dir/server.key" -out "$dir/server.crt" >/dev/null 2>&1
    chown -R postgres:postgres "$dir"
    chmod 600 "$dir/server.key"
    psql "$url" -qtAc "ALTER SYSTEM SET ssl_cert_file = '$dir/server.crt'" >/dev/null
    psql "$url" -qtAc "ALTER SYSTEM SET ssl_key_file = '$dir/server.key'" >/dev/null
    psql "$url" -qtAc "ALTER SYSTEM SET ssl = on" >/dev/null
    psql "$url" -qtAc "SELECT pg_reload_conf()" >/dev/null
    sleep 1
    [ "$(psql "$url" -qtAc 'show ssl')" = on ] && { echo "==> TLS turned on in PostgreSQL (self-signed certificate in $dir)"; return 0; }
  fi
  echo "warning: PostgreSQL at $url does not offer TLS; the TLS test will fail (turn on ssl in its configuration)" >&2
}

if ready; then
  tls_on
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for version in $(ls /etc/postgresql); do
    echo "PostgreSQL is not answering at $url; starting the local cluster $version/main" >&2
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do
    ready && { tls_on; exit 0; }
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
