#!/usr/bin/env bash
# The suite's steadiness check: runs ./scripts/test.sh N times (default 3) in a row while two
# CPU-bound processes share the machine's cores, as another job would on a CI runner or a
# developer's machine. Every run must pass. The load is two shell busy loops (stress-ng
# --cpu 2 does the same where installed: STEADY_LOAD=stress-ng), ended by pid on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
hogs=()
stop_hogs() { for p in "${hogs[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_hogs EXIT
if [ "${STEADY_LOAD:-}" = stress-ng ] && command -v stress-ng >/dev/null; then
    stress-ng --cpu 2 --quiet & hogs+=($!)
else
    for _ in 1 2; do sh -c 'while :; do :; done' & hogs+=($!); done
fi
failed=0
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    if ./scripts/test.sh > "target/steady-$i.log" 2>&1; then
        echo "steady: run $i of $runs passed in $(( $(date +%s) - start )) s"
    else
        echo "steady: run $i of $runs FAILED in $(( $(date +%s) - start )) s (target/steady-$i.log):"
        grep -E '^test .* FAILED|panicked at' -A2 "target/steady-$i.log" | head -40 || true
        failed=$((failed + 1))
    fi
done
[ "$failed" -eq 0 ]
