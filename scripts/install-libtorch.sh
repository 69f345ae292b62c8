#!/usr/bin/env bash
# Installs a lean CPU libtorch 2.13.0 (the version tch 0.26 requires) from the
# PyPI `torch` wheel into a cache outside the repository, and links it to
# `<repo>/.libtorch`, which `.cargo/config.toml` points `LIBTORCH` at.
# Idempotent: a second run only re-checks the links.
#
#   scripts/install-libtorch.sh            # CPU (default)
#   FEDGE_CACHE=/somewhere scripts/install-libtorch.sh
#
# The wheel is a CUDA build; its CPU library still NEEDS libcudart and libcupti,
# which come from two small NVIDIA runtime wheels. `libtorch.so` itself needs the
# whole CUDA stack, so the lean lib dir holds an empty stand-in `libtorch.so`:
# a CPU program uses none of its symbols and does not NEED it at run time.
# For the GPU path see docs/deployment.md ("GPU").
set -euo pipefail

TORCH_VERSION=2.13.0
CUDART_SPEC='nvidia-cuda-runtime==13.0.96.*'
CUPTI_SPEC='nvidia-cuda-cupti==13.0.85.*'

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${FEDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedge}
dest="$cache/libtorch-$TORCH_VERSION-cpu"
wheels="$dest/wheels"
stamp="$dest/.complete"

log() { printf 'install-libtorch: %s\n' "$*" >&2; }

if [[ ! -f "$stamp" ]]; then
    log "installing libtorch $TORCH_VERSION (cpu) into $dest"
    python=$(command -v python3 || command -v python) || { log "python3 with pip is required"; exit 1; }
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-cache-dir \
        --target "$dest.tmp/wheels" "torch==$TORCH_VERSION" "$CUDART_SPEC" "$CUPTI_SPEC"
    t="$dest.tmp"
    mkdir -p "$t/lib"
    ln -s wheels/torch/include "$t/include"
    for so in libtorch_cpu.so libc10.so libgomp.so.1 libshm.so; do
        [[ -e "$t/wheels/torch/lib/$so" ]] || { log "wheel lacks torch/lib/$so"; exit 1; }
        ln -s "../wheels/torch/lib/$so" "$t/lib/$so"
    done
    for so in "$t"/wheels/nvidia/cu13/lib/libcudart.so.13 "$t"/wheels/nvidia/cu13/lib/libcupti.so.13; do
        [[ -e "$so" ]] || { log "missing $so"; exit 1; }
        ln -s "../wheels/nvidia/cu13/lib/$(basename "$so")" "$t/lib/$(basename "$so")"
    done
    # Empty stand-in for libtorch.so: only the link step needs to find it.
    : > "$t/empty.c"
    cc -shared -fPIC -o "$t/lib/libtorch.so" "$t/empty.c"
    rm "$t/empty.c"
    echo "$TORCH_VERSION" > "$t/build-version"
    rm -rf "$dest"
    mv "$t" "$dest"
    touch "$stamp"
    log "installed ($(du -sh "$dest" | cut -f1))"
else
    log "libtorch $TORCH_VERSION (cpu) already in $dest"
fi

ln -sfn "$dest" "$repo/.libtorch"
log "linked $repo/.libtorch -> $dest"
