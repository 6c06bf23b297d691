#!/usr/bin/env bash
# SSH login benchmark in one command: builds moat (release) and the test
# image if missing, then times ssh logins inside one run, direct against
# through the run's forwarder and filtering agent; writes bench/SSH_RESULTS.md.
#   scripts/bench-ssh.sh [--logins N]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/build-test-image.sh >&2
cargo build -q --release -p moat-cli
python3 bench/ssh_login.py "$ROOT/target/release/moat" --out bench/SSH_RESULTS.md "$@"
