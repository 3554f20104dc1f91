#!/usr/bin/env bash
# The simulator's CI: fixed seeds of every preset, seeds derived from the commit hash on
# every preset so every commit explores new ground, the determinism check and the mutant
# check; work that runs on one core goes two lanes at once.
# JUnit reports go to reports/sim-junit/.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg madsim"
export CARGO_TARGET_DIR="${CHATPROOF_SIM_TARGET_DIR:-target-madsim}"
cargo build --quiet --release --locked -p chatproof-sim
sim="$CARGO_TARGET_DIR/release/chatproof-sim"
out=reports/sim-junit
mkdir -p "$out"

# Shows what failed in log $1: each failing seed's verdict and replay command, then the end.
show_failure() {
  grep -A 12 '^  FAIL seed' "$1" | head -n 80 || true
  echo "-- end of $1:"
  tail -n 30 "$1"
}

run() { # preset seeds
  echo "-- chatproof-sim run --scenario scenarios/sim/$1.toml --seeds $2"
  # Results (and failing seeds' traces) go to stdout, progress to stderr: both to the log;
  # the summary line is shown, or the log's end when a seed failed.
  "$sim" run --scenario "scenarios/sim/$1.toml" --seeds "$2" --junit "$out/$1.xml" > "$out/$1.log" 2>&1 || {
    status=$?; show_failure "$out/$1.log"; exit "$status"; }
  grep '^chatproof-sim: preset' "$out/$1.log" || true
}
swarm_run() { # preset seeds: the same over both cores (one summary)
  echo "-- chatproof-sim swarm --scenario scenarios/sim/$1.toml --seeds $2 --jobs 2"
  "$sim" swarm --scenario "scenarios/sim/$1.toml" --seeds "$2" --jobs 2 \
    --junit-dir "$out/$1" > "$out/$1.log" 2>&1 || {
    status=$?; show_failure "$out/$1.log"; exit "$status"; }
  grep '^chatproof-sim swarm: preset' "$out/$1.log" || true
}
# Two lanes at once: runs each a process on one core go side by side, each lane's
# output printed when both have ended; the script fails with the first failing lane.
both() { # lane_a lane_b (functions)
  "$1" > "$out/lane-$1.txt" 2>&1 &
  local pa=$! sa=0 sb=0
  "$2" > "$out/lane-$2.txt" 2>&1 &
  local pb=$!
  wait "$pa" || sa=$?
  wait "$pb" || sb=$?
  cat "$out/lane-$1.txt" "$out/lane-$2.txt"
  (( sa == 0 )) || exit "$sa"
  (( sb == 0 )) || exit "$sb"
}

commit=$(git rev-parse HEAD 2>/dev/null || echo 0)
base=$(( 16#${commit:0:12} ))
run_commit() { # preset count
  echo "-- chatproof-sim run --scenario scenarios/sim/$1.toml --seeds $base..$((base + $2)) (from commit ${commit:0:12})"
  "$sim" run --scenario "scenarios/sim/$1.toml" --seeds "$base..$((base + $2))" \
    --junit "$out/commit-$1.xml" > "$out/commit-$1.log" 2>&1 || {
    status=$?; show_failure "$out/commit-$1.log"; exit "$status"; }
  grep '^chatproof-sim: preset' "$out/commit-$1.log" || true
}

# The 500-member preset's seeds (fixed and from the commit), one core each, side by side.
fanout_fixed() { run group-fanout-500 1..3; }
fanout_commit() { run_commit group-fanout-500 2; }
both fanout_fixed fanout_commit

# Fixed seeds of every preset over both cores.
swarm_run smoke 1..201
swarm_run crash-restart 1..41
swarm_run partition-heavy 1..41
swarm_run reconnect-storm 1..41
swarm_run cluster 1..201
swarm_run storage-faults 1..101
swarm_run router-outage 1..101
swarm_run overlapping-faults 1..101
swarm_run retention 1..101
swarm_run small-limits 1..101

# Seeds derived from the commit hash on every preset, so every commit explores new ground.
swarm_commit() { # preset count
  echo "-- chatproof-sim swarm --scenario scenarios/sim/$1.toml --seeds $base..$((base + $2)) --jobs 2 (from commit ${commit:0:12})"
  "$sim" swarm --scenario "scenarios/sim/$1.toml" --seeds "$base..$((base + $2))" --jobs 2 \
    --junit-dir "$out/commit-$1" > "$out/commit-$1.log" 2>&1 || {
    status=$?; show_failure "$out/commit-$1.log"; exit "$status"; }
  grep '^chatproof-sim swarm: preset' "$out/commit-$1.log" || true
}
swarm_commit smoke 50
swarm_commit crash-restart 20
swarm_commit partition-heavy 20
swarm_commit reconnect-storm 20
swarm_commit cluster 100
swarm_commit storage-faults 30
swarm_commit router-outage 30
swarm_commit overlapping-faults 20
swarm_commit retention 30
swarm_commit small-limits 30

mutants() {
  echo "-- mutants (each must be caught within 30 seeds)"
  "$sim" mutants --seeds-max 30 | tee "$out/mutants.txt"

  # A failing seed as a picture, opened in a real browser: the seed that caught the
  # skip-idempotency mutant, replayed with --html; it must show the swimlanes and mark the
  # violation.
  seed=$(sed -n 's/^mutant skip-idempotency *caught after *\([0-9]*\) seed.*/\1/p' "$out/mutants.txt")
  echo "-- picture of a failing seed: replay $seed --mutant skip-idempotency --html"
  status=0
  "$sim" replay "$seed" --mutant skip-idempotency --html "$out/failing-seed.html" \
    > "$out/failing-seed.log" 2>&1 || status=$?
  [[ "$status" == 1 ]] || { tail -n 30 "$out/failing-seed.log"; echo "replay exited $status, expected 1 (a violation)"; exit 1; }
  bash scripts/check-page.sh "$out/failing-seed.html" 'data-chart="swimlanes"' '<svg' 'class="violation"' \
    'data-verdict="FAIL"' 'data-table="violations"'
}
determinism() {
  echo "-- determinism (smoke seeds 1..4, each run twice plus madsim's draw-log check)"
  "$sim" determinism --seeds 1..4
  echo "-- determinism (cluster seeds 1..3)"
  "$sim" determinism --scenario scenarios/sim/cluster.toml --seeds 1..3
  echo "-- determinism (storage-faults seeds 1..3)"
  "$sim" determinism --scenario scenarios/sim/storage-faults.toml --seeds 1..3
  echo "-- swarm (smoke seeds 1..9 over 2 processes, one summary)"
  "$sim" swarm --seeds 1..9 --jobs 2 --junit-dir "$out/swarm"
}
both mutants determinism
