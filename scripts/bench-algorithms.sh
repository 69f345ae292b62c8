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
scripts/install-libtorch.sh >/dev/null
data=$(scripts/get-cifar10.sh)
cargo build --release --bins
out=${1:-runs/bench-alg}
rounds=${2:-10}
# Run from a copy of the binaries, so a rebuild cannot change them mid-run.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
cp target/release/coordinator target/release/edge-node "$bin/"
mkdir -p "$out"

run() { # name partition-args... -- coordinator-args...
    local name=$1; shift
    local node=() coord=()
    while [[ $# -gt 0 && $1 != -- ]]; do node+=(--node-set "$1"); shift; done
    [[ $# -gt 0 ]] && shift
    for s in "$@"; do coord+=(--set "$s"); done
    if [[ -f $out/$name/run.json ]] && grep -q '"finished": true' "$out/$name/run.json"; then
        echo "bench-algorithms: $name already done" >&2
        return
    fi
    rm -rf "${out:?}/$name"
    echo "bench-algorithms: $name" >&2
    "$bin/coordinator" fleet --nodes 10 --rounds "$rounds" --data-path "$data" --out-dir "$out/$name" \
        --set sampling.min_nodes=10 --set sampling.min_available=10 --set train.epochs=1 \
        --set train.batch_size=32 --set train.learning_rate=0.05 --set train.momentum=0.9 \
        "${node[@]}" "${coord[@]}" 2>"$out/$name.log"
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
