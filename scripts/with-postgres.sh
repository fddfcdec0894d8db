#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a PostgreSQL server.
#
# If DATABASE_URL is already set, the command runs against it. Otherwise a throwaway cluster is
# created in a temporary directory with the system's PostgreSQL (the Debian `postgresql` package
# is installed if absent and we are root), started on 127.0.0.1 on a free port, and stopped and
# deleted when the command ends. The command's exit status is returned.
#
#   scripts/with-postgres.sh cargo test --workspace
set -euo pipefail

if [[ -n "${DATABASE_URL:-}" ]]; then
  exec "$@"
fi

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [[ -z "$(pg_bin)" ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "with-postgres: no PostgreSQL under /usr/lib/postgresql; install the Debian package 'postgresql' or set DATABASE_URL" >&2
    exit 1
  fi
  echo "with-postgres: installing PostgreSQL (Debian package 'postgresql')" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(pg_bin)"

DIR="$(mktemp -d /tmp/proofmesh-pg.XXXXXX)"
as_owner() {
  if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
as_owner_cmd() { if [[ "$(id -u)" -eq 0 ]]; then echo "runuser -u postgres --"; fi; }
if [[ "$(id -u)" -eq 0 ]]; then chown postgres "$DIR"; fi
chmod 700 "$DIR"

cleanup() {
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

as_owner "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }

# A free port: try a few random ones until the server starts.
for _ in 1 2 3 4 5 6 7 8; do
  PORT=$((20000 + RANDOM % 20000))
  if as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 30 \
       -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
       start >/dev/null; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
    # For scripts that restart the server (scripts/chaos.sh): `$WITH_POSTGRES_CTL restart`.
    export WITH_POSTGRES_CTL="$(as_owner_cmd) $BIN/pg_ctl -D $DIR/data -l $DIR/server.log -w -t 60"
    export WITH_POSTGRES_PSQL="$BIN/psql"
    echo "with-postgres: throwaway PostgreSQL at $DATABASE_URL" >&2
    set +e
    "$@"
    status=$?
    exit $status
  fi
done
echo "with-postgres: PostgreSQL did not start; its log:" >&2
cat "$DIR/server.log" >&2
exit 1
