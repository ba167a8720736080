#!/usr/bin/env bash
# Installs what perfpy needs to build and test on Debian 12, if missing. Idempotent and quiet
# when everything is there.
set -euo pipefail
need=()
for p in clang llvm libelf-dev zlib1g-dev pkg-config golang-go gcc binutils linux-perf tmux; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "perfpy needs Rust (cargo): https://rustup.rs" >&2; exit 1; }

# Sets SUDO and MIRROR (this machine's own Debian mirror, deb822 or one-line sources, not a
# security mirror) and installs debootstrap if missing: the sid chroots below are made with it.
prepare_debootstrap() {
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    command -v debootstrap >/dev/null || {
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null 2>&1
    }
    MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+' | grep -v -- '-security' | grep -m1 debian || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
}

# Debian unstable's own CPython 3.13, 3.14, 3.15 (stripped, non-PIE, libpython inside the
# executable, a newer glibc) in a chroot, the way distributions and containers ship them. Built
# once, outside the checkout so every clone reuses it; built in a temporary directory and renamed,
# so an interrupted run never leaves a half chroot behind. PERFPY_SID overrides the place.
SID=${PERFPY_SID:-/var/cache/perfpy/sid}
SID_PKGS=python3.13,python3.14,python3.15,libpython3.13-dev,libpython3.14-dev,libpython3.15-dev
sid_ready() { for v in 3.13 3.14 3.15; do [ -x "$SID/usr/bin/python$v" ] || return 1; done; }
if ! sid_ready; then
    prepare_debootstrap
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

# A real OpenTelemetry Collector for the tests of the OTLP profiles export (tests/it/otlp.rs): Debian
# unstable packages the Collector's Go source (golang-opentelemetry-collector-dev) with golang-go;
# installed in their own sid chroot (so the Python chroot above stays as Debian ships it), a small
# main.go (testdata/otelcol/main.go: otlpreceiver + debugexporter) is built there offline in GOPATH
# mode into a static binary the host runs. Same reuse-once, build-then-rename style as above.
# PERFPY_OTELCOL overrides the binary's place.
OTELCOL=${PERFPY_OTELCOL:-/var/cache/perfpy/otelcol}
OTELCOL_SID=${PERFPY_OTELCOL_SID:-/var/cache/perfpy/otelcol-sid}
HERE=$(cd "$(dirname "$0")/.." && pwd)
otelcol_ready() { [ -x "$OTELCOL" ] && cmp -s "$HERE/testdata/otelcol/main.go" "$OTELCOL.main.go"; }
if ! otelcol_ready; then
    prepare_debootstrap
    if [ ! -x "$OTELCOL_SID/usr/bin/go" ] || [ ! -d "$OTELCOL_SID/usr/share/gocode/src/go.opentelemetry.io/collector" ]; then
        echo "preparing a Debian sid chroot with golang-go and the OpenTelemetry Collector source in $OTELCOL_SID (~3 min)"
        $SUDO mkdir -p "$(dirname "$OTELCOL_SID")"
        TMP=$($SUDO mktemp -d "$OTELCOL_SID.partial.XXXXXX")
        if $SUDO debootstrap --variant=minbase --include=golang-go,golang-opentelemetry-collector-dev \
            sid "$TMP" "$MIRROR" >"$TMP.log" 2>&1; then
            $SUDO rm -rf "$OTELCOL_SID"
            $SUDO mv "$TMP" "$OTELCOL_SID"
            $SUDO rm -f "$TMP.log"
        else
            echo "debootstrap failed (log: $TMP.log); the OTLP tests cannot run" >&2
            $SUDO rm -rf "$TMP"
            [ "${CI:-}" = true ] && exit 1
        fi
    fi
    if [ -x "$OTELCOL_SID/usr/bin/go" ]; then
        echo "building the test Collector $OTELCOL (offline, GOPATH mode, ~2 min)"
        $SUDO rm -rf "$OTELCOL_SID/build"
        $SUDO mkdir -p "$OTELCOL_SID/build/src/perfpy-otelcol"
        $SUDO cp "$HERE/testdata/otelcol/main.go" "$OTELCOL_SID/build/src/perfpy-otelcol/"
        if $SUDO chroot "$OTELCOL_SID" env GO111MODULE=off CGO_ENABLED=0 GOROOT=/usr/lib/go GOTELEMETRY=off \
            GOPATH=/build:/usr/share/gocode GOCACHE=/var/cache/go-build HOME=/build GOPROXY=off \
            go build -o /build/otelcol perfpy-otelcol >"$OTELCOL.log" 2>&1; then
            $SUDO cp "$OTELCOL_SID/build/otelcol" "$OTELCOL.partial"
            $SUDO mv "$OTELCOL.partial" "$OTELCOL"
            $SUDO cp "$HERE/testdata/otelcol/main.go" "$OTELCOL.main.go"
            $SUDO rm -f "$OTELCOL.log"
        else
            echo "building the test Collector failed (log: $OTELCOL.log); the OTLP tests cannot run" >&2
            [ "${CI:-}" = true ] && exit 1
        fi
    fi
fi
if [ "${CI:-}" = true ] && ! otelcol_ready; then
    echo "CI=true: the test OpenTelemetry Collector is missing ($OTELCOL)" >&2
    exit 1
fi

# speedscope's npm package (its built app and its published file-format schema), ajv, and
# puppeteer-core (a browser driver that downloads no browser) with Debian's headless Chromium
# (chromium-headless-shell), to check `-f speedscope` output in tests/it/outputs.rs: against the
# schema, and loaded in speedscope itself in a headless browser. The npm packages are pinned
# (puppeteer-core 24.x: the last line for Debian 12's Node 18/20) and installed once outside the
# checkout. PERFPY_NPM overrides their place, PERFPY_CHROMIUM the browser.
NPMDIR=${PERFPY_NPM:-/var/cache/perfpy/npm}
NPM_PKGS="speedscope@1.25.0 ajv@8.17.1 puppeteer-core@24.43.1"
npm_ready() {
    [ -f "$NPMDIR/node_modules/speedscope/dist/release/index.html" ] && [ -d "$NPMDIR/node_modules/ajv" ] &&
        [ -d "$NPMDIR/node_modules/puppeteer-core" ]
}
need=()
command -v npm >/dev/null || need+=(nodejs npm)
[ -n "${PERFPY_CHROMIUM:-}" ] || command -v chromium-headless-shell >/dev/null || need+=(chromium-headless-shell)
if ((${#need[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null ||
        { echo "apt-get install ${need[*]} failed; the speedscope tests cannot run" >&2; [ "${CI:-}" = true ] && exit 1; }
fi
if ! npm_ready; then
    mkdir -p "$NPMDIR"
    echo "installing $NPM_PKGS (npm) in $NPMDIR"
    # --ignore-scripts: puppeteer-core has no browser download to skip, speedscope none to run.
    (cd "$NPMDIR" && npm install --silent --no-audit --no-fund --ignore-scripts $NPM_PKGS >/dev/null) ||
        { echo "npm install failed; the speedscope tests cannot run" >&2; [ "${CI:-}" = true ] && exit 1; }
fi
