#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a PostgreSQL server.
#
# If DATABASE_URL is already set, the command runs against it. Otherwise a throwaway cluster is
# created in a temporary directory with the system's PostgreSQL (the Debian `postgresql` package
# is installed if absent and we are root), started on 127.0.0.1 on a free port, and stopped and
# deleted when the command ends. The command's exit status is returned. SIGTERM, SIGINT or SIGHUP
# to this script is passed on to the command, and the server is stopped once the command has
# ended (never under a command still running). The cluster's directory is made under $TMPDIR
# (/tmp by default).
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

# A signal before the command runs: exit, so that the EXIT trap stops what was started (a
# trapped signal waits for the running pg_ctl to return, so its server is not left behind).
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

DIR="$(mktemp -d -t proofmesh-pg.XXXXXX)"
as_owner() {
  if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
as_owner_cmd() { if [[ "$(id -u)" -eq 0 ]]; then echo "runuser -u postgres --"; fi; }
if [[ "$(id -u)" -eq 0 ]]; then chown postgres "$DIR"; fi
chmod 700 "$DIR"

# shellcheck disable=SC2317 # run by the EXIT trap
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
    WITH_POSTGRES_CTL="$(as_owner_cmd) $BIN/pg_ctl -D $DIR/data -l $DIR/server.log -w -t 60"
    export WITH_POSTGRES_CTL
    export WITH_POSTGRES_PSQL="$BIN/psql"
    echo "with-postgres: throwaway PostgreSQL at $DATABASE_URL" >&2
    # The command runs in the background so that a signal to this script is handled at once:
    # passed on to it, then waited for. (`trap -`: a background command would otherwise ignore
    # SIGINT, and the terminal's Ctrl-C reaches it as it would in the foreground; `<&0`: it keeps
    # this script's stdin.)
    set +e
    ( trap - INT QUIT; exec "$@" ) <&0 &
    child=$!
    # shellcheck disable=SC2064 # the signal and PID are meant to be expanded now
    for sig in TERM INT HUP; do trap "kill -$sig $child 2>/dev/null" "$sig"; done
    # A signal interrupts `wait`; wait again until the command has ended, then take its status.
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    wait "$child"
    exit $?
  fi
done
echo "with-postgres: PostgreSQL did not start; its log:" >&2
cat "$DIR/server.log" >&2
exit 1
