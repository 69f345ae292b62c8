#!/usr/bin/env bash
# Builds the Debian base image the Dockerfiles start from (`debian:bookworm-slim`)
# locally, for machines that reach Debian's package mirror but no container
# registry: debootstrap a minimal bookworm into a folder outside the repository,
# then `docker import` it under the name the Dockerfiles expect. Where a registry
# is reachable, skip this: `docker build` pulls the official image of that name.
#
#   scripts/docker-base.sh            # no-op when the image already exists
#   FEDGE_BASE_FORCE=1 scripts/docker-base.sh
#   FEDGE_DEBIAN_MIRROR=http://deb.debian.org/debian scripts/docker-base.sh
set -euo pipefail

image=${FEDGE_BASE_IMAGE:-debian:bookworm-slim}
suite=bookworm
mirror=${FEDGE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${FEDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedge}
rootfs="$cache/debian-$suite-rootfs"

log() { printf 'docker-base: %s\n' "$*" >&2; }

if [[ -z "${FEDGE_BASE_FORCE:-}" ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image already present"
    exit 0
fi

sudo=()
[[ $(id -u) -eq 0 ]] || sudo=(sudo)
if ! command -v debootstrap >/dev/null && command -v apt-get >/dev/null; then
    log "installing debootstrap from Debian's packages"
    "${sudo[@]}" apt-get install -y --no-install-recommends debootstrap >/dev/null \
        || { "${sudo[@]}" apt-get update >/dev/null && "${sudo[@]}" apt-get install -y --no-install-recommends debootstrap >/dev/null; } \
        || true
fi
command -v debootstrap >/dev/null || {
    log "debootstrap is required (Debian: apt-get install debootstrap), or a registry to pull $image from"
    exit 1
}

log "debootstrapping $suite (minbase) from $mirror into $rootfs"
"${sudo[@]}" rm -rf "$rootfs"
mkdir -p "$(dirname "$rootfs")"
"${sudo[@]}" debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >&2
# What the official slim image leaves out, and what a container never needs.
"${sudo[@]}" rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/tmp/*
log "importing as $image"
"${sudo[@]}" tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$image" >/dev/null
"${sudo[@]}" rm -rf "$rootfs"
log "$image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')"
