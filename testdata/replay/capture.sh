#!/bin/sh
# Regenerates the replay fixtures (testdata/replay/*/): runs perfpy on real CPython builds with
# PERFPY_CAPTURE=DIR, which saves what the recording read (ring records, eBPF walker records,
# process memory it read, maps, perf maps, the mapped ELF files reduced to the parts read).
# Needs root (perf events, eBPF) and the pyenv interpreters of scripts/deps.sh; the replay
# itself (tests/it/replay.rs, `perfpy replay DIR`) needs neither. See testdata/replay/README.md.
set -eu
cd "$(dirname "$0")/../.."
cargo build --quiet
PERFPY="$PWD/target/debug/perfpy"
PY=/root/.pyenv/versions
OUT=testdata/replay
# The reduced ELF files, shared by the captures (named by content).
rm -rf "$OUT/files"
export PERFPY_CAPTURE_FILES="$OUT/files"

capture() { # NAME PERFPY-OPTIONS... -- COMMAND...
    name=$1
    shift
    rm -rf "${OUT:?}/$name"
    mkdir -p "$OUT/$name"
    PERFPY_CAPTURE="$OUT/$name" timeout 60 "$PERFPY" record -r 97 -f collapsed \
        -o "$OUT/$name/recorded.txt" "$@"
    echo "$name: $(du -sh "$OUT/$name" | cut -f1)"
}

# 3.12 under its perf trampoline, named by its perf map (no eBPF walker):
# <module> -> rec x4 -> sorted -> key_of (Python called back from C).
capture py312-trampoline --no-ebpf -- "$PY/3.12.1/bin/python3.12" testdata/deep_callback.py 3 1
# 3.11, Python frames from the eBPF walker merged with the native stack, same program.
capture py311-walker -- "$PY/3.11.7/bin/python3.11" testdata/deep_callback.py 3 1
# 3.12 with the walker, a C extension (hashlib: _hashlib -> libcrypto) under a Python caller.
capture py312-c-extension -- "$PY/3.12.1/bin/python3.12" testdata/hashing.py 1
