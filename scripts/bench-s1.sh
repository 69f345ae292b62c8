#!/usr/bin/env bash
# Benchmark S1 on real CIFAR-10: 8 edge-node processes, IID, every node every
# round, E=1, B=32, SGD lr 0.05 momentum 0.9, FedAvg by sample count,
# 10 rounds, central evaluation after each; then the centralized floor (one
# process, 2 threads, 1 epoch over all 50,000 images). Prints a markdown
# summary of runs/bench-s1/{run.json,baseline.json}.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-libtorch.sh
data=$(scripts/get-cifar10.sh)
cargo build --release --bins
out=${1:-runs/bench-s1}
rm -rf "$out"
"${CARGO_TARGET_DIR:-target}"/release/coordinator fleet --nodes 8 --rounds 10 --data-path "$data" --out-dir "$out" \
    --set sampling.min_nodes=8 --set train.epochs=1 --set train.batch_size=32 \
    --set train.learning_rate=0.05 --set train.momentum=0.9
"${CARGO_TARGET_DIR:-target}"/release/coordinator baseline --data-path "$data" --out-dir "$out" --epochs 1 --threads 2 \
    --set train.batch_size=32 --set train.learning_rate=0.05 --set train.momentum=0.9
python3 scripts/bench-summary.py "$out"
