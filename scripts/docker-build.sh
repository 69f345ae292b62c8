#!/usr/bin/env bash
# Builds the fedge images (fedge/coordinator, fedge/edge-node) from release
# binaries built on this machine and the lean CPU libtorch, with no registry:
# the base image comes from scripts/docker-base.sh when it is not present.
#
#   scripts/docker-build.sh                    # tag :latest
#   FEDGE_IMAGE_TAG=0.1.0 scripts/docker-build.sh
#
# The binaries are built here (not in a builder image) because the Rust
# toolchain cannot be pulled as an image where no registry is reachable; the
# host is Debian bookworm like the image, so they share one glibc.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export FEDGE_CACHE=${FEDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedge}
tag=${FEDGE_IMAGE_TAG:-latest}
target_dir=${CARGO_TARGET_DIR:-$repo/target}
ctx="$FEDGE_CACHE/docker-context"

log() { printf 'docker-build: %s\n' "$*" >&2; }
started=$(date +%s)

bash scripts/docker-base.sh
bash scripts/install-libtorch.sh
log "building release binaries"
cargo build --release --locked -p coordinator -p edge-node --bins >&2

rm -rf "$ctx"
mkdir -p "$ctx/bin" "$ctx/libtorch"
cp "$target_dir/release/coordinator" "$target_dir/release/edge-node" "$ctx/bin/"
strip "$ctx/bin/coordinator" "$ctx/bin/edge-node" 2>/dev/null || true
# The lean libtorch's lib/ holds links into the wheels; copy what they point at.
cp -L "$repo"/.libtorch/lib/*.so* "$ctx/libtorch/"
cp deploy/docker/Dockerfile deploy/docker/coordinator.toml deploy/docker/edge-node.toml "$ctx/"

for target in coordinator edge-node; do
    log "building fedge/$target:$tag"
    if ! out=$(docker build --target "$target" -t "fedge/$target:$tag" "$ctx" 2>&1); then
        printf '%s\n' "$out" >&2
        log "docker build of $target failed"
        exit 1
    fi
done
rm -rf "$ctx"
# Images the new tags replaced.
docker image prune --force --filter label=org.opencontainers.image.title=fedge >/dev/null
for target in coordinator edge-node; do
    size=$(docker image inspect -f '{{.Size}}' "fedge/$target:$tag" | awk '{printf "%.0f MB", $1/1e6}')
    log "fedge/$target:$tag  $size"
done
log "done in $(( $(date +%s) - started )) s"
