#!/usr/bin/env bash
# A single-node Apache Cassandra for the tests, run from Maven Central jars (no tarball,
# no Docker; needs java 17 and mvn). Usage: cassandra.sh start|stop|status|kill|resume
#   start   fetch the jars once, start a fresh node, print its CQL address (host:port)
#   stop    stop the node and delete its data
#   status  print the address and exit 0 when running, exit 3 when not
#   kill    SIGKILL the node and keep its data (a crash, for crash tests)
#   resume  start the node again on the data it had (commit log replayed), print the address
# Environment: CHATPROOF_CASSANDRA_PORT (CQL, 19042), CHATPROOF_CASSANDRA_STORAGE_PORT
# (17000), CHATPROOF_CASSANDRA_JMX_PORT (17199), CHATPROOF_CASSANDRA_HEAP (JVM heap, 512m),
# CHATPROOF_SERVICES_DIR (run dirs, /tmp/chatproof-services), CHATPROOF_CASSANDRA_LIB
# (jar cache).
set -euo pipefail
SCRIPT_NAME="cassandra.sh"
# shellcheck source=scripts/services/common.sh
source "$(dirname "$0")/common.sh"

CASSANDRA_VERSION=5.0.6
CASSANDRA_ARTIFACT="org.apache.cassandra:cassandra-all:$CASSANDRA_VERSION"
CQL_PORT="${CHATPROOF_CASSANDRA_PORT:-19042}"
STORAGE_PORT="${CHATPROOF_CASSANDRA_STORAGE_PORT:-17000}"
JMX_PORT="${CHATPROOF_CASSANDRA_JMX_PORT:-17199}"
LIB_DIR="${CHATPROOF_CASSANDRA_LIB:-$HOME/.cache/chatproof/cassandra-$CASSANDRA_VERSION/lib}"
RUN_DIR="$SERVICES_ROOT/cassandra"
PID_FILE="$RUN_DIR/cassandra.pid"
LOG_FILE="$RUN_DIR/cassandra.log"
HEAP_SIZE="${CHATPROOF_CASSANDRA_HEAP:-512m}"
START_WAIT_S_MAX=120
STOP_WAIT_S_MAX=20
# Every process we start carries this on its command line; live_pid checks for it.
PID_PATTERN="-Dcassandra.storagedir=$RUN_DIR/data"

# The JPMS flags from Cassandra's conf/jvm17-server.options (the "### JPMS" section).
JVM17_FLAGS=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
)

# Cassandra 5.0 runs on java 11 or 17; the flags above are the java 17 set.
check_java() {
  command -v java >/dev/null || die "java is not on PATH (Cassandra $CASSANDRA_VERSION needs java 17)"
  local version
  version="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
  [[ "$version" == 17 ]] || die "java on PATH is version '${version:-unknown}'; Cassandra $CASSANDRA_VERSION needs java 17"
}

# Downloads cassandra-all and its runtime dependencies into LIB_DIR, unless already there.
fetch_jars() {
  if [[ -f "$LIB_DIR/.complete" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is not on PATH; it is needed to fetch $CASSANDRA_ARTIFACT"
  say "fetching $CASSANDRA_ARTIFACT and its dependencies into $LIB_DIR"
  local work
  work="$(mktemp -d)"
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.chatproof</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  if ! mvn -q -B -Dstyle.color=never -f "$work/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$work/lib" -DincludeScope=runtime >"$work/mvn.log" 2>&1; then
    sed 's/\x1b\[[0-9;]*m//g' "$work/mvn.log" | tail -n 20 >&2
    local reason
    # The first non-empty [ERROR] line, without colour codes, says what went wrong.
    reason="$(awk '{ gsub(/\033\[[0-9;]*m/, "") } /^\[ERROR\] ./ { print substr($0, 9, 300); exit }' \
      "$work/mvn.log")"
    die "Maven could not fetch $CASSANDRA_ARTIFACT: ${reason:-see the output above} (full log: $work/mvn.log)"
  fi
  [[ -f "$work/lib/cassandra-all-$CASSANDRA_VERSION.jar" ]] ||
    die "Maven ran but cassandra-all-$CASSANDRA_VERSION.jar is not among the fetched jars (log: $work/mvn.log)"
  touch "$work/lib/.complete"
  mkdir -p "$(dirname "$LIB_DIR")"
  rm -rf "$LIB_DIR"
  mv "$work/lib" "$LIB_DIR"
  rm -rf "$work"
  say "fetched $(find "$LIB_DIR" -name '*.jar' | wc -l) jars"
}

write_conf() {
  mkdir -p "$RUN_DIR/conf"
  cat >"$RUN_DIR/conf/cassandra.yaml" <<EOF
# Generated by scripts/services/cassandra.sh: one loopback node for tests.
cluster_name: chatproof-test
num_tokens: 1
initial_token: 0
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [$RUN_DIR/data/data]
commitlog_directory: $RUN_DIR/data/commitlog
saved_caches_directory: $RUN_DIR/data/saved_caches
hints_directory: $RUN_DIR/data/hints
cdc_raw_directory: $RUN_DIR/data/cdc_raw
# Every write is fsynced to the commit log before Cassandra acknowledges it (writes
# arriving together share one fsync): the server acknowledges a message only once it is
# durable, so the node under it must be too. With the default "periodic" mode a SIGKILL
# of this node lost writes acknowledged in the last seconds (the cassandra_kill_9 test).
commitlog_sync: batch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$STORAGE_PORT"
listen_address: 127.0.0.1
storage_port: $STORAGE_PORT
rpc_address: 127.0.0.1
native_transport_port: $CQL_PORT
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
concurrent_reads: 8
concurrent_writes: 8
concurrent_compactors: 1
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
auto_snapshot: false
EOF
  # WARN and above, plus the two INFO lines that say the node is up.
  cat >"$RUN_DIR/conf/logback.xml" <<EOF
<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra.service.CassandraDaemon" level="INFO"/>
  <logger name="org.apache.cassandra.transport.PipelineConfigurator" level="INFO"/>
  <root level="WARN"><appender-ref ref="STDOUT"/></root>
</configuration>
EOF
}

# Starts java in the background; its stdout and stderr (the logback console) go to LOG_FILE.
spawn() {
  local jamm
  jamm="$(find "$LIB_DIR" -maxdepth 1 -name 'jamm-*.jar' | head -n 1)"
  [[ -n "$jamm" ]] || die "no jamm-*.jar in $LIB_DIR; delete $LIB_DIR to fetch the jars again"
  (
    cd "$RUN_DIR"
    exec java -Xms"$HEAP_SIZE" -Xmx"$HEAP_SIZE" -XX:+UseG1GC "${JVM17_FLAGS[@]}" \
      -javaagent:"$jamm" \
      -Dcassandra.config="file://$RUN_DIR/conf/cassandra.yaml" \
      -Dlogback.configurationFile="$RUN_DIR/conf/logback.xml" \
      -Dcassandra-foreground=yes \
      -Dcassandra.jmx.local.port="$JMX_PORT" \
      "$PID_PATTERN" \
      -XX:ErrorFile="$RUN_DIR/hs_err_%p.log" \
      -cp "$RUN_DIR/conf:$LIB_DIR/*" \
      org.apache.cassandra.service.CassandraDaemon
  ) </dev/null >"$LOG_FILE" 2>&1 &
  echo $! >"$PID_FILE"
}

# Waits until the CQL port accepts connections; on failure shows the log and stops the node.
wait_for_cql() {
  local pid="$1" waited_ds=0
  until port_open "$CQL_PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$LOG_FILE" >&2
      die "Cassandra exited during startup; its log: $LOG_FILE"
    fi
    if ((waited_ds >= START_WAIT_S_MAX * 10)); then
      tail -n 40 "$LOG_FILE" >&2
      stop_pid "$pid" "$STOP_WAIT_S_MAX"
      die "Cassandra did not open CQL port $CQL_PORT within ${START_WAIT_S_MAX}s; its log: $LOG_FILE"
    fi
    sleep 0.1
    waited_ds=$((waited_ds + 1))
  done
}

# Starts java on the data in RUN_DIR and waits for CQL; prints the address.
launch() {
  local started_s=$SECONDS
  spawn
  say "starting Cassandra $CASSANDRA_VERSION (pid $(<"$PID_FILE"), log $LOG_FILE)"
  wait_for_cql "$(<"$PID_FILE")"
  say "CQL is up on 127.0.0.1:$CQL_PORT after $((SECONDS - started_s))s"
  echo "127.0.0.1:$CQL_PORT"
}

start() {
  if [[ -n "$(live_pid "$PID_FILE" "$PID_PATTERN")" ]] && port_open "$CQL_PORT"; then
    say "already running"
    echo "127.0.0.1:$CQL_PORT"
    return 0
  fi
  stop_quietly
  check_java
  require_port_free "$CQL_PORT" "Cassandra CQL, CHATPROOF_CASSANDRA_PORT"
  require_port_free "$STORAGE_PORT" "Cassandra storage, CHATPROOF_CASSANDRA_STORAGE_PORT"
  require_port_free "$JMX_PORT" "Cassandra JMX, CHATPROOF_CASSANDRA_JMX_PORT"
  fetch_jars
  write_conf
  launch
}

# SIGKILL, no shutdown hooks: what the node had not written is lost as in a crash.
kill_node() {
  local pid
  pid="$(live_pid "$PID_FILE" "$PID_PATTERN")"
  [[ -n "$pid" ]] || die "not running"
  say "killing pid $pid (SIGKILL; data kept in $RUN_DIR/data)"
  kill -KILL "$pid"
  # Gone, or a zombie nobody reaps yet (state Z): either way it holds no port.
  local waited_ds=0
  while kill -0 "$pid" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]]; do
    ((waited_ds < STOP_WAIT_S_MAX * 10)) || die "pid $pid still alive ${STOP_WAIT_S_MAX}s after SIGKILL"
    sleep 0.1
    waited_ds=$((waited_ds + 1))
  done
}

# Starts a killed or stopped node on its existing data.
resume() {
  [[ -d "$RUN_DIR/data" ]] || die "no data in $RUN_DIR/data to resume from; use start"
  [[ -z "$(live_pid "$PID_FILE" "$PID_PATTERN")" ]] || die "already running"
  require_port_free "$CQL_PORT" "Cassandra CQL, CHATPROOF_CASSANDRA_PORT"
  require_port_free "$STORAGE_PORT" "Cassandra storage, CHATPROOF_CASSANDRA_STORAGE_PORT"
  require_port_free "$JMX_PORT" "Cassandra JMX, CHATPROOF_CASSANDRA_JMX_PORT"
  # Keep the log of the run that was killed.
  [[ -f "$LOG_FILE" ]] && mv "$LOG_FILE" "$LOG_FILE.before-resume"
  launch
}

# Stops a node left over from an earlier run (if any) and deletes its data.
stop_quietly() {
  local pid
  pid="$(live_pid "$PID_FILE" "$PID_PATTERN")"
  if [[ -n "$pid" ]]; then
    stop_pid "$pid" "$STOP_WAIT_S_MAX"
  fi
  rm -rf "$RUN_DIR/data" "$PID_FILE"
}

status() {
  local pid
  pid="$(live_pid "$PID_FILE" "$PID_PATTERN")"
  if [[ -n "$pid" ]] && port_open "$CQL_PORT"; then
    say "running (pid $pid)"
    echo "127.0.0.1:$CQL_PORT"
  elif [[ -n "$pid" ]]; then
    say "pid $pid is alive but CQL port $CQL_PORT is not open (starting, or broken: see $LOG_FILE)"
    exit 3
  else
    say "not running"
    exit 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  kill) kill_node ;;
  resume) resume ;;
  *) die "usage: $0 start|stop|status|kill|resume" ;;
esac
