#!/usr/bin/env bash
# Installs PyTorch for Python (the PyPI `torch` wheel of the libtorch version
# fedge builds against, with its dependencies) into a cache folder outside
# the repository, for the test that loads an exported fedge model in
# PyTorch. About 4.7 GB, 1.5 minutes on a fast link; idempotent.
#
#   scripts/install-torch-python.sh      # prints the folder to put on PYTHONPATH
set -euo pipefail
cache=${FEDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedge}
dest="$cache/torch-py"
if [[ ! -f "$dest/.complete" ]]; then
    echo "install-torch-python: installing torch 2.13.0 into $dest" >&2
    rm -rf "$dest"
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --target "$dest" "torch==2.13.0" >&2
    touch "$dest/.complete"
fi
echo "$dest"
