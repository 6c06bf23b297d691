#!/usr/bin/env bash
# The moat proxy benchmark, in one command:
#
#   scripts/bench.sh [extra moat-bench suite options, e.g. --duration 2]
#
# Installs what is missing (Debian nginx and openssl; mitmproxy from PyPI
# into target/bench-venv), builds moat-bench in release mode, makes a test
# CA and a *.bench.test certificate with openssl, starts nginx on loopback
# (plain HTTP and HTTPS; a 1 KiB file and a large sparse file), then runs
# `moat-bench suite`, which starts the moat proxy (its own process), the
# upload sink and mitmdump, measures everything and writes bench/RESULTS.md.
#
# Everything listens on and talks to 127.0.0.1 only. Environment:
#   BENCH_PORT_BASE   first of five loopback ports (default 18080)
#   BENCH_STREAM_MIB  size of the streaming transfers (default 1024)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=$ROOT/target/bench-run
VENV=$ROOT/target/bench-venv
BASE=${BENCH_PORT_BASE:-18080}
HTTP_PORT=$BASE
HTTPS_PORT=$((BASE + 1))
SINK_PORT=$((BASE + 2))
MITM_PORT=$((BASE + 3))
REVERSE_PORT=$((BASE + 4))
STREAM_MIB=${BENCH_STREAM_MIB:-1024}

log() { printf '[bench.sh] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ---------------------------------------------------------------- install
missing=()
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
[ -z "$NGINX" ] && missing+=(nginx)
command -v openssl >/dev/null || missing+=(openssl)
command -v getconf >/dev/null || missing+=(libc-bin)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi

# mitmproxy needs a recent Python: take the newest >= 3.12 we can find,
# else python3 (pip then picks the newest mitmproxy that supports it).
pick_python() {
    local c
    for c in python3.13 python3.12 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 python3; do
        if "$c" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            echo "$c"
            return
        fi
    done
    echo python3
}
if [ ! -x "$VENV/bin/mitmdump" ]; then
    PY=$(pick_python)
    log "installing mitmproxy into $VENV (with $("$PY" --version 2>&1))"
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q mitmproxy
fi

# ---------------------------------------------------------------- build
log "building moat-bench (release)"
cargo build --release -p moat-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/moat-bench

# ---------------------------------------------------------------- TLS, nginx
# shellcheck source=scripts/bench-common.sh
. "$ROOT/scripts/bench-common.sh"
TLSD=$WORK/tls
bench_tls "$TLSD"
for p in "$HTTP_PORT" "$HTTPS_PORT" "$SINK_PORT" "$MITM_PORT" "$REVERSE_PORT"; do
    if ! port_free "$p"; then
        log "127.0.0.1:$p is in use; set BENCH_PORT_BASE to another port range"
        exit 1
    fi
done
bench_nginx "$WORK" "$TLSD" "$HTTP_PORT" "$HTTPS_PORT" "$STREAM_MIB" "$REVERSE_PORT"
trap bench_nginx_stop EXIT

# ---------------------------------------------------------------- run
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME" || echo unknown)
nginx_v=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')
mitm_v=$("$VENV/bin/mitmdump" --version 2>/dev/null | awk '/^Mitmproxy:/ {print $2}')
py_v=$("$VENV/bin/python" --version 2>&1)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- moat-core 2>/dev/null)" ]; then
    rev="$rev, with uncommitted changes in moat-core/"
fi

timeout 1800 "$BIN" suite \
    --work "$WORK" \
    --upstream-ca "$TLSD/ca.pem" \
    --cert "$TLSD/server-chain.pem" \
    --key "$TLSD/server.key" \
    --nginx-http "127.0.0.1:$HTTP_PORT" \
    --nginx-https "127.0.0.1:$HTTPS_PORT" \
    --nginx-reverse "127.0.0.1:$REVERSE_PORT" \
    --sink "127.0.0.1:$SINK_PORT" \
    --mitm-listen "127.0.0.1:$MITM_PORT" \
    --nginx-pid "$NGINX_PID" \
    --mitmdump "$VENV/bin/mitmdump" \
    --mitm-addon "$ROOT/bench/mitm_resolve.py" \
    --stream-mib "$STREAM_MIB" \
    --out "$ROOT/bench/RESULTS.md" \
    --command "scripts/bench.sh${*:+ $*}" \
    --date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
    --info "Machine: $cpu, $(nproc) cores, $mem RAM; $(uname -sr); $os" \
    --info "moat: commit $rev" \
    --info "Versions: $(rustc --version), nginx $nginx_v (2 workers), mitmproxy $mitm_v on $py_v" \
    "$@"
