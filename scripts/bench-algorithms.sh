#!/usr/bin/env bash
# Federated algorithms on real CIFAR-10: 10 edge-node processes, every node
# every round, E=1, B=32, local SGD lr 0.05 momentum 0.9, 10 rounds, central
# evaluation after each. Label skew from the Dirichlet partitioner (alpha 0.5
# and 0.1) for FedAvg, FedProx (mu 0.01), SCAFFOLD and FedAdam (server lr
# 0.01, tau 1e-3), beside FedAvg on an IID split. Prints a markdown table of
# runs/bench-alg/*/run.json.
#
#   scripts/bench-algorithms.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/bench-lib.sh
bench_setup
out=${1:-runs/bench-alg}
rounds=${2:-10}

run() { # name partition-args... -- coordinator-args...
    local name=$1; shift
    local node=() coord=()
    while [[ $# -gt 0 && $1 != -- ]]; do node+=(--node-set "$1"); shift; done
    [[ $# -gt 0 ]] && shift
    for s in "$@"; do coord+=(--set "$s"); done
    bench_fleet "$out" "$name" 10 "$rounds" "${node[@]}" "${coord[@]}"
}

run iid-fedavg partition.scheme=iid
for alpha in 0.5 0.1; do
    p=(partition.scheme=dirichlet "partition.alpha=$alpha")
    run "dir$alpha-fedavg" "${p[@]}"
    run "dir$alpha-fedprox" "${p[@]}" -- 'train.algorithm="fedprox"' train.proximal_mu=0.01
    run "dir$alpha-scaffold" "${p[@]}" -- 'train.algorithm="scaffold"'
    run "dir$alpha-fedadam" "${p[@]}" -- 'strategy.server_optimizer="adam"' strategy.server_lr=0.01 strategy.tau=0.001
done
python3 scripts/bench-algorithms-summary.py "$out"
