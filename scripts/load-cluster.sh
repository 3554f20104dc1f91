#!/usr/bin/env bash
# Runs a load scenario against a cluster of reference servers on this machine: Redis and
# Cassandra (scripts/services/), SERVERS chatproof-server processes on the cluster backend,
# and chatproof-loadgen spreading the devices over all of them (user u on server u mod
# SERVERS, so 1:1 chats and groups cross servers). The report's server figures are the
# servers' CPU and memory summed (--server-pid). Everything started here is stopped on exit;
# services that were already running are left running.
#
# Usage: scripts/load-cluster.sh SERVERS SCENARIO [chatproof-loadgen run options...]
#   e.g. scripts/load-cluster.sh 12 scenarios/load/connections-200k.toml --workers 12
# Environment: CHATPROOF_LOAD_PORT_BASE (first server port, 18100); server flags through
# their CHATPROOF_* variables (e.g. CHATPROOF_IDLE_TIMEOUT_SECS); Cassandra's heap through
# CHATPROOF_CASSANDRA_HEAP (default here 2g); CHATPROOF_LOADGEN_COMMAND=capacity runs a
# capacity search against the cluster instead of one run (the options are then `capacity`'s).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
loadgen_command="${CHATPROOF_LOADGEN_COMMAND:-run}"
[[ "$loadgen_command" == run || "$loadgen_command" == capacity ]] || {
  echo "load-cluster.sh: CHATPROOF_LOADGEN_COMMAND must be run or capacity, not $loadgen_command" >&2
  exit 2
}
servers="$1"
scenario="$2"
shift 2
[[ -f "$scenario" ]] || { echo "load-cluster.sh: no scenario file $scenario" >&2; exit 2; }

services=scripts/services
port_base="${CHATPROOF_LOAD_PORT_BASE:-18100}"
export CHATPROOF_CASSANDRA_HEAP="${CHATPROOF_CASSANDRA_HEAP:-2g}"
work="$(mktemp -d "${TMPDIR:-/tmp}/chatproof-load-cluster.XXXXXX")"
started=()
server_pids=()

cleanup() {
  local rc=$? service pid
  trap - EXIT INT TERM
  for pid in "${server_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${server_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  for service in "${started[@]}"; do
    "$services/$service.sh" stop >/dev/null || true
  done
  echo "load-cluster.sh: server logs in $work" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cargo build --release --locked -p chatproof-server -p chatproof-loadgen

# Starts service $1 (stopped at exit unless it was already running); its address goes
# to variable $2. (Not in a command substitution: that subshell would lose `started`.)
start_service() {
  if ! "$services/$1.sh" status >/dev/null 2>&1; then
    started+=("$1")
  fi
  printf -v "$2" '%s' "$("$services/$1.sh" start)"
}
start_service redis redis_url
start_service cassandra cql_addr

secret="load-cluster-$RANDOM$RANDOM"
keyspace="load_$(date +%s)"
targets=()
# Starts server $1 in the background.
start_server() {
  local i="$1" port=$((port_base + $1))
  CHATPROOF_SECRET="$secret" RUST_LOG="${RUST_LOG:-warn}" target/release/chatproof-server serve \
    --listen "127.0.0.1:$port" --data-dir "$work/s$i" \
    --backend cluster --scylla-nodes "$cql_addr" --scylla-keyspace "$keyspace" \
    --redis-url "$redis_url" --server-id "load-$i" \
    >"$work/s$i.out" 2>"$work/s$i.log" &
  server_pids+=("$!")
  targets+=(--target "ws://127.0.0.1:$port")
}
# Waits until server $1 listens.
await_server() {
  local i="$1"
  for _ in $(seq 600); do
    grep -q '^listening on ' "$work/s$i.out" 2>/dev/null && return 0
    kill -0 "${server_pids[$i]}" 2>/dev/null || { echo "load-cluster.sh: server $i exited: $(tail -n 3 "$work/s$i.log")" >&2; exit 2; }
    sleep 0.1
  done
  echo "load-cluster.sh: server $i did not start in 60 s" >&2
  exit 2
}
# The first server creates the keyspace and tables alone: a dozen servers applying the
# schema at once to a node that has just started can fail its schema agreement.
start_server 0
await_server 0
for ((i = 1; i < servers; i++)); do
  start_server "$i"
done
for ((i = 1; i < servers; i++)); do
  await_server "$i"
done
echo "load-cluster.sh: $servers servers on ports $port_base..$((port_base + servers - 1)), Redis $redis_url, Cassandra $cql_addr (keyspace $keyspace)" >&2

pids="$(IFS=,; echo "${server_pids[*]}")"
set +e
CHATPROOF_SECRET="$secret" target/release/chatproof-loadgen "$loadgen_command" "$scenario" "${targets[@]}" --server-pid "$pids" "$@"
rc=$?
set -e
exit "$rc"
