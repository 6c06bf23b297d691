#!/usr/bin/env bash
# Installs what building and testing moat needs, on a fresh Debian machine or
# this one again (every step is skipped when already done):
#   - Debian packages: gcc, pkg-config, debootstrap, iptables, iproute2 (strict
#     mode and its tests), openssh-server (the SSH tests' servers), chromium and libnss3-tools (the routing test's
#     browser); docker.io when no Docker
#     engine answers (and starts dockerd)
#   - cbindgen, pinned (the header check compares its output byte for byte)
#   - a Python virtualenv in target/venv with maturin, pytest and requests
#   - the local test image (scripts/build-test-image.sh)
# Usage: bash scripts/setup.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CBINDGEN_VERSION=0.29.4
MATURIN_VERSION=1.16.0
PYTEST_VERSION=9.2.0
REQUESTS_VERSION=2.32.5

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ $apt_updated = 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        apt_updated=1
    fi
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) first"
command -v python3 >/dev/null || die "python3 is missing: install Python 3.9 or newer first"

# curl, openssl, git and openssh-client are real clients and tools of the tests.
apt_install gcc pkg-config debootstrap curl openssl git ca-certificates openssh-client iptables iproute2 util-linux
# The SSH tests run real sshd servers on loopback ports of their own. The
# package would start a system sshd on port 22; a policy-rc.d refusing
# service starts keeps it from doing so while it is installed.
if ! command -v /usr/sbin/sshd >/dev/null 2>&1; then
    placed_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        placed_policy=1
    fi
    apt_install openssh-server
    if [ $placed_policy = 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
fi
# The routing test opens a page in a real browser, trusting the moat CA.
apt_install chromium libnss3-tools fonts-dejavu-core

# A Docker engine: use the one that answers, else install and start one.
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: /tmp/moat-dockerd.log)"
        as_root sh -c 'nohup dockerd >/tmp/moat-dockerd.log 2>&1 &'
        for _ in $(seq 1 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
        docker info >/dev/null 2>&1 || die "dockerd did not start; see /tmp/moat-dockerd.log"
    fi
fi
log "docker engine: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

# cbindgen, pinned: a different version may format the header differently.
if [ "$(cbindgen --version 2>/dev/null || true)" != "cbindgen $CBINDGEN_VERSION" ]; then
    log "installing cbindgen $CBINDGEN_VERSION (a few minutes, once)"
    cargo install --quiet --locked cbindgen --version "$CBINDGEN_VERSION"
fi

# Python tools in a virtualenv of the repository's own.
venv="$root/target/venv"
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    mkdir -p "$root/target"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit([m.version(p) for p in ("maturin", "pytest", "requests")] != sys.argv[1:])' \
        "$MATURIN_VERSION" "$PYTEST_VERSION" "$REQUESTS_VERSION" 2>/dev/null; then
    log "installing maturin $MATURIN_VERSION, pytest $PYTEST_VERSION, requests $REQUESTS_VERSION"
    "$venv/bin/pip" install -q --disable-pip-version-check "maturin==$MATURIN_VERSION" \
        "pytest==$PYTEST_VERSION" "requests==$REQUESTS_VERSION"
fi

bash "$root/scripts/build-test-image.sh"
log "ready"
