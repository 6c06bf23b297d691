#!/usr/bin/env bash
# Installs what building and testing moat needs, on a fresh Debian machine or
# this one again (every step is skipped when already done):
#   - Debian packages: gcc, pkg-config, golang-go (the Go binding's tests),
#     debootstrap, iptables, iproute2 (strict
#     mode and its tests), openssh-server (the SSH tests' servers), chromium and libnss3-tools (the routing test's
#     browser), docker-registry (the dependencies test's registry); docker.io when no Docker
#     engine answers (and starts dockerd)
#   - cbindgen, pinned (the header check compares its output byte for byte)
#   - a Python virtualenv in target/venv with maturin, pytest, requests,
#     haralyzer (a HAR reader) and mypy (its stubtest checks moat's stubs)
#   - the claude-agent-sdk wheel with the pinned Claude Code, in target/claude
#     (the `moat claude` tests use it; nothing is downloaded while testing)
#   - the local test image (scripts/build-test-image.sh)
#   - podman and catatonit, the test image loaded into podman, podman's API
#     service started (and, where the host refuses its default ulimits,
#     /etc/containers/containers.conf.d/moat.conf telling it to set none)
# Usage: bash scripts/setup.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

CBINDGEN_VERSION=0.29.4
MATURIN_VERSION=1.16.0
PYTEST_VERSION=9.2.0
REQUESTS_VERSION=2.32.5
# A HAR reader: the trace view test loads `moat trace --har` with it.
HARALYZER_VERSION=2.4.0
# mypy's stubtest checks python/moat/_moat.pyi against the built module.
MYPY_VERSION=2.4.1

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
apt_install gcc pkg-config golang-go debootstrap curl openssl git ca-certificates openssh-client iptables iproute2 util-linux
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
# The dependencies test (tests/python/test_deps.py) serves its stand-in
# runtime images from a registry of its own on a loopback port: Debian's
# docker-registry. Its system service is kept from starting, as sshd's is.
if ! command -v docker-registry >/dev/null 2>&1; then
    placed_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        placed_policy=1
    fi
    apt_install docker-registry
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
if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit([m.version(p) for p in ("maturin", "pytest", "requests", "haralyzer", "mypy")] != sys.argv[1:])' \
        "$MATURIN_VERSION" "$PYTEST_VERSION" "$REQUESTS_VERSION" "$HARALYZER_VERSION" "$MYPY_VERSION" 2>/dev/null; then
    log "installing maturin $MATURIN_VERSION, pytest $PYTEST_VERSION, requests $REQUESTS_VERSION, haralyzer $HARALYZER_VERSION, mypy $MYPY_VERSION"
    "$venv/bin/pip" install -q --disable-pip-version-check "maturin==$MATURIN_VERSION" \
        "pytest==$PYTEST_VERSION" "requests==$REQUESTS_VERSION" "haralyzer==$HARALYZER_VERSION" \
        "mypy==$MYPY_VERSION"
fi

# Claude Code for the `moat claude` tests: the claude-agent-sdk wheel that
# bundles the build moat pins (moat checks its SHA-256 again before use).
# The tests point moat at it with MOAT_CLAUDE_WHEEL and never download.
claude_sdk=0.2.189
case "$(uname -m)" in
    x86_64) claude_arch=x86_64 claude_sha=b26a6a30a4e2cb025a6f5c95e1ce4469b38fcc51015c392f627bea7c948d67ad ;;
    aarch64) claude_arch=aarch64 claude_sha=7e89e56f968a2f2b09e1a86cb66a937f004fc33948faad66425df847b07c5769 ;;
    *) claude_arch= ;;
esac
claude_wheel="$root/target/claude/claude_agent_sdk-$claude_sdk-py3-none-manylinux_2_17_$claude_arch.whl"
if [ -n "$claude_arch" ] && [ ! -f "$claude_wheel" ]; then
    log "downloading the claude-agent-sdk $claude_sdk wheel (Claude Code for the tests)"
    mkdir -p "$root/target/claude"
    printf 'claude-agent-sdk==%s --hash=sha256:%s\n' "$claude_sdk" "$claude_sha" > "$root/target/claude/requirements.txt"
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: --platform "manylinux_2_17_$claude_arch" --python-version 3.11 \
        -r "$root/target/claude/requirements.txt" -d "$root/target/claude"
fi

bash "$root/scripts/build-test-image.sh"

# Podman, the second engine: its Docker-compatible API service, as root, at
# /run/podman/podman.sock; catatonit is its container init. The run tests
# run on it too (MOAT_RUNTIME=podman).
apt_install podman catatonit
IMAGE=moat-test:bookworm
want=$(docker image inspect --format '{{index .Config.Labels "moat.test-image.hash"}}' "$IMAGE")
have=$(as_root podman image inspect --format '{{index .Config.Labels "moat.test-image.hash"}}' "$IMAGE" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
    log "loading $IMAGE into podman"
    docker save "$IMAGE" | as_root podman load -q >/dev/null
fi
# Some machines (these VMs among them) refuse the ulimits Podman sets by
# default (runc: "error setting rlimit type 7: operation not permitted");
# there Podman is told to set none.
probe() { as_root podman run --rm --network none "$IMAGE" true 2>&1; }
if ! out=$(probe); then
    if printf '%s' "$out" | grep -q "rlimit"; then
        log "podman cannot apply its default ulimits here: writing /etc/containers/containers.conf.d/moat.conf (default_ulimits = [])"
        as_root mkdir -p /etc/containers/containers.conf.d
        printf '# Written by moat scripts/setup.sh: this host refuses the default ulimits.\n[containers]\ndefault_ulimits = []\n' \
            | as_root tee /etc/containers/containers.conf.d/moat.conf >/dev/null
        out=$(probe) || die "podman still cannot run a container: $out"
    else
        die "podman cannot run a container: $out"
    fi
fi
# A service started from a directory that was later deleted (an earlier
# clone's setup) answers pings but cannot start containers: its conmon
# children fail ("write child: broken pipe"). Such a service is replaced.
for pid in $(pgrep -f 'podman system service' || true); do
    if as_root readlink "/proc/$pid/cwd" 2>/dev/null | grep -q ' (deleted)$'; then
        log "restarting podman's API service: it was started in a directory since deleted"
        as_root kill "$pid" || true
        sleep 1
    fi
done
if ! curl -sf --unix-socket /run/podman/podman.sock http://d/_ping >/dev/null 2>&1; then
    log "starting podman's API service at /run/podman/podman.sock (log: /tmp/moat-podman.log)"
    as_root mkdir -p /run/podman
    # From /, so that the service and its conmon children hold no directory
    # of this checkout, which may be deleted while they run.
    as_root sh -c 'cd / && nohup podman system service --time=0 unix:///run/podman/podman.sock >/tmp/moat-podman.log 2>&1 &'
    for _ in $(seq 1 30); do
        curl -sf --unix-socket /run/podman/podman.sock http://d/_ping >/dev/null 2>&1 && break
        sleep 1
    done
    curl -sf --unix-socket /run/podman/podman.sock http://d/_ping >/dev/null 2>&1 \
        || die "podman's API service did not start; see /tmp/moat-podman.log"
fi
log "podman engine: $(as_root podman version --format '{{.Server.Version}}' 2>/dev/null || as_root podman --version)"
log "ready"
