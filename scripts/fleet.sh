#!/usr/bin/env bash
# The main job: a federated training run on a local fleet (one coordinator,
# FEDGE_NODES edge-node processes on loopback, default 4). Installs libtorch
# and builds the release binaries when needed; works offline.
#
# Uses CIFAR-10 when FEDGE_DATA__PATH points at its binary layout
# (see scripts/get-cifar10.sh), else a synthetic learnable data set.
# Extra arguments go to `coordinator fleet` (e.g. --rounds 10 --set train.epochs=2).
# The global model, per-round checkpoints and run.json land in runs/latest/
# (FEDGE_OUT_DIR or --out-dir to change it).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-libtorch.sh
cargo build --release --bins
exec "${CARGO_TARGET_DIR:-target}"/release/coordinator fleet --nodes "${FEDGE_NODES:-4}" "$@"
