#!/usr/bin/env bash
# The installed library: scripts/install-lib.sh into a fresh prefix (the
# debug build, or the release one with MOAT_INSTALL_RELEASE=1), its refusals, the SONAME, then
# tests/c/test_installed.c built with pkg-config against the installed
# files, shared and static, and the Go binding's tests (go/moat) against
# them. Runs need the local test image (MOAT_TEST_IMAGE, default
# moat-test:bookworm) and use MOAT_RUNTIME's engine (default docker).
# Usage: bash tests/c/installed.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
image=${MOAT_TEST_IMAGE:-moat-test:bookworm}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
fail() {
    echo "FAIL installed: $*" >&2
    status=1
}

echo "c: install-lib.sh refusals"
refused() {
    local want=$1
    shift
    local out
    if out=$(bash scripts/install-lib.sh "$@" 2>&1); then
        fail "install-lib.sh $* succeeded"
    elif ! grep -qF -- "$want" <<<"$out"; then
        fail "install-lib.sh $*: no \"$want\" in: $out"
    fi
}
touch "$scratch/a-file"
refused "is not a directory" --prefix "$scratch/a-file"
refused "cannot create $scratch/a-file/under" --prefix "$scratch/a-file/under"
refused "pkg-config cannot hold a path with spaces" --prefix "$scratch/with space"
refused "--prefix needs a directory" --prefix
refused "unknown argument \"--prefx\"" --prefx "$scratch/p"
mkdir "$scratch/read-only"
chmod 0500 "$scratch/read-only"
if [ "$(id -u)" != 0 ]; then
    refused "cannot create $scratch/read-only/p" --prefix "$scratch/read-only/p"
fi
bash scripts/install-lib.sh --help | grep -q "^Usage: bash scripts/install-lib.sh" || fail "--help"

# The debug build the tests have built already (seconds), unless
# MOAT_INSTALL_RELEASE=1 asks for the release build users install (about
# 11 minutes more on two cores): the files, the layout, the SONAME and
# pkg-config are the same.
profile_flag=(--debug)
[ "${MOAT_INSTALL_RELEASE:-0}" = 1 ] && profile_flag=()
echo "c: install-lib.sh (${profile_flag[*]:-release} build)"
prefix="$scratch/prefix"
started=$SECONDS
bash scripts/install-lib.sh "${profile_flag[@]}" --prefix "$prefix" > "$scratch/install.out" 2> "$scratch/install.err" || {
    cat "$scratch/install.err" >&2
    echo "FAIL installed: install-lib.sh failed" >&2
    exit 1
}
cat "$scratch/install.out"
echo "c: built and installed in $((SECONDS - started))s"

version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
IFS=. read -r major minor _ <<<"$version"
if [ "$major" = 0 ]; then soname="libmoat.so.0.$minor"; else soname="libmoat.so.$major"; fi
for f in bin/moat "lib/libmoat.so.$version" "lib/$soname" lib/libmoat.so lib/libmoat.a \
    lib/pkgconfig/moat.pc include/moat.h; do
    [ -e "$prefix/$f" ] || fail "$prefix/$f is missing"
done
[ -x "$prefix/bin/moat" ] || fail "bin/moat is not executable"
[ "$(readlink "$prefix/lib/libmoat.so")" = "$soname" ] || fail "libmoat.so does not point to $soname"
[ "$(readlink "$prefix/lib/$soname")" = "libmoat.so.$version" ] || fail "$soname does not point to libmoat.so.$version"
cmp -s include/moat.h "$prefix/include/moat.h" || fail "the installed moat.h is not include/moat.h"
got=$(readelf -d "$prefix/lib/libmoat.so.$version" | sed -n 's/.*(SONAME) *Library soname: \[\(.*\)\]/\1/p')
[ "$got" = "$soname" ] || fail "SONAME is \"$got\", want $soname"

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
[ "$(pkg-config --modversion moat)" = "$version" ] || fail "pkg-config --modversion moat"
[ "$(pkg-config --variable=supervisor moat)" = "$prefix/bin/moat" ] || fail "pkg-config --variable=supervisor moat"
pkg-config --static --libs moat | grep -q -- "-lpthread" || fail "Libs.private lacks -lpthread"

# Shared: as a user builds it. Static: libmoat.a by name (-l:libmoat.a),
# since a linker given -lmoat takes libmoat.so when both are there, and
# the system's libraries from Libs.private.
cflags=(-std=c11 -Wall -Wextra -Werror -pedantic -D_POSIX_C_SOURCE=200809L)
mkdir -p "$scratch/shared" "$scratch/static"
# shellcheck disable=SC2046
gcc "${cflags[@]}" $(pkg-config --cflags moat) tests/c/test_installed.c -o "$scratch/shared/test_installed" \
    $(pkg-config --libs moat) -Wl,-rpath,"$(pkg-config --variable=libdir moat)"
# shellcheck disable=SC2046
gcc "${cflags[@]}" $(pkg-config --cflags moat) tests/c/test_installed.c -o "$scratch/static/test_installed" \
    $(pkg-config --static --libs moat | sed 's/-lmoat\b/-l:libmoat.a/')
readelf -d "$scratch/shared/test_installed" | grep -q "NEEDED.*\[$soname\]" \
    || fail "the shared program does not need $soname"
if readelf -d "$scratch/static/test_installed" | grep -q "NEEDED.*libmoat"; then
    fail "the static program needs libmoat.so"
fi

# No MOAT_SUPERVISOR and no `moat` on PATH: only the library's own lookup.
path=
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do
    [ -x "$d/moat" ] || path="${path:+$path:}$d"
done
run_env=(env -u MOAT_SUPERVISOR PATH="$path" MOAT_KEYRING_BACKEND=file)
echo "c: installed, shared library (moat found beside lib/)"
mkdir -p "$scratch/s1"
"${run_env[@]}" "$scratch/shared/test_installed" "$scratch/s1" "$image" found || status=1
echo "c: installed, static library outside the prefix (no moat to find)"
mkdir -p "$scratch/s2"
"${run_env[@]}" "$scratch/static/test_installed" "$scratch/s2" "$image" missing || status=1
echo "c: installed, static library in PREFIX/libexec (moat found in PREFIX/bin)"
mkdir -p "$scratch/s3" "$prefix/libexec"
cp "$scratch/static/test_installed" "$prefix/libexec/"
"${run_env[@]}" "$prefix/libexec/test_installed" "$scratch/s3" "$image" found || status=1

echo "go: go/moat against the installed library"
if ! command -v go >/dev/null; then
    fail "go is missing: run bash scripts/setup.sh (it installs golang-go)"
else
    # Only the standard library: nothing is fetched (GOPROXY=off); the build
    # cache stays under target/.
    go_env=("${run_env[@]}" GOPROXY=off GOFLAGS=-mod=readonly
        GOCACHE="${GOCACHE:-$root/target/go-cache}" GOPATH="${GOPATH:-$root/target/go}"
        CGO_LDFLAGS="-Wl,-rpath,$prefix/lib" MOAT_TEST_IMAGE="$image")
    (cd go/moat && "${go_env[@]}" go vet ./...) || status=1
    # On each engine whose API answers here (Docker always; Podman too when
    # its service runs, as scripts/setup.sh arranges).
    engines=(docker)
    if curl -sf --unix-socket /run/podman/podman.sock http://d/_ping >/dev/null 2>&1; then
        engines+=(podman)
    fi
    for engine in "${engines[@]}"; do
        echo "go: go test on $engine"
        (cd go/moat && "${go_env[@]}" MOAT_RUNTIME="$engine" go test -count=1 ./...) || status=1
    done
fi
exit $status
