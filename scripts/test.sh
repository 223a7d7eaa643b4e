#!/usr/bin/env bash
# The one command that runs the whole suite: installs what the tests need, then fmt, clippy,
# build, the Rust tests and the interop tests (slixmpp against the real binary).
# Meant for a clean Debian machine as root (CI) as much as for a developer's checkout.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
START=$SECONDS

banner() {
    printf '\n==================== %s ====================\n' "$*"
}

PY="${PYTHON:-python3}"
PY_MODULES="import slixmpp, pytest, pytest_timeout, xxhash, prometheus_client"

banner "1/7 test dependencies (slixmpp, pytest, pytest-timeout, xxhash, prometheus_client, openssl)"
if "$PY" -c "$PY_MODULES" 2>/dev/null; then
    echo "already installed"
else
    # PIP_BREAK_SYSTEM_PACKAGES: Debian's own python3 refuses pip installs otherwise (PEP 668).
    if ! PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --disable-pip-version-check \
        slixmpp pytest pytest-timeout xxhash prometheus_client; then
        echo "pip install failed; falling back to Debian packages"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            python3 python3-slixmpp python3-pytest python3-pytest-timeout python3-xxhash \
            python3-prometheus-client
        PY=/usr/bin/python3
    fi
    "$PY" -c "$PY_MODULES"
fi
"$PY" -c 'import slixmpp, pytest; print("slixmpp", slixmpp.__version__, "/ pytest", pytest.__version__)'
# `openssl s_client` checks which certificate the server picks for a client's signature schemes.
if ! command -v openssl >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl
fi
openssl version

banner "2/7 locked memory limit (glommio)"
ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true
echo "ulimit -l: $(ulimit -l)"

banner "3/7 cargo fmt --check"
cargo fmt --all -- --check

banner "4/7 cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

banner "5/7 cargo build"
cargo build --workspace --locked

banner "6/7 cargo test"
cargo test --workspace --locked

banner "7/7 interop tests (slixmpp); steps 1-6 took $((SECONDS - START)) s"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
export GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/debug/gateway}"
echo "binary: $GATEWAY_BIN"
# Last, so that pytest's summary is the run's closing line.
"$PY" -m pytest -q tests/interop tests/peers
