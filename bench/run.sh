#!/usr/bin/env bash
# Benchmarks (not part of the test suite): builds the release binary, installs py-spy 0.4 from
# PyPI into bench/.venv, then runs bench/bench.py, which exits non-zero when a target is missed.
# Run as root. Usage: bench/run.sh [--rounds N] [--only slowdown,threads,accuracy,symbolize,depth,soak,churn,agent,busy,dump,offcpu]
#                                  [--soak-seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --locked
if [ ! -x bench/.venv/bin/py-spy ]; then
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -q 'py-spy>=0.4,<0.5'
fi
exec python3 bench/bench.py "$@"
