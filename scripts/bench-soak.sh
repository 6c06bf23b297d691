#!/usr/bin/env bash
# The soak benchmark, in one command:
#
#   scripts/bench-soak.sh [bench/soak.py options, e.g. --requests 200000]
#
# One long-lived moat.Proxy (the Python facade, in its own process) serves
# 1,000,000 requests over HTTPS and 1,000,000 over plain HTTP from nginx on
# loopback, in slices of 100,000; each slice's requests/s, p99 and the
# proxy's RSS go to bench/SOAK_RESULTS.md. About 5 minutes on the 2-core
# machine, plus the first builds. Needs scripts/setup.sh (the virtualenv);
# installs nginx when missing. Loopback only.
#
# Environment: SOAK_PORT_BASE (three loopback ports, default 18280).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WORK=$ROOT/target/bench-soak
VENV=$ROOT/target/venv
BASE=${SOAK_PORT_BASE:-18280}
HTTP_PORT=$BASE
HTTPS_PORT=$((BASE + 1))
REVERSE_PORT=$((BASE + 2))

log() { printf '[bench-soak.sh] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ] || ! command -v openssl >/dev/null; then
    log "installing nginx and openssl (apt-get)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx openssl >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
[ -x "$VENV/bin/python" ] || { log "missing $VENV: run bash scripts/setup.sh first"; exit 1; }

log "building moat-bench and the Python module (release)"
cargo build --release -q -p moat-bench
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/moat-bench
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" maturin develop --release --quiet

# shellcheck source=scripts/bench-common.sh
. "$ROOT/scripts/bench-common.sh"
TLSD=$WORK/tls
bench_tls "$TLSD"
for p in "$HTTP_PORT" "$HTTPS_PORT" "$REVERSE_PORT"; do
    port_free "$p" || { log "127.0.0.1:$p is in use; set SOAK_PORT_BASE"; exit 1; }
done
bench_nginx "$WORK" "$TLSD" "$HTTP_PORT" "$HTTPS_PORT" 1 "$REVERSE_PORT"
trap bench_nginx_stop EXIT

HOME_DIR=$(mktemp -d)
trap 'bench_nginx_stop; rm -rf "$HOME_DIR"' EXIT
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain -- moat-core 2>/dev/null)" ] && rev="$rev, with uncommitted changes in moat-core/"

"$VENV/bin/python" bench/soak.py \
    --home "$HOME_DIR" \
    --upstream-ca "$TLSD/ca.pem" \
    --https-port "$HTTPS_PORT" \
    --http-port "$HTTP_PORT" \
    --reverse-port "$REVERSE_PORT" \
    --loader "$BIN" \
    --nginx-pids "$(pgrep -d, -f 'nginx: (master|worker)' || true)" \
    --out "$ROOT/bench/SOAK_RESULTS.md" \
    --command "scripts/bench-soak.sh${*:+ $*}" \
    --info "Machine: $cpu, $(nproc) cores; $(uname -sr); moat commit $rev" \
    --info "Load: moat-bench load (Rust, hyper), its own process; proxy and nginx share the same cores" \
    "$@"
