#!/usr/bin/env bash
# One command from a fresh machine to a first profile: installs what is missing, builds the
# release binary, profiles the demo workload (testdata/split.py) and prints the top functions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --locked
PY=""
for v in 3.13 3.12; do
    for c in /root/.pyenv/versions/$v.*/bin/python$v "$(command -v python$v || true)"; do
        [ -x "$c" ] && { PY=$c; break 2; }
    done
done
if [ -z "$PY" ]; then
    echo "no CPython 3.12+ found: the demo needs its perf trampoline (python -X perf)" >&2
    exit 1
fi
OUT=${OUT:-demo.pb.gz}
echo "profiling $PY -X perf testdata/split.py for 5 s -> $OUT"
./target/release/perfpy record -d 5 -o "$OUT" -- "$PY" -X perf testdata/split.py 6
go tool pprof -top -nodecount=15 "$OUT"
