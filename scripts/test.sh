#!/usr/bin/env bash
# The test command (README.md): every test of the workspace.
# Services the tests need are started here and stopped on exit (scripts/services/):
# Redis must start, or this fails; when Cassandra cannot start, the tests get
# CHATPROOF_TEST_CQL=unavailable:<reason> and report the Scylla tests as skipped.
# Debian's chromium is installed when missing (the browser checks of the HTML reports);
# when it cannot be, those checks are skipped, or this fails if CHATPROOF_REQUIRE_BROWSER=1.
# CHATPROOF_SCYLLA_NODES=host:port[,...] runs the Scylla tests against that cluster
# instead of starting Cassandra. CHATPROOF_TEST_SERVICES=external starts nothing and passes CHATPROOF_TEST_CQL and
# CHATPROOF_TEST_REDIS through as given.
set -euo pipefail
cd "$(dirname "$0")/.."
services=scripts/services
started=()

# Stops what this script started, then exits with status $1.
stop_started_and_exit() {
  local rc="$1" service
  trap - EXIT INT TERM
  for service in "${started[@]}"; do
    "$services/$service.sh" stop || true
  done
  exit "$rc"
}

# Marks service $1 to be stopped at exit unless it already runs (then it is left running).
stop_at_exit_unless_running() {
  if ! "$services/$1.sh" status >/dev/null 2>&1; then
    started+=("$1")
  fi
}

# Starts service $1 and prints its address; progress goes to stderr and into file $2.
start_service() {
  { "$services/$1.sh" start 2>&1 1>&3 3>&- | tee "$2" >&2; } 3>&1
}

loud() {
  printf '\n%s\n' "######################################################################" >&2
  printf '### %s\n' "$@" >&2
  printf '%s\n\n' "######################################################################" >&2
}

if [[ "${CHATPROOF_TEST_SERVICES:-}" == external ]]; then
  echo "test.sh: external services: CHATPROOF_TEST_CQL=${CHATPROOF_TEST_CQL:-<unset>}" \
    "CHATPROOF_TEST_REDIS=${CHATPROOF_TEST_REDIS:-<unset>}" >&2
else
  # Tests that need a service fail, rather than skip, when its variable is missing.
  export CHATPROOF_REQUIRE_SERVICES=1
  trap 'stop_started_and_exit $?' EXIT
  trap 'stop_started_and_exit 130' INT
  trap 'stop_started_and_exit 143' TERM
  log="$(mktemp)"
  stop_at_exit_unless_running redis
  if ! redis_url="$(start_service redis "$log")"; then
    loud "Redis could not start: $(tail -n 1 "$log")" "The tests need Redis; not running them."
    rm -f "$log"
    exit 1
  fi
  export CHATPROOF_TEST_REDIS="$redis_url"
  if [[ -n "${CHATPROOF_SCYLLA_NODES:-}" ]]; then
    # A real ScyllaDB (or Cassandra) cluster given by the user: test against it instead.
    export CHATPROOF_TEST_CQL="$CHATPROOF_SCYLLA_NODES"
  else
    stop_at_exit_unless_running cassandra
    if cql_addr="$(start_service cassandra "$log")"; then
      export CHATPROOF_TEST_CQL="$cql_addr"
    else
      reason="$(tail -n 1 "$log" | sed 's/^cassandra\.sh: error: //')"
      loud "Cassandra is UNAVAILABLE: $reason" \
        "The Scylla store tests will be reported as SKIPPED, not run."
      export CHATPROOF_TEST_CQL="unavailable:$reason"
    fi
  fi
  # Debian's Chromium opens the generated HTML reports headless; when it cannot be
  # installed the page checks are skipped, loudly (CHATPROOF_REQUIRE_BROWSER=1, as CI
  # sets it, makes them fail instead).
  if chromium_path="$(start_service chromium "$log")"; then
    export CHATPROOF_CHROMIUM="$chromium_path" CHATPROOF_REQUIRE_BROWSER=1
  elif [[ "${CHATPROOF_REQUIRE_BROWSER:-}" == 1 ]]; then
    loud "Chromium could not be installed: $(tail -n 1 "$log")" "CHATPROOF_REQUIRE_BROWSER=1 requires it; not running the tests."
    rm -f "$log"
    exit 1
  else
    loud "Chromium is UNAVAILABLE: $(tail -n 1 "$log")" "The browser checks of the HTML reports will be SKIPPED."
  fi
  rm -f "$log"
  echo "test.sh: CHATPROOF_TEST_CQL=$CHATPROOF_TEST_CQL CHATPROOF_TEST_REDIS=$CHATPROOF_TEST_REDIS" >&2
fi

cargo test --workspace --locked "$@"
