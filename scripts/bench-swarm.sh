#!/usr/bin/env bash
# Coordinator memory and round time under many nodes: one coordinator
# (release build, central evaluation on the CIFAR-10 test split after every
# round) and N simulated nodes from fedge-swarm, which download each round's
# model and answer with a prepared update over the real protocol. Prints the
# coordinator's peak RSS beside the model's size, and per-round times.
#
#   scripts/bench-swarm.sh [NODES] [MODEL] [ROUNDS] [CODEC] [OUT_DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-libtorch.sh >/dev/null
data=$(scripts/get-cifar10.sh)
cargo build --release --bins -p coordinator -p fedge-tests
nodes=${1:-100}
model=${2:-cnn-wide}
rounds=${3:-3}
codec=${4:-f32}
out=${5:-runs/bench-swarm/$model-$nodes-$codec}
bin=$(mktemp -d)
trap 'rm -rf "$bin"; kill $(jobs -p) 2>/dev/null || true' EXIT
rel=${CARGO_TARGET_DIR:-target}/release
cp "$rel/coordinator" "$rel/fedge-swarm" "$bin/"
rm -rf "$out"
mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
"$bin/coordinator" serve --listen "127.0.0.1:$port" --out-dir "$out" --data-path "$data" \
    --set "model=\"$model\"" --set "rounds=$rounds" --set "codec.update=\"$codec\"" \
    --set "sampling.min_nodes=$nodes" --set "sampling.min_available=$nodes" \
    --set checkpoint.keep_round_models=false --set eval.batch_size=250 --set security.insecure=true \
    2>"$out/coordinator.log" &
coord=$!
"$bin/fedge-swarm" --coordinator "http://127.0.0.1:$port" --nodes "$nodes" 2>"$out/swarm.log"
wait "$coord"
tail -1 "$out/swarm.log" >&2
python3 - "$out/run.json" <<'PY'
import json, statistics, sys
run = json.load(open(sys.argv[1]))
model = 4 * run["parameters"]
peak = run["peak_rss_bytes"]
rounds = run["rounds"]
print(f"model {run['model']} ({run['parameters']:,} parameters, {model / 2**20:.0f} MiB), "
      f"{len(rounds[0]['participants'])} nodes, codec {run['config']['codec']['update']}: "
      f"coordinator peak RSS {peak / 2**20:.0f} MiB = {peak / model:.2f}x the model; "
      f"median round {statistics.median(r['round_seconds'] for r in rounds):.1f} s "
      f"(outside evaluation {statistics.median(r['train_phase_seconds'] for r in rounds):.1f} s), "
      f"uplink {statistics.mean(r['bytes_up'] for r in rounds) / 2**30:.2f} GiB/round")
PY
