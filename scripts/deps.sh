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

# Debian unstable's own CPython 3.13, 3.14, 3.15 (stripped, non-PIE, libpython inside the
# executable, a newer glibc) in a chroot, the way distributions and containers ship them. Built
# once, outside the checkout so every clone reuses it; built in a temporary directory and renamed,
# so an interrupted run never leaves a half chroot behind. PERFPY_SID overrides the place.
SID=${PERFPY_SID:-/var/cache/perfpy/sid}
SID_PKGS=python3.13,python3.14,python3.15,libpython3.13-dev,libpython3.14-dev,libpython3.15-dev
sid_ready() { for v in 3.13 3.14 3.15; do [ -x "$SID/usr/bin/python$v" ] || return 1; done; }
if ! sid_ready; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    command -v debootstrap >/dev/null || {
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null 2>&1
    }
    # The machine's own Debian mirror (deb822 or one-line sources), not a security mirror.
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+' | grep -v -- '-security' | grep -m1 debian || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    echo "preparing the Debian sid chroot with CPython 3.13-3.15 in $SID (from $MIRROR, ~1 min)"
    $SUDO mkdir -p "$(dirname "$SID")"
    TMP_SID=$($SUDO mktemp -d "$SID.partial.XXXXXX")
    if $SUDO debootstrap --variant=minbase --include=$SID_PKGS sid "$TMP_SID" "$MIRROR" \
        >"$TMP_SID.log" 2>&1; then
        $SUDO rm -rf "$SID"
        $SUDO mv "$TMP_SID" "$SID"
        $SUDO rm -f "$TMP_SID.log"
    else
        echo "debootstrap failed (log: $TMP_SID.log); the tests of Debian's CPython 3.13-3.15 cannot run" >&2
        $SUDO rm -rf "$TMP_SID"
        [ "${CI:-}" = true ] && exit 1
    fi
fi
if [ "${CI:-}" = true ] && ! sid_ready; then
    echo "CI=true: Debian's python3.13/3.14/3.15 missing in $SID" >&2
    exit 1
fi
