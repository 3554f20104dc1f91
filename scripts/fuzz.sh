#!/usr/bin/env bash
# Fuzzes the server's inputs with cargo fuzz (libFuzzer, nightly, AddressSanitizer):
# frame_decoder, token, request_inputs, image_sniff (fuzz/fuzz_targets/).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
# Seeds: fuzz/corpus/TARGET/ (committed); what a run finds grows fuzz/work/TARGET/;
# a crash is saved under fuzz/artifacts/TARGET/ and fails the script. Copy a crash
# into fuzz/corpus/TARGET/ once fixed: `cargo test -p chatproof-server --test fuzz_corpus`
# replays every committed input on stable in the test suite.
# Installs cargo-fuzz (crates.io) when it is missing; needs the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decoder token request_inputs image_sniff)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  mkdir -p "work/$t"
  echo "-- cargo fuzz run $t for ${secs}s"
  if ! cargo +nightly fuzz run -O "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 > "work/$t.log" 2>&1; then
    tail -n 40 "work/$t.log"
    echo "fuzz target $t failed; the input is under fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E "^(#[0-9]+.*DONE|Done [0-9]+ runs)" "work/$t.log" || true
done
