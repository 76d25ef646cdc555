#!/usr/bin/env bash
# FerretDB, the MongoDB-wire-protocol server the suite runs against (on SQLite).
#
#   scripts/ferretdb.sh build          # print the path of a ferretdb binary, building it once (Go)
#   scripts/ferretdb.sh start DIR PORT # start it on 127.0.0.1:PORT with its data in DIR; prints its PID
#                                      # (PYTHON: a python with pymongo, to wait until it answers)
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

start() {
  local dir=$1 port=$2 bin
  bin=$(build)
  mkdir -p "$dir/data"
  # synchronous(normal): with WAL, a commit is not fsynced (test data; a crash
  # of the machine may lose the last commits, never corrupt the database).
  "$bin" --handler=sqlite --sqlite-url="file:$dir/data/?_pragma=synchronous(normal)" --state-dir="$dir" \
    --listen-addr="127.0.0.1:$port" --debug-addr=- --telemetry=disable --log-level=warn \
    >"$dir/ferretdb.log" 2>&1 &
  local pid=$!
  # Ready when it answers a ping.
  for _ in $(seq 1 300); do
    if "${PYTHON:-python3}" -c "import pymongo, sys; pymongo.MongoClient('mongodb://127.0.0.1:$port', serverSelectionTimeoutMS=500).admin.command('ping')" 2>/dev/null
    then
      echo "$pid"
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "ferretdb.sh: FerretDB exited; its log:" >&2
      cat "$dir/ferretdb.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "ferretdb.sh: FerretDB did not answer on 127.0.0.1:$port" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
}

case "${1:-}" in
  build) build ;;
  start) start "${2:?data directory}" "${3:?port}" ;;
  *) echo "usage: $0 build | start DIR PORT" >&2; exit 2 ;;
esac
