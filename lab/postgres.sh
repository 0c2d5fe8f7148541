#!/usr/bin/env bash
# Start (or stop) a PostgreSQL server for Optuna sweeps shared by several machines.
#
#   bash lab/postgres.sh                 # cluster in lab/postgres, 127.0.0.1:5432, database "optuna"
#   HOST=0.0.0.0 PASSWORD=secret bash lab/postgres.sh   # reachable from the other machines (password auth)
#   bash lab/postgres.sh stop
#
# It prints the storage URL to give every worker: python -m sparknet.sweep --storage <URL> ...
# Needs the PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql). Run as root, the
# server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
PGDATA=${PGDATA:-$(pwd)/lab/postgres}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5432}
DB=${DB:-optuna}
PGUSER_NAME=${PGUSER_NAME:-sparknet}
PASSWORD=${PASSWORD:-}

bin() {  # a server binary from PATH or the Debian layout
  command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -1
}
INITDB=$(bin initdb); PG_CTL=$(bin pg_ctl)
if [ -z "$INITDB" ] || [ -z "$PG_CTL" ]; then
  echo "error: PostgreSQL server binaries not found (fix: apt-get install postgresql, or brew install postgresql)" >&2
  exit 2
fi
as_owner() {  # run as the cluster's owner: postgres when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-start}" = stop ]; then
  as_owner "$PG_CTL" -D "$PGDATA" -m fast stop
  exit 0
fi

if [ ! -f "$PGDATA/PG_VERSION" ]; then
  mkdir -p "$PGDATA"
  [ "$(id -u)" = 0 ] && chown postgres "$PGDATA"
  chmod 700 "$PGDATA"
  PWFILE=""
  if [ -n "$PASSWORD" ]; then
    PWFILE=$(mktemp); echo "$PASSWORD" > "$PWFILE"; chmod 644 "$PWFILE"
  fi
  # Local socket connections trust the OS user; TCP connections need the password when one is set.
  as_owner "$INITDB" -D "$PGDATA" -U "$PGUSER_NAME" --auth-local=trust \
    --auth-host="$([ -n "$PASSWORD" ] && echo scram-sha-256 || echo trust)" \
    ${PWFILE:+--pwfile="$PWFILE"} >/dev/null
  [ -n "$PWFILE" ] && rm -f "$PWFILE"
  if [ "$HOST" != 127.0.0.1 ] && [ "$HOST" != localhost ]; then
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  fi
fi
# Lean: a sweep needs a handful of connections per worker, not a tuned server.
if ! as_owner "$PG_CTL" -D "$PGDATA" status >/dev/null 2>&1; then
  as_owner "$PG_CTL" -D "$PGDATA" -l "$PGDATA/server.log" -w \
    -o "-h $HOST -p $PORT -k $PGDATA -c max_connections=100 -c shared_buffers=64MB" start >/dev/null
fi
if ! as_owner psql -h "$PGDATA" -p "$PORT" -U "$PGUSER_NAME" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
  as_owner psql -h "$PGDATA" -p "$PORT" -U "$PGUSER_NAME" -d postgres -qc "CREATE DATABASE $DB" >/dev/null
fi
SHOWN_HOST=$([ "$HOST" = 0.0.0.0 ] && hostname || echo "$HOST")
echo "postgresql://$PGUSER_NAME${PASSWORD:+:***}@$SHOWN_HOST:$PORT/$DB"
