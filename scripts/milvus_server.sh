#!/usr/bin/env bash
# A local Milvus standalone server for the integration tests, from PyPI's `milvus` package
# (Milvus 2.3, its own virtualenv .milvus-venv), on 127.0.0.1, stopped by its PID.
#   bash scripts/milvus_server.sh start [PORT]   # prints the URI on success
#   bash scripts/milvus_server.sh stop
# Start fails (status 1, with the reason) when the package cannot be installed or the server
# does not answer within 120 s; the tests that need it then skip.
set -uo pipefail
cd "$(dirname "$0")/.."
pidfile=.milvus-data/server.pid
case "${1:-}" in
  start)
    port="${2:-19539}"
    if [ ! -x .milvus-venv/bin/milvus-server ]; then
      python3 -m venv .milvus-venv && .milvus-venv/bin/pip install -q "milvus==2.3.5" >/dev/null 2>&1 \
        || { echo "milvus_server.sh: could not install the milvus package" >&2; exit 1; }
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null; then
      echo "milvus_server.sh: port $port or etcd's 2379 is already in use; stop what runs there first" >&2
      exit 1
    fi
    mkdir -p .milvus-data
    setsid .milvus-venv/bin/milvus-server --data "$PWD/.milvus-data" --proxy-port "$port" \
      > .milvus-data/server.log 2>&1 < /dev/null &
    echo $! > "$pidfile"
    for _ in $(seq 120); do
      if .venv/bin/python -c "from pymilvus import MilvusClient; MilvusClient(uri='http://127.0.0.1:$port', timeout=2).list_collections()" \
          >/dev/null 2>&1; then
        echo "http://127.0.0.1:$port"
        exit 0
      fi
      sleep 1
    done
    echo "milvus_server.sh: the server did not answer on port $port (see .milvus-data/server.log)" >&2
    bash scripts/milvus_server.sh stop
    exit 1
    ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null   # the whole process group (etcd, milvus)
      for _ in $(seq 15); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -9 -- "-$pid" 2>/dev/null
      rm -f "$pidfile"
    fi
    pkill -9 -f "$PWD/.milvus-data/bin/milvus" 2>/dev/null   # a server binary that left its process group
    true
    ;;
  *) echo "usage: $0 start [PORT] | stop" >&2; exit 2 ;;
esac
