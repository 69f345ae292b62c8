#!/usr/bin/env bash
# Secure aggregation's cost. Part 1, the protocol's overhead: N edge-node
# processes and a coordinator on loopback, the design's CNN (160,202
# parameters), every node in every round, one local SGD step of batch 32
# each (so the round is mostly protocol), 6 rounds on the built-in
# synthetic data, with and without secure aggregation, for N = 10 and 50.
# Part 2, accuracy on real CIFAR-10: S1's setting with 10 nodes and 10
# rounds, with and without it. At 50 nodes also SecAgg+ with 8 neighbours
# per node. Prints per-round medians (rounds 2 on) of time and bytes, and
# the ratios.
#
#   [NODES="10 50"] [CIFAR=1] scripts/bench-secagg.sh [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/bench-lib.sh
bench_setup
out=${1:-runs/bench-secagg}
mkdir -p "$out"
secure=(--set secure_aggregation.enabled=true --set secure_aggregation.step_timeout='"60s"')
overhead() {
    local name=$1 nodes=$2
    shift 2
    if [[ -f $out/$name/run.json ]] && grep -q '"finished": true' "$out/$name/run.json"; then
        echo "bench: $name already done" >&2
        return
    fi
    rm -rf "${out:?}/$name"
    echo "bench: $name" >&2
    "$bin/coordinator" fleet --nodes "$nodes" --rounds 6 --out-dir "$out/$name" \
        --set "sampling.min_nodes=$nodes" --set "sampling.min_available=$nodes" \
        --set train.max_steps=1 --set train.batch_size=32 --set train.learning_rate=0.05 \
        --set train.momentum=0.9 --set sampling.round_deadline='"10m"' "$@" 2>"$out/$name.log"
}
for n in ${NODES:-10 50}; do
    overhead "plain-$n" "$n"
    overhead "secure-$n" "$n" "${secure[@]}"
    if ((n >= 50)); then
        # SecAgg+: 8 neighbours per node instead of all n - 1.
        overhead "secure-k8-$n" "$n" "${secure[@]}" --set secure_aggregation.neighbours=8
    fi
done
if [[ ${CIFAR:-1} == 1 ]]; then
    bench_fleet "$out" cifar-plain 10 10 --node-set partition.scheme=iid
    bench_fleet "$out" cifar-secure 10 10 --node-set partition.scheme=iid "${secure[@]}"
fi
python3 scripts/bench-secagg-summary.py "$out"
