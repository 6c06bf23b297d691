#!/usr/bin/env bash
# Builds libmoat and the `moat` program in release mode and installs them
# under a prefix, for C and Go programs (docs/c-and-go.md):
#   PREFIX/bin/moat                       the program; runs' supervisors run it
#   PREFIX/lib/libmoat.so.X.Y.Z           the shared library (stripped)
#   PREFIX/lib/libmoat.so.SOVERSION       -> libmoat.so.X.Y.Z (its SONAME)
#   PREFIX/lib/libmoat.so                 -> libmoat.so.SOVERSION
#   PREFIX/lib/libmoat.a                  the static library
#   PREFIX/lib/pkgconfig/moat.pc          for pkg-config
#   PREFIX/include/moat.h                 the header
# SOVERSION is 0.MINOR while the major version is 0, then MAJOR.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    cat <<'EOF'
Usage: bash scripts/install-lib.sh [--prefix DIR]

Builds libmoat (moat-ffi) and the moat program (moat-cli) with
`cargo build --release` and installs them under DIR (default /usr/local):

  DIR/bin/moat                   the program that supervises runs (and the CLI)
  DIR/lib/libmoat.so.X.Y.Z       the shared library, SONAME libmoat.so.0.MINOR
  DIR/lib/libmoat.so.0.MINOR     -> libmoat.so.X.Y.Z   (libmoat.so.MAJOR from 1.0)
  DIR/lib/libmoat.so             -> libmoat.so.0.MINOR
  DIR/lib/libmoat.a              the static library
  DIR/lib/pkgconfig/moat.pc      pkg-config: --cflags, --libs, --static --libs
  DIR/include/moat.h             the C header

The library finds DIR/bin/moat by itself (from the directory it was loaded
from), so runs need neither PATH nor MOAT_SUPERVISOR.

Options:
  --prefix DIR   where to install (made when missing); an absolute path is
                 written to moat.pc, so a relative DIR is made absolute
  --debug        install the debug build instead (large and slow, but
                 built in seconds when the tests have built it already;
                 for developing moat and for its tests)
  -h, --help     this text

Environment:
  DESTDIR        stage the files under DESTDIR/DIR (for packaging); moat.pc
                 still names DIR

Then, for example:
  export PKG_CONFIG_PATH=DIR/lib/pkgconfig
  cc app.c $(pkg-config --cflags --libs moat) -Wl,-rpath,DIR/lib
EOF
}

die() {
    printf 'install-lib: error: %s\n' "$*" >&2
    exit 2
}
log() { printf 'install-lib: %s\n' "$*" >&2; }

prefix=/usr/local
profile=release
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --prefix)
            [ $# -ge 2 ] || die "--prefix needs a directory (see --help)"
            prefix=$2
            shift 2
            ;;
        --prefix=*)
            prefix=${1#--prefix=}
            shift
            ;;
        --debug)
            profile=debug
            shift
            ;;
        *) die "unknown argument \"$1\" (see --help)" ;;
    esac
done

# The prefix: absolute, spelled so that moat.pc can hold it, a directory we
# may write. Checked before the build, which takes minutes.
[ -n "$prefix" ] || die "--prefix is empty"
case "$prefix" in
    /*) ;;
    *) prefix="$PWD/$prefix" ;;
esac
prefix=$(realpath -m "$prefix")
case "$prefix" in
    *[[:space:]\"\'\$\`\\]*)
        die "prefix \"$prefix\": pkg-config cannot hold a path with spaces, quotes, \$, \` or \\; choose another"
        ;;
esac
destdir=${DESTDIR:-}
case "$destdir" in
    "" | /*) ;;
    *) die "DESTDIR \"$destdir\" is not an absolute path" ;;
esac
stage="$destdir$prefix"
hint=
[ "$(id -u)" = 0 ] || hint=" (run as root, or choose a prefix you own, such as --prefix ~/.local)"
for dir in "$stage" "$stage/bin" "$stage/lib" "$stage/lib/pkgconfig" "$stage/include"; do
    if [ -e "$dir" ] && [ ! -d "$dir" ]; then
        die "$dir exists and is not a directory"
    fi
    why=$(mkdir -p "$dir" 2>&1) || die "cannot create $dir: ${why##*: }$hint"
    [ -w "$dir" ] || die "cannot write to $dir$hint"
done
command -v cargo >/dev/null || die "cargo is missing: install Rust (https://rustup.rs) first"
command -v readelf >/dev/null || die "readelf is missing: install binutils"

cd "$root"
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[[ "$version" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+) ]] || die "cannot read the version from Cargo.toml ([workspace.package])"
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}
if [ "$major" = 0 ]; then soversion="0.$minor"; else soversion=$major; fi

# One release build. moat-ffi through `cargo rustc`, to learn what the
# static library needs from the system (cargo repeats rustc's note when the
# build is already fresh).
log "building moat $version ($profile; several minutes the first time)"
started=$SECONDS
ffi_log=$(mktemp)
trap 'rm -f "$ffi_log"' EXIT
cargo_profile=(--release)
[ "$profile" = release ] || cargo_profile=()
cargo rustc "${cargo_profile[@]}" -p moat-ffi --lib -- --print native-static-libs 2>&1 | tee "$ffi_log" >&2 \
    || die "building libmoat failed"
cargo build "${cargo_profile[@]}" -p moat-cli || die "building the moat program failed"
log "built in $((SECONDS - started))s"
native=$(sed -n 's/^note: native-static-libs: //p' "$ffi_log" | tail -1)
if [ -z "$native" ]; then
    native="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"
    log "warning: rustc did not say what libmoat.a needs; using \"$native\""
fi
release="$root/target/$profile"
soname=$(readelf -d "$release/libmoat.so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
[ "$soname" = "libmoat.so.$soversion" ] \
    || die "$release/libmoat.so has SONAME \"$soname\", expected libmoat.so.$soversion (see moat-ffi/build.rs)"

# Strip what strip can (symbols the dynamic linker does not need, debug
# information); without strip the files are installed as built.
strip_with() {
    if command -v strip >/dev/null; then
        strip "$@"
    fi
}
real="libmoat.so.$version"
install -m 0755 "$release/moat" "$stage/bin/moat"
strip_with "$stage/bin/moat"
install -m 0755 "$release/libmoat.so" "$stage/lib/$real"
strip_with --strip-unneeded "$stage/lib/$real"
ln -sfn "$real" "$stage/lib/$soname"
ln -sfn "$soname" "$stage/lib/libmoat.so"
install -m 0644 "$release/libmoat.a" "$stage/lib/libmoat.a"
strip_with --strip-debug "$stage/lib/libmoat.a"
install -m 0644 include/moat.h "$stage/include/moat.h"
cat > "$stage/lib/pkgconfig/moat.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
bindir=\${exec_prefix}/bin
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include
# The program that supervises runs; libmoat finds it here by itself.
supervisor=\${bindir}/moat

Name: moat
Description: Run AI agents in isolated containers (libmoat, the C ABI)
URL: https://github.com/moat-dev/moat
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lmoat
Libs.private: $native
EOF
chmod 0644 "$stage/lib/pkgconfig/moat.pc"

# What was installed.
size() { du -k --apparent-size "$1" | awk '{ printf "%.1f MiB", $1 / 1024 }'; }
echo "installed moat $version under $prefix${destdir:+ (staged in $destdir)}:"
printf '  %-36s %s\n' \
    "bin/moat" "$(size "$stage/bin/moat")" \
    "lib/$real" "$(size "$stage/lib/$real") (SONAME $soname)" \
    "lib/$soname" "-> $real" \
    "lib/libmoat.so" "-> $soname" \
    "lib/libmoat.a" "$(size "$stage/lib/libmoat.a")" \
    "lib/pkgconfig/moat.pc" "Libs.private: $native" \
    "include/moat.h" "the header"

# The loader's cache, for a prefix whose lib directory it searches.
if [ -z "$destdir" ] && [ "$(id -u)" = 0 ] && command -v ldconfig >/dev/null \
    && ldconfig -v -N -X 2>/dev/null | grep -q "^$prefix/lib:"; then
    ldconfig
    echo "ran ldconfig: $prefix/lib is in the loader's search path"
else
    echo "if $prefix/lib is not in the loader's search path, link with -Wl,-rpath,$prefix/lib or set LD_LIBRARY_PATH=$prefix/lib"
fi
echo "use: PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --cflags --libs moat"
