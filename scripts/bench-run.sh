#!/usr/bin/env bash
# Run start-up benchmark in one command: builds moat (release) and the test
# image if missing, then times `moat run -- true` against
# `docker run --rm IMAGE true`, 20 runs each; writes bench/RUN_RESULTS.md.
#   scripts/bench-run.sh [--runs N]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/build-test-image.sh >&2
cargo build -q --release -p moat-cli
python3 bench/run_startup.py "$ROOT/target/release/moat" --out bench/RUN_RESULTS.md "$@"
