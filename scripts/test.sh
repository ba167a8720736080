#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the integration tests, one build shared.
# Must run as root (perf events, ptrace, BPF). With CI=true a missing interpreter or tool fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --workspace --tests --locked
cargo test --workspace --locked --no-fail-fast -- --test-threads=2
