#!/usr/bin/env bash
# Build the image's base from Debian packages, with no registry: debootstrap a minimal Debian
# into a folder, then `docker import` that folder as an image.
#
#   deploy/docker/base.sh                 # makes fastinfer-base:bookworm once (REBUILD=1: again)
#   docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=fastinfer-base:bookworm ...
#
# Needs root, debootstrap (apt-get install debootstrap) and a Docker engine. The base holds
# Debian's python3 (3.11 on bookworm) with venv and CA certificates; the Dockerfile adds g++.
set -euo pipefail

IMAGE=${BASE_IMAGE:-fastinfer-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ "${REBUILD:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE exists (REBUILD=1 makes it again)"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "base.sh: debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
}

root=$(mktemp -d /var/tmp/fastinfer-base.XXXXXX)
cleanup() {
    # debootstrap may leave /proc and /sys mounted in the target when it fails
    for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
    rm -rf "$root"
}
trap cleanup EXIT

echo "base.sh: debootstrap $SUITE from $MIRROR into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 || {
    tail -20 "$root.log" >&2
    exit 1
}
rm -f "$root.log"
# the image's apt sources: the suite, its updates and security updates
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $SUITE ($MIRROR)" - "$IMAGE"
docker image ls "$IMAGE"
