#!/usr/bin/env bash
# Runs chatproof-sim: a simulation build (--cfg madsim) in its own target directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg madsim"
export CARGO_TARGET_DIR="${CHATPROOF_SIM_TARGET_DIR:-target-madsim}"
cargo build --quiet --release -p chatproof-sim
exec "$CARGO_TARGET_DIR/release/chatproof-sim" "$@"
