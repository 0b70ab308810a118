#!/usr/bin/env bash
# Redis for Cleave's discovery, load reports and KV index, without systemd:
#   redis.sh install   Debian's redis-server, if missing
#   redis.sh start     daemonized on 127.0.0.1:$CLEAVE_REDIS_PORT, no persistence; waits for PING
#   redis.sh stop      via the pidfile; waits until the process is gone
#   redis.sh status    exit 0 and "running" when PING answers, exit 3 otherwise
# Every command is idempotent. Files live in $CLEAVE_HOME/redis (default ~/.cache/cleave/redis).
set -euo pipefail
source "$(dirname "$0")/debian.sh"

PORT="${CLEAVE_REDIS_PORT:-6390}"
HOME_DIR="${CLEAVE_HOME:-$HOME/.cache/cleave}"
DIR="$HOME_DIR/redis"
PIDFILE="$DIR/redis-$PORT.pid"
LOGFILE="$DIR/redis-$PORT.log"
TIMEOUT="${CLEAVE_REDIS_TIMEOUT:-20}"

say() { echo "redis: $*" >&2; }

ping() {
  [[ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" == "PONG" ]]
}

pid_alive() {
  [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

install() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return 0
  fi
  debian_install redis redis-server
}

start() {
  if ping; then
    say "already running on 127.0.0.1:$PORT"
    return 0
  fi
  command -v redis-server >/dev/null || { say "redis-server is not installed; run: $0 install"; exit 1; }
  mkdir -p "$DIR"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --protected-mode yes \
    --dir "$DIR" --pidfile "$PIDFILE" --logfile "$LOGFILE" --save '' --appendonly no
  local deadline=$((SECONDS + TIMEOUT))
  until ping; do
    if ((SECONDS >= deadline)); then
      say "no PING answer on 127.0.0.1:$PORT after ${TIMEOUT}s; see $LOGFILE"
      tail -n 20 "$LOGFILE" >&2 || true
      exit 1
    fi
    sleep 0.05
  done
  say "running on 127.0.0.1:$PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'))"
}

stop() {
  if ! pid_alive; then
    rm -f "$PIDFILE"
    say "not running (no live pid in $PIDFILE)"
    return 0
  fi
  local pid
  pid="$(cat "$PIDFILE")"
  kill -TERM "$pid"
  local deadline=$((SECONDS + TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      say "pid $pid ignored SIGTERM for ${TIMEOUT}s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  rm -f "$PIDFILE"
  say "stopped"
}

status() {
  if command -v redis-cli >/dev/null && ping; then
    echo "running 127.0.0.1:$PORT pid $(cat "$PIDFILE" 2>/dev/null || echo '?')"
    return 0
  fi
  echo "stopped 127.0.0.1:$PORT"
  return 3
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
