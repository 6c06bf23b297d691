#!/usr/bin/env bash
# Builds libmoat, compiles the C tests against include/moat.h with gcc, and
# runs them against both the shared and the static library.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
profile_dir="$root/target/debug"
cargo build -q -p moat-ffi
out="$root/target/c-tests"
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -I "$root/include")
gcc "${cflags[@]}" tests/c/test_config.c -o "$out/test_config_shared" \
  -L "$profile_dir" -lmoat -Wl,-rpath,"$profile_dir"
gcc "${cflags[@]}" tests/c/test_config.c -o "$out/test_config_static" \
  "$profile_dir/libmoat.a" -lpthread -ldl -lm
echo "c: shared library"
mkdir -p "$scratch/shared" "$scratch/static"
"$out/test_config_shared" "$scratch/shared"
echo "c: static library"
"$out/test_config_static" "$scratch/static"
