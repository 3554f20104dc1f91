#!/usr/bin/env bash
# Benchmarks the reference server against the protocol floor and keeps the results as
# baselines: OUT/<name>/ (summary.json, report.md, report.html of each search or run) and
# a figures table, OUT/TABLE.md, also printed. Rows of items not run now are kept.
#
# Usage: scripts/bench.sh [--quick] [--no-build] [--out DIR] [ITEM...]
#   dm        capacity search of scenarios/bench/dm-2k.toml, server and floor  -> dm-2k-capacity/
#   fanout    capacity search of scenarios/bench/fanout-2k.toml, server and floor -> fanout-2k-capacity/
#   presence  run of scenarios/bench/presence-burst.toml (2,000 devices online at once) -> presence-burst/
#   idle      run of scenarios/bench/idle-19k.toml (memory per connection, connect latency) -> idle-19k/
#   cluster   dm-2k capacity search on 2 cluster servers (Redis + Cassandra via
#             scripts/load-cluster.sh), floor alongside -> dm-2k-cluster-capacity/
#   Default items: dm fanout presence idle (all but cluster).
#   --quick     capacity searches of at most 2 steps per side, OUT defaults to reports/bench-quick
#   --no-build  use target/release as it is (default: cargo build --release first)
#   --out DIR   where results and TABLE.md go (default reports/baselines/bench)
# Time: a capacity step is one ~30 s run; a search takes at most 8 steps per side (16 runs,
# about 10 min); each item is stopped after a bound (STEP_SECS_MAX, RUN_SECS_MAX). Needs jq
# (installed with apt-get when missing).
# Exit status: 0 every item passed, 1 an item missed its targets, found no knee or was
# stopped, 2 usage or setup error.
set -euo pipefail
cd "$(dirname "$0")/.."

SCRIPT_NAME=bench.sh
# shellcheck source=services/common.sh
source scripts/services/common.sh
# Usage and setup errors (apt_install's too) exit with status 2.
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 2; }

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

ITEMS_ALL=(dm fanout presence idle cluster)
ITEMS_DEFAULT=(dm fanout presence idle)
CAPACITY_STEPS_MAX=8
CAPACITY_STEPS_QUICK=2
# A step is warm-up + 20 s + drain + connecting 2,000 devices: well under 120 s.
STEP_SECS_MAX=120
RUN_SECS_MAX=300
CLUSTER_SERVERS=2

quick=false
build=true
out=""
items=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --quick) quick=true ;;
    --no-build) build=false ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out="$2"; shift ;;
    -*) usage >&2; die "unknown option $1" ;;
    *)
      [[ " ${ITEMS_ALL[*]} " == *" $1 "* ]] || { usage >&2; die "unknown item $1"; }
      items+=("$1")
      ;;
  esac
  shift
done
((${#items[@]})) || items=("${ITEMS_DEFAULT[@]}")
if [[ -z "$out" ]]; then
  if $quick; then out=reports/bench-quick; else out=reports/baselines/bench; fi
fi
steps_max=$CAPACITY_STEPS_MAX
$quick && steps_max=$CAPACITY_STEPS_QUICK
# Two searches (server, floor) of at most steps_max steps each.
capacity_secs_max=$((2 * steps_max * STEP_SECS_MAX))

command -v jq >/dev/null || apt_install jq
mkdir -p "$out"
work="$(mktemp -d "${TMPDIR:-/tmp}/chatproof-bench.XXXXXX")"
keep_work=false
cleanup() {
  if $keep_work; then say "step runs and logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

if $build; then
  cargo build --release --locked -p chatproof-loadgen -p chatproof-server
fi
loadgen=target/release/chatproof-loadgen
[[ -x "$loadgen" ]] || die "$loadgen is missing (run without --no-build)"

today="$(date -u +%F)"
machine="$(nproc) cores, $(awk '/^MemTotal:/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo)"

# Result folder name of each item under OUT.
dest_of() {
  case "$1" in
    dm) echo dm-2k-capacity ;;
    fanout) echo fanout-2k-capacity ;;
    presence) echo presence-burst ;;
    idle) echo idle-19k ;;
    cluster) echo dm-2k-cluster-capacity ;;
  esac
}

# The scenario file of each item.
scenario_of() {
  case "$1" in
    dm | cluster) echo scenarios/bench/dm-2k.toml ;;
    fanout) echo scenarios/bench/fanout-2k.toml ;;
    presence) echo scenarios/bench/presence-burst.toml ;;
    idle) echo scenarios/bench/idle-19k.toml ;;
  esac
}

capacity_args() { echo "--floor --max-steps $steps_max"; }

# The command each item runs, as the table shows it.
command_of() {
  local scenario
  scenario="$(scenario_of "$1")"
  case "$1" in
    dm | fanout) echo "chatproof-loadgen capacity $scenario $(capacity_args)" ;;
    presence | idle) echo "chatproof-loadgen run $scenario" ;;
    cluster)
      echo "CHATPROOF_LOADGEN_COMMAND=capacity scripts/load-cluster.sh $CLUSTER_SERVERS $scenario $(capacity_args)"
      ;;
  esac
}

# Runs item $1 with its reports under directory $2; returns the generator's exit status.
# `timeout` signals the whole process group: the generator, its steps and the servers it started.
run_item() {
  local item="$1" dir="$2" scenario rc=0
  scenario="$(scenario_of "$item")"
  # shellcheck disable=SC2046 # capacity_args is split into options on purpose
  case "$item" in
    dm | fanout)
      timeout --signal=INT --kill-after=30 "$capacity_secs_max" \
        "$loadgen" capacity "$scenario" $(capacity_args) --out-dir "$dir" || rc=$?
      ;;
    presence | idle)
      timeout --signal=INT --kill-after=30 "$RUN_SECS_MAX" \
        "$loadgen" run "$scenario" --out-dir "$dir" || rc=$?
      ;;
    cluster)
      # Starting Redis and Cassandra may take minutes: 10 more than the search's bound.
      CHATPROOF_LOADGEN_COMMAND=capacity timeout --signal=INT --kill-after=60 \
        "$((capacity_secs_max + 600))" scripts/load-cluster.sh "$CLUSTER_SERVERS" \
        "$scenario" $(capacity_args) --out-dir "$dir" || rc=$?
      ;;
  esac
  return "$rc"
}

# Prints one table row: item, figure, value, ratio to the floor ("" for none).
row() { printf '| %s | %s | %s | %s | `%s` | %s | %s |\n' "$1" "$2" "$3" "${4:--}" "$5" "$today" "$machine"; }

# jq helpers: a number with n decimals, bytes in KiB; "n/a" for a figure not measured.
JQ_FORMAT='
  def fixed(n): if . == null then "n/a" else (. * pow(10; n) | round) / pow(10; n) | tostring end;
  def kib: if . == null then "n/a" else . / 1024 | fixed(1) end;
'

# Prints the rows of item $1 from summary file $2.
rows_of() {
  local item="$1" summary="$2" command line
  command="$(command_of "$item")"
  case "$item" in
    dm | fanout | cluster) capacity_figures "$summary" ;;
    presence) run_figures "$summary" connect ;;
    idle) run_figures "$summary" memory ;;
  esac | while IFS=$'\t' read -r figure value ratio; do
    row "$item" "$figure" "$value" "$ratio" "$command"
  done
}

# Tab-separated figure, value, ratio to the floor of a capacity search's summary.
capacity_figures() {
  jq -r "$JQ_FORMAT"'
    def ratio(f): if (.floor.knee | f) == null or (.floor.knee | f) == 0 or (.server.knee | f) == null
      then "" else ((.server.knee | f) / (.floor.knee | f) | fixed(2)) end;
    .scenario as $s
    | if .server.knee == null then [["\($s): knee", "none (no rate passed)", ""]]
      else [
        ["\($s): knee, msgs/s offered", (.server.knee.offered_per_sec | fixed(0)),
          (.knee_ratio_to_floor | fixed(2) | sub("^n/a$"; ""))],
        ["\($s): deliveries/s at the knee", (.server.knee.delivered_per_sec | fixed(0)),
          ratio(.delivered_per_sec)],
        ["\($s): delivery p99 at the knee, ms", (.server.knee.delivery_p99_ms | fixed(1)),
          ratio(.delivery_p99_ms)],
        ["\($s): server CPU per message, µs", (.server.knee.server_cpu_us_per_message | fixed(1)),
          ratio(.server_cpu_us_per_message)],
        ["\($s): server memory per connection, KiB", (.server.knee.server_bytes_per_connection | kib),
          ratio(.server_bytes_per_connection)],
        ["\($s): floor knee, msgs/s offered", (.floor.knee.offered_per_sec | fixed(0)), ""],
        ["\($s): verdict", (if .pass then "pass" else "fail" end), ""]
      ] end
    | .[] | @tsv' "$1"
}

# Tab-separated figure, value, ratio ("") of a run's summary; $2 says which figures lead:
# `connect` (a burst of devices) or `memory` (idle connections).
run_figures() {
  jq -r --arg lead "$2" "$JQ_FORMAT"'
    .scenario as $s
    | [
        (if $lead == "memory" then
          ["\($s): server memory per connection, KiB", (.server_usage.bytes_per_connection | kib), ""]
        else empty end),
        ["\($s): devices connected", "\(.counts.devices_connected) of \(.counts.devices_planned)", ""],
        ["\($s): connect p50 / p99, ms",
          "\(.latency.connect.p50_ms | fixed(1)) / \(.latency.connect.p99_ms | fixed(1))", ""],
        ["\($s): delivery p99, ms (target \(.config.slo.delivery_p99_ms))", (.latency.delivery.p99_ms | fixed(1)), ""],
        ["\($s): send→ack p99, ms (target \(.config.slo.ack_p99_ms))", (.latency.send_ack.p99_ms | fixed(1)), ""],
        ["\($s): deliveries received", "\(.counts.deliveries_received) of \(.counts.deliveries_expected)", ""],
        ["\($s): verdict",
          (if .pass then "pass" elif .valid then "fail" else "invalid: \(.invalid_reasons | join("; "))" end), ""]
      ]
    | .[] | @tsv' "$1"
}

declare -A status new_rows
failed=false
for item in "${items[@]}"; do
  dest="$out/$(dest_of "$item")"
  dir="$work/$item"
  say "$item: $(command_of "$item")"
  rc=0
  # The generator's report goes to stderr with its progress: stdout carries only the table.
  run_item "$item" "$dir" >&2 || rc=$?
  # The search's or run's own folder: OUT/<scenario>/<timestamp or capacity-timestamp>/.
  summary="$(find "$dir" -mindepth 3 -maxdepth 3 -name summary.json 2>/dev/null | head -n 1)"
  if [[ -z "$summary" ]]; then
    status[$item]="no result (exit $rc)"
    failed=true
    keep_work=true
    continue
  fi
  rm -rf "$dest"
  mkdir -p "$dest"
  for file in summary.json report.md report.html; do
    if [[ -f "$(dirname "$summary")/$file" ]]; then cp "$(dirname "$summary")/$file" "$dest/"; fi
  done
  new_rows[$item]="$(rows_of "$item" "$dest/summary.json")"
  if ((rc == 0)); then
    status[$item]="pass"
  else
    status[$item]="exit $rc (see $dest/report.md)"
    failed=true
    keep_work=true
  fi
done

# The table: this run's rows, and the previous table's rows of every other item.
table="$out/TABLE.md"
previous="$(cat "$table" 2>/dev/null || true)"
{
  echo "# Benchmark figures: reference server against the protocol floor"
  echo
  echo "Written by \`scripts/bench.sh\`. Ratio to floor: the server's figure over the floor's"
  echo "at each one's knee (higher is better for rates, lower for costs and latencies)."
  echo
  echo "| item | figure | value | ratio to floor | command | date | machine |"
  echo "|---|---|---|---|---|---|---|"
  for item in "${ITEMS_ALL[@]}"; do
    if [[ -n "${new_rows[$item]:-}" ]]; then
      printf '%s\n' "${new_rows[$item]}"
    else
      grep "^| $item |" <<<"$previous" || true
    fi
  done
} >"$table.tmp"
mv "$table.tmp" "$table"
cat "$table"

echo >&2
for item in "${items[@]}"; do
  say "$item: ${status[$item]}"
done
say "table written to $table"
if $failed; then exit 1; fi
