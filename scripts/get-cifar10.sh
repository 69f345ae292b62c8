#!/usr/bin/env bash
# Converts the JPEG copy of CIFAR-10 beside the repository
# (../shared/data/cifar10-jpeg.tar.gz) into CIFAR-10's standard binary layout
# in a cache folder outside the repository, and prints that folder.
# Idempotent. Needs python3 with pillow and numpy (installed if missing).
#
#   export FEDGE_DATA__PATH=$(scripts/get-cifar10.sh)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${FEDGE_SHARED:-$repo/../shared}
cache=${FEDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedge}
out="$cache/cifar-10-batches-bin"
if [[ ! -f "$out/test_batch.bin" || ! -f "$out/data_batch_5.bin" ]]; then
    src="$shared/data/cifar10-jpeg.tar.gz"
    [[ -f "$src" ]] || { echo "get-cifar10: $src not found" >&2; exit 1; }
    python3 -c 'import PIL, numpy' 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check pillow numpy >&2
    echo "get-cifar10: converting $src into $out" >&2
    rm -rf "$out.tmp"
    python3 "$shared/tools/cifar10-bin-from-jpeg.py" "$src" "$out.tmp" >&2
    rm -rf "$out"
    mv "$out.tmp" "$out"
fi
echo "$out"
