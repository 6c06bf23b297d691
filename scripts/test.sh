#!/usr/bin/env bash
# Runs every check of the project and fails when any fails:
#   fmt, clippy (warnings are errors), Rust tests, the C header check,
#   Python tests (module built with maturin), C tests, the installed
#   library (scripts/install-lib.sh --debug; MOAT_INSTALL_RELEASE=1 installs
#   the release build instead; then C with pkg-config and the Go binding),
#   then the run tests (Rust, Python, C) again on Podman (Go's run on both
#   engines in the installed-library step).
# Run scripts/setup.sh once first.
# Usage: bash scripts/test.sh
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="$root/target/venv"
# A Python test that skips fails the run (tests/python/conftest.py): here
# the engines and images are there, so a skip would be a test passing with
# its subject absent.
export MOAT_TESTS_NO_SKIP=1

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

# The tests of runs, on the second engine (MOAT_RUNTIME picks it).
podman_runs() {
    curl -sf --unix-socket /run/podman/podman.sock http://d/_ping >/dev/null 2>&1 || {
        echo "podman's API service does not answer at /run/podman/podman.sock: run bash scripts/setup.sh"
        return 1
    }
    local status=0
    MOAT_RUNTIME=podman cargo test --quiet -p moat-cli --test run_api || status=1
    # The tests marked one_engine (their subject is the same on any engine:
    # host-side logic, packaging) ran on Docker above.
    MOAT_RUNTIME=podman "$venv/bin/python" -m pytest -q -m "not one_engine" \
        tests/python/test_runs_cli.py tests/python/test_runs_strict.py tests/python/test_run_api.py \
        tests/python/test_run_tty.py tests/python/test_routing.py tests/python/test_ssh_runs.py \
        tests/python/test_faults.py tests/python/test_aws.py tests/python/test_claude.py \
        tests/python/test_rules.py tests/python/test_system_cmds.py tests/python/test_first_hour.py \
        tests/python/test_trace_view.py tests/python/test_deps.py \
        tests/python/test_hostile_workspace.py tests/python/test_py_surface.py || status=1
    MOAT_RUNTIME=podman bash tests/c/run.sh || status=1
    return $status
}

step "cargo fmt" cargo fmt --all --check
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "rust tests" cargo test --workspace --quiet
step "header check" header_check
step "python tests" python_tests
step "c tests" bash tests/c/run.sh
step "installed library (c, go)" bash tests/c/installed.sh
step "run tests on podman" podman_runs

echo
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all checks passed"
