#!/usr/bin/env bash
# Build the local Docker image used by moat's Docker tests.
#
# The image is built without pulling anything from a container registry:
# Debian bookworm is bootstrapped with `debootstrap --variant=minbase` into a
# temporary directory, trimmed, and imported with `docker import`.
#
# Usage: bash scripts/build-test-image.sh [--force]
#
# Environment:
#   MOAT_TEST_IMAGE      image tag to build       (default: moat-test:bookworm)
#   MOAT_DEBIAN_MIRROR   Debian mirror to use     (default: http://deb.debian.org/debian)
#
# If an image with the tag already exists and carries the label
# moat.test-image.hash matching this script's package list and version, the
# script reuses it and exits immediately. --force always rebuilds.

set -euo pipefail

# Packages installed on top of the minbase variant. Keep this the single
# source of truth: it is part of the reuse hash.
# dnsutils (dig) is deliberately left out: through bind9-libs -> libxml2 ->
# libicu72 it adds ~45 MB (~20% of the image). Append it here if needed.
PACKAGES="ca-certificates curl git iproute2 iptables netcat-openbsd openssh-client procps python3 python3-requests"

# Bump when the build recipe changes in a way that should invalidate images.
SCRIPT_VERSION=1

SUITE=bookworm
IMAGE="${MOAT_TEST_IMAGE:-moat-test:bookworm}"
MIRROR="${MOAT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HASH_LABEL=moat.test-image.hash
IMAGE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[build-test-image] %s\n' "$*" >&2; }
die() { printf '[build-test-image] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
}

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) FORCE=1 ;;
        --help|-h) usage; exit 0 ;;
        *) usage; die "unknown argument: $arg" ;;
    esac
done

# --- Docker engine -----------------------------------------------------------
command -v docker >/dev/null 2>&1 \
    || die "missing: the 'docker' command is not installed (a running Docker engine is required)"
docker info >/dev/null 2>&1 \
    || die "missing: no Docker engine reachable ('docker info' failed); start dockerd or check DOCKER_HOST / permissions"

# --- Reuse check ---------------------------------------------------------------
ARCH="$(dpkg --print-architecture 2>/dev/null || uname -m)"
# shellcheck disable=SC2086  # intentional word splitting of the package list
SORTED_PACKAGES="$(printf '%s\n' $PACKAGES | LC_ALL=C sort -u | paste -sd ' ' -)"
HASH="$(printf 'version=%s\nsuite=%s\narch=%s\npackages=%s\n' \
    "$SCRIPT_VERSION" "$SUITE" "$ARCH" "$SORTED_PACKAGES" | sha256sum | cut -c1-16)"

existing_hash() {
    docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$IMAGE" 2>/dev/null || true
}

if [ "$FORCE" -eq 0 ] && [ "$(existing_hash)" = "$HASH" ]; then
    log "reusing existing image $IMAGE ($HASH_LABEL=$HASH); pass --force to rebuild"
    exit 0
fi

# --- Serialise concurrent builds --------------------------------------------
if command -v flock >/dev/null 2>&1; then
    LOCK_FILE="${TMPDIR:-/tmp}/moat-build-test-image.lock"
    exec 9>"$LOCK_FILE"
    if ! flock -n 9; then
        log "another build is running; waiting for lock $LOCK_FILE"
        flock 9
        if [ "$FORCE" -eq 0 ] && [ "$(existing_hash)" = "$HASH" ]; then
            log "reusing image $IMAGE built by the concurrent run ($HASH_LABEL=$HASH)"
            exit 0
        fi
    fi
fi

# --- Prerequisites for building ---------------------------------------------
[ "$(id -u)" -eq 0 ] \
    || die "missing: root privileges (debootstrap needs root); re-run as root, e.g. 'sudo bash $0'"

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MISSING_PKGS=""
command -v debootstrap >/dev/null 2>&1 || MISSING_PKGS="$MISSING_PKGS debootstrap"
command -v wget >/dev/null 2>&1 || MISSING_PKGS="$MISSING_PKGS wget"  # debootstrap downloads with wget
[ -r "$KEYRING" ] || MISSING_PKGS="$MISSING_PKGS debian-archive-keyring"
if [ -n "$MISSING_PKGS" ]; then
    command -v apt-get >/dev/null 2>&1 \
        || die "missing:$MISSING_PKGS (not installed, and apt-get is unavailable to install it)"
    log "installing missing host packages with apt-get:$MISSING_PKGS"
    # Only refresh the package lists if apt does not know the packages yet.
    NEED_UPDATE=0
    for pkg in $MISSING_PKGS; do
        policy="$(apt-cache policy "$pkg" 2>/dev/null || true)"
        case "$policy" in
            *"Candidate: (none)"*|"") NEED_UPDATE=1 ;;
        esac
    done
    if [ "$NEED_UPDATE" -eq 1 ]; then
        log "running apt-get update"
        apt-get update >&2 || log "warning: apt-get update reported errors; trying to install anyway"
    fi
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $MISSING_PKGS >&2 \
        || die "missing:$MISSING_PKGS (apt-get install failed; is the Debian mirror reachable?)"
    command -v debootstrap >/dev/null 2>&1 \
        || die "missing: debootstrap (still not on PATH after apt-get install; is /usr/sbin on PATH?)"
fi

[ -r "$KEYRING" ] \
    || die "missing: $KEYRING (install the debian-archive-keyring package)"

log "checking mirror $MIRROR"
RELEASE_URL="$MIRROR/dists/$SUITE/Release"
if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 30 -o /dev/null "$RELEASE_URL" \
        || die "mirror unreachable: could not fetch $RELEASE_URL (set MOAT_DEBIAN_MIRROR to a reachable Debian mirror)"
else
    wget -q -T 30 -O /dev/null "$RELEASE_URL" \
        || die "mirror unreachable: could not fetch $RELEASE_URL (set MOAT_DEBIAN_MIRROR to a reachable Debian mirror)"
fi

# --- Temporary root filesystem ----------------------------------------------
WORKDIR="$(mktemp -d "${TMPDIR:-/var/tmp}/moat-test-image.XXXXXX")"
ROOTFS="$WORKDIR/rootfs"

cleanup() {
    local status=$?
    if [ -n "${WORKDIR:-}" ] && [ -d "$WORKDIR" ]; then
        # debootstrap mounts proc/sys inside the target; never delete through a mount.
        local mnt
        awk -v root="$ROOTFS" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r \
            | while IFS= read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
        rm -rf --one-file-system "$WORKDIR" || log "warning: could not fully remove $WORKDIR"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

START=$(date +%s)
INCLUDE="${SORTED_PACKAGES// /,}"
log "debootstrap --variant=minbase $SUITE ($ARCH) from $MIRROR"
log "extra packages: $INCLUDE"
debootstrap --variant=minbase --arch="$ARCH" --components=main \
    --keyring="$KEYRING" --include="$INCLUDE" \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2 \
    || die "debootstrap failed (see output above; is the mirror $MIRROR reachable?)"

# --- Post-processing ---------------------------------------------------------
log "configuring and trimming the root filesystem"

# ca-certificates' postinst normally generates the bundle; make sure of it.
mkdir -p "$ROOTFS/etc/ssl/certs"
if [ ! -s "$ROOTFS/etc/ssl/certs/ca-certificates.crt" ]; then
    log "running update-ca-certificates inside the root filesystem"
    chroot "$ROOTFS" /usr/sbin/update-ca-certificates --fresh >&2
fi
[ -s "$ROOTFS/etc/ssl/certs/ca-certificates.crt" ] \
    || die "CA bundle /etc/ssl/certs/ca-certificates.crt missing after update-ca-certificates"

# Keep later `apt-get install` in the image from re-adding docs.
mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d" "$ROOTFS/etc/apt/apt.conf.d"
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/90-moat-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/90-moat-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF

chroot "$ROOTFS" apt-get clean >/dev/null 2>&1 || true
rm -rf "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/cache/debconf/*-old \
       "$ROOTFS"/var/lib/dpkg/*-old \
       "$ROOTFS"/usr/share/doc \
       "$ROOTFS"/usr/share/man \
       "$ROOTFS"/usr/share/info \
       "$ROOTFS"/usr/share/lintian \
       "$ROOTFS"/debootstrap
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
find "$ROOTFS/var/log" -type f -exec truncate -s 0 {} + 2>/dev/null || true
find "$ROOTFS" -xdev -name '__pycache__' -type d -prune -exec rm -rf {} + 2>/dev/null || true
mkdir -p "$ROOTFS/var/lib/apt/lists/partial" "$ROOTFS/usr/share/doc" "$ROOTFS/usr/share/man"
: >"$ROOTFS/etc/machine-id"
# Docker supplies these at run time.
rm -f "$ROOTFS/etc/hostname" "$ROOTFS/etc/resolv.conf"

# mktemp creates 0700 directories; the image root must be traversable by non-root users.
chmod 0755 "$ROOTFS"

# --- Import --------------------------------------------------------------------
OLD_ID="$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
log "importing into docker as $IMAGE"
NEW_ID="$(tar --numeric-owner -C "$ROOTFS" \
        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
        -c . \
    | docker import \
        --change 'CMD ["/bin/bash"]' \
        --change "ENV PATH=$IMAGE_PATH" \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL $HASH_LABEL=$HASH" \
        --change "LABEL moat.test-image.packages=\"$SORTED_PACKAGES\"" \
        --change "LABEL moat.test-image.suite=$SUITE" \
        --message "moat test image ($SUITE minbase, script v$SCRIPT_VERSION)" \
        - "$IMAGE")" \
    || die "docker import failed"

# Drop the previous image for this tag if it is now dangling (ignore if in use).
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$NEW_ID" ]; then
    docker rmi "$OLD_ID" >/dev/null 2>&1 || true
fi

log "smoke test: docker run --rm --network none $IMAGE"
docker run --rm --network none "$IMAGE" sh -c 'curl --version >/dev/null && git --version >/dev/null && python3 -c "import ssl"' \
    || die "smoke test of the freshly imported image $IMAGE failed"

END=$(date +%s)
log "built $IMAGE ($HASH_LABEL=$HASH) in $((END - START))s"
