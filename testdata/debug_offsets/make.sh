#!/usr/bin/env bash
# Saves the _Py_DebugOffsets of every installed CPython 3.13+ (Debian's in the sid chroot of
# scripts/deps.sh, pyenv's) as testdata/debug_offsets/<where>-<version>.bin.
set -euo pipefail
cd "$(dirname "$0")"
SID=${PERFPY_SID:-/var/cache/perfpy/sid}
for v in 3.13 3.14 3.15; do
    if [ -x "$SID/usr/bin/python$v" ]; then
        cp dump.py "$SID/tmp/perfpy-dump.py"
        chroot "$SID" "/usr/bin/python$v" /tmp/perfpy-dump.py >"debian-$v.bin"
        rm -f "$SID/tmp/perfpy-dump.py"
    fi
done
for py in /root/.pyenv/versions/3.1[3-9].*/bin/python3.1[3-9]; do
    [ -x "$py" ] || continue
    v=$(basename "$py" | sed 's/python//')
    "$py" dump.py >"pyenv-$v.bin"
done
ls -l ./*.bin
