#!/usr/bin/env bash
# Installs what perfpy needs to build and test on Debian 12, if missing. Idempotent and quiet
# when everything is there.
set -euo pipefail
need=()
for p in clang llvm libelf-dev zlib1g-dev pkg-config golang-go gcc binutils linux-perf; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "perfpy needs Rust (cargo): https://rustup.rs" >&2; exit 1; }
