#!/usr/bin/env bash
# A private Redis for the tests (not the system service), installed with apt-get when
# redis-server is missing. Usage: redis.sh start|stop|status
#   start   start a fresh instance (no persistence), print its URL (redis://127.0.0.1:PORT/)
#   stop    stop the instance and delete its run dir's files
#   status  print the URL and exit 0 when running, exit 3 when not
# Environment: CHATPROOF_REDIS_PORT (16379), CHATPROOF_SERVICES_DIR (/tmp/chatproof-services).
set -euo pipefail
SCRIPT_NAME="redis.sh"
# shellcheck source=scripts/services/common.sh
source "$(dirname "$0")/common.sh"

REDIS_PORT="${CHATPROOF_REDIS_PORT:-16379}"
RUN_DIR="$SERVICES_ROOT/redis"
PID_FILE="$RUN_DIR/redis.pid"
LOG_FILE="$RUN_DIR/redis.log"
START_WAIT_S_MAX=20
STOP_WAIT_S_MAX=10
# redis-server shows its bind address and port in its process title.
PID_PATTERN="127.0.0.1:$REDIS_PORT"
URL="redis://127.0.0.1:$REDIS_PORT/"

install_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  apt_install redis-server
  command -v redis-server >/dev/null || die "redis-server is still not on PATH after installing it"
}

pong() { [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

start() {
  if [[ -n "$(live_pid "$PID_FILE" "$PID_PATTERN")" ]] && pong; then
    say "already running"
    echo "$URL"
    return 0
  fi
  stop_quietly
  install_redis
  require_port_free "$REDIS_PORT" "Redis, CHATPROOF_REDIS_PORT"
  mkdir -p "$RUN_DIR"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize yes --pidfile "$PID_FILE" --logfile "$LOG_FILE" --dir "$RUN_DIR" >&2 ||
    die "redis-server failed to start (log: $LOG_FILE)"
  local waited_ds=0
  until pong; do
    if ((waited_ds >= START_WAIT_S_MAX * 10)); then
      tail -n 20 "$LOG_FILE" >&2 || true
      stop_quietly
      die "Redis did not answer PING on port $REDIS_PORT within ${START_WAIT_S_MAX}s"
    fi
    sleep 0.1
    waited_ds=$((waited_ds + 1))
  done
  say "Redis is up on 127.0.0.1:$REDIS_PORT (pid $(<"$PID_FILE"))"
  echo "$URL"
}

# Stops an instance left over from an earlier run (if any) and deletes its files.
stop_quietly() {
  local pid
  pid="$(live_pid "$PID_FILE" "$PID_PATTERN")"
  if [[ -n "$pid" ]]; then
    stop_pid "$pid" "$STOP_WAIT_S_MAX"
  fi
  rm -rf "$RUN_DIR"
}

status() {
  local pid
  pid="$(live_pid "$PID_FILE" "$PID_PATTERN")"
  if [[ -n "$pid" ]] && command -v redis-cli >/dev/null && pong; then
    say "running (pid $pid)"
    echo "$URL"
  else
    say "not running"
    exit 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
