#!/usr/bin/env bash
# FerretDB, the MongoDB-wire-protocol server the suite runs against (on SQLite).
#
#   scripts/ferretdb.sh build                    # print the path of a ferretdb binary, building it once (Go)
#   scripts/ferretdb.sh start DIR PORT [BACKEND] # start it on 127.0.0.1:PORT, everything in DIR; prints its PID
#   scripts/ferretdb.sh stop DIR                 # stop it (and its PostgreSQL)
#
# BACKEND: postgresql (the default: a PostgreSQL of its own from Debian's
# packages, on a Unix socket in DIR) or sqlite. PYTHON: a python with pymongo,
# used to wait until FerretDB answers.
#
# The suite runs on the PostgreSQL backend: FerretDB 1.24 on SQLite hands the
# database only filters that are exactly {_id: X}, so every conditional update
# scans its whole collection (at 2,000 tasks: 122 ms per find_one_and_update
# and 1.6 s per sorted claim query, against 4 ms and 27 ms on PostgreSQL).
#
# A binary built before is reused (FERRETDB_BIN, else the cache below). A
# fresh build takes about a minute on two cores: `go install` alone gives a
# binary that refuses to start (FerretDB reads its version from a file its
# release build generates), so the module's source is copied and built with
# that file written.
set -euo pipefail

VERSION=v1.24.2
MODULE=github.com/FerretDB/FerretDB
CACHE=${BANYAN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/banyan}
BIN=${FERRETDB_BIN:-$CACHE/ferretdb-$VERSION}

build() {
  if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    return
  fi
  command -v go >/dev/null || { echo "ferretdb.sh: Go is needed to build FerretDB" >&2; exit 1; }
  local work src
  work=$(mktemp -d)
  trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' RETURN
  (cd "$work" && go mod init ferretdb-build >/dev/null 2>&1 && go mod download "$MODULE@$VERSION")
  src=$(cd "$work" && go list -m -f '{{.Dir}}' "$MODULE@$VERSION" 2>/dev/null || true)
  if [ -z "$src" ]; then
    src=$(cd "$work" && go mod download -json "$MODULE@$VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  fi
  cp -r "$src" "$work/src"
  chmod -R u+w "$work/src"
  echo "$VERSION" > "$work/src/build/version/version.txt"
  mkdir -p "$(dirname "$BIN")"
  (cd "$work/src" && go build -o "$BIN.tmp" ./cmd/ferretdb)
  mv "$BIN.tmp" "$BIN"
  echo "$BIN"
}

wait_ready() {  # PID PORT LOG
  for _ in $(seq 1 300); do
    if "${PYTHON:-python3}" -c "import pymongo; pymongo.MongoClient('mongodb://127.0.0.1:$2', serverSelectionTimeoutMS=500).admin.command('ping')" 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$1" 2>/dev/null; then
      echo "ferretdb.sh: FerretDB exited; its log:" >&2
      cat "$3" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "ferretdb.sh: FerretDB did not answer on 127.0.0.1:$2" >&2
  kill "$1" 2>/dev/null || true
  exit 1
}

# PostgreSQL of its own in DIR/pg, on a Unix socket in DIR (no TCP port).
start_postgresql() {  # DIR
  local dir=$1 bindir run=()
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$bindir" ] || { echo "ferretdb.sh: PostgreSQL is not installed (Debian: apt-get install postgresql)" >&2; exit 1; }
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    run=(runuser -u postgres --)
  fi
  "${run[@]}" "$bindir/initdb" -D "$dir/pg" -A trust -U postgres >"$dir/initdb.log" 2>&1
  # Test data: no fsync (a crash of the machine may lose it, nothing else).
  "${run[@]}" "$bindir/pg_ctl" -D "$dir/pg" -l "$dir/postgresql.log" -w start \
    -o "-c listen_addresses='' -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >/dev/null
  "${run[@]}" "$bindir/createdb" -h "$dir" -U postgres ferretdb
}

stop() {  # DIR
  local dir=$1 bindir
  [ -f "$dir/ferretdb.pid" ] && kill "$(cat "$dir/ferretdb.pid")" 2>/dev/null || true
  if [ -d "$dir/pg" ]; then
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ "$(id -u)" = 0 ]; then
      runuser -u postgres -- "$bindir/pg_ctl" -D "$dir/pg" -m fast stop >/dev/null 2>&1 || true
    else
      "$bindir/pg_ctl" -D "$dir/pg" -m fast stop >/dev/null 2>&1 || true
    fi
  fi
}

start() {  # DIR PORT BACKEND
  local dir=$1 port=$2 backend=${3:-postgresql} bin handler
  bin=$(build)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  case "$backend" in
    postgresql)
      start_postgresql "$dir"
      handler=(--handler=postgresql "--postgresql-url=postgres://postgres@/ferretdb?host=$dir") ;;
    sqlite)
      mkdir -p "$dir/data"
      # synchronous(normal): with WAL, a commit is not fsynced (test data)
      handler=(--handler=sqlite "--sqlite-url=file:$dir/data/?_pragma=synchronous(normal)") ;;
    *) echo "ferretdb.sh: backend is postgresql or sqlite, not $backend" >&2; exit 2 ;;
  esac
  "$bin" "${handler[@]}" --state-dir="$dir" --listen-addr="127.0.0.1:$port" --debug-addr=- \
    --telemetry=disable --log-level=warn >"$dir/ferretdb.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$dir/ferretdb.pid"
  wait_ready "$pid" "$port" "$dir/ferretdb.log"
  echo "$pid"
}

case "${1:-}" in
  build) build ;;
  start) start "${2:?data directory}" "${3:?port}" "${4:-postgresql}" ;;
  stop) stop "${2:?data directory}" ;;
  *) echo "usage: $0 build | start DIR PORT [postgresql|sqlite] | stop DIR" >&2; exit 2 ;;
esac
