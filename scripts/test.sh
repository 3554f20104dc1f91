#!/usr/bin/env bash
# The test command (README.md): every test of the workspace.
# Services the tests need are started here and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked "$@"
