#!/usr/bin/env bash
# Differential privacy on real CIFAR-10, in S1's setting: 8 edge-node
# processes, IID split, every node every round, E=1, B=32, local SGD lr 0.05
# momentum 0.9, 10 rounds, central evaluation after each. One run without
# privacy, then DP-FedAvg with adaptive clipping (median) and central noise
# at each noise multiplier in ZS, starting from a clipping norm of 8 (about
# the median update norm of the first rounds without privacy; the count of
# unclipped updates gets noise of stddev 1, enough for z up to 2). Prints a
# markdown table of accuracy and the epsilon (delta 1e-5) each run spent.
#
#   [SEED=42] [ZS="0.003 0.01 0.1 1.0"] scripts/bench-privacy.sh [OUT_DIR] [ROUNDS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/bench-lib.sh
bench_setup
out=${1:-runs/bench-privacy}
rounds=${2:-10}
seed=${SEED:-42}
bench_fleet "$out" plain 8 "$rounds" --set "seed=$seed" --node-set partition.scheme=iid
for z in ${ZS:-0.003 0.01 0.1 1.0}; do
    bench_fleet "$out" "dp-z$z" 8 "$rounds" --set "seed=$seed" --node-set partition.scheme=iid \
        --set 'privacy.noise="central"' --set "privacy.noise_multiplier=$z" --set privacy.clip_norm=8.0 \
        --set privacy.adaptive_clip=true --set privacy.clip_count_stddev=1.0 \
        || echo "bench: dp-z$z stopped before its last round (see $out/dp-z$z.log)" >&2
done
python3 scripts/bench-privacy-summary.py "$out"
