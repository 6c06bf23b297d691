#!/usr/bin/env bash
# Runs every check of the project and fails when any fails:
#   fmt, clippy (warnings are errors), Rust tests, the C header check,
#   Python tests (module built with maturin), C tests.
# Run scripts/setup.sh once first.
# Usage: bash scripts/test.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/target/venv"

failed=()
step() {
    local name=$1
    shift
    printf '\n=== %s\n' "$name"
    local start=$SECONDS
    if "$@"; then
        printf '=== %s: ok (%ss)\n' "$name" $((SECONDS - start))
    else
        printf '=== %s: FAILED (%ss)\n' "$name" $((SECONDS - start))
        failed+=("$name")
    fi
}

header_check() {
    local tmp
    tmp=$(mktemp)
    cbindgen --quiet --config moat-ffi/cbindgen.toml --crate moat-ffi --output "$tmp" || return 1
    if ! diff -u include/moat.h "$tmp"; then
        echo "include/moat.h is stale; regenerate it with:"
        echo "  cbindgen --config moat-ffi/cbindgen.toml --crate moat-ffi --output include/moat.h"
        rm -f "$tmp"
        return 1
    fi
    rm -f "$tmp"
}

python_tests() {
    [ -x "$venv/bin/python" ] || { echo "missing $venv: run bash scripts/setup.sh"; return 1; }
    # Builds the module and installs it, editable, into the virtualenv.
    VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --quiet || return 1
    "$venv/bin/python" -m pytest tests/python -q
}

step "cargo fmt" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "rust tests" cargo test --workspace --quiet
step "header check" header_check
step "python tests" python_tests
step "c tests" bash tests/c/run.sh

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
