#!/usr/bin/env bash
# Update codecs on real CIFAR-10: 8 edge-node processes, IID split, every
# node every round, E=1, B=32, local SGD lr 0.05 momentum 0.9, FedAvg, 10
# rounds, central evaluation after each; one run per codec (f32, f16, bf16,
# int8, top-k 1% and 10% with error feedback, sign with error feedback).
# Prints a markdown table of uplink bytes per round and accuracy beside f32.
# SEED sets the run seed (model initialization, shuffling), CODECS a subset.
#
#   [SEED=42] [CODECS="f32 int8 ..."] scripts/bench-codecs.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/bench-lib.sh
bench_setup
out=${1:-runs/bench-codecs}
rounds=${2:-10}
seed=${SEED:-42}
codecs=${CODECS:-f32 f16 bf16 int8 topk1 topk10 sign}

run() { # name coordinator-settings...
    local name=$1; shift
    [[ " $codecs " == *" $name "* ]] || return 0
    local coord=()
    for s in "$@"; do coord+=(--set "$s"); done
    bench_fleet "$out" "$name" 8 "$rounds" --set "seed=$seed" --node-set partition.scheme=iid "${coord[@]}"
}

run f32
run f16 'codec.update="f16"'
run bf16 'codec.update="bf16"'
run int8 'codec.update="int8"' codec.block=256
run topk1 'codec.update="topk"' codec.topk_fraction=0.01
run topk10 'codec.update="topk"' codec.topk_fraction=0.1
run sign 'codec.update="sign"' codec.block=256
python3 scripts/bench-codecs-summary.py "$out"
