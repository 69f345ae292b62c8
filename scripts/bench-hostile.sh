#!/usr/bin/env bash
# Honest rounds under attack. A coordinator (release build, token
# authentication, central evaluation on CIFAR-10's test split) trains with
# four real edge nodes on CIFAR-10 (IID quarters, E=1, B=32, lr 0.05), once
# alone and once beside fedge-hostile: stalled update streams that never send
# a header, a join flood with wrong tokens, and a fifth node with a valid
# token that, every round it is picked, holds a download it never reads,
# trickles its update a byte every two seconds, and tries 100 more uploads
# and downloads. Prints each run's median round time, rounds completed and
# coordinator peak RSS, and the ratios.
#
#   scripts/bench-hostile.sh [OUT_DIR] [ROUNDS] [STALLED_UPLOADS] [STRAGGLER_FACTOR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source scripts/bench-lib.sh
out=${1:-runs/bench-hostile}
rounds=${2:-5}
stalled=${3:-800}
straggler=${4:-3}
bench_setup
cp "${CARGO_TARGET_DIR:-target}/release/fedge-hostile" "$bin/"
trap 'rm -rf "$bin"; kill $(jobs -p) 2>/dev/null || true' EXIT
rm -rf "$out"
mkdir -p "$out"
"$bin/coordinator" certs --out "$out/pki" --names node-1,node-2,node-3,node-4,node-5 2>/dev/null

# run NAME NODES: a coordinator and NODES honest edge nodes (node-5, when
# NODES is 5, is fedge-hostile's authenticated node instead).
run() {
    local name=$1 nodes=$2 port=$((20000 + RANDOM % 20000))
    local dir="$out/$name"
    mkdir -p "$dir"
    "$bin/coordinator" serve --listen "127.0.0.1:$port" --out-dir "$dir/run" --data-path "$data" \
        --rounds "$rounds" --set security.insecure=true --set security.node_auth='"token"' \
        --set "security.tokens=\"$out/pki/tokens.toml\"" \
        --set sampling.min_nodes=4 --set "sampling.min_available=$nodes" \
        --set "sampling.straggler_factor=$straggler" --set checkpoint.keep_round_models=false \
        --set train.epochs=1 --set train.batch_size=32 --set train.learning_rate=0.05 \
        2>"$dir/coordinator.log" &
    local coord=$!
    if [[ $nodes == 5 ]]; then
        "$bin/fedge-hostile" --coordinator "http://127.0.0.1:$port" --stalled-uploads "$stalled" \
            --name node-5 --token-file "$out/pki/nodes/node-5/token" --seconds 3600 \
            2>"$dir/hostile.log" &
    fi
    for i in 0 1 2 3; do
        "$bin/edge-node" --coordinator "http://127.0.0.1:$port" --name "node-$((i + 1))" \
            --data-path "$data" --partition "$i/4" --threads 1 \
            --set security.insecure=true --set "security.token_file=\"$out/pki/nodes/node-$((i + 1))/token\"" \
            2>"$dir/node-$((i + 1)).log" &
    done
    wait "$coord"
    # The nodes stop with the run, and fedge-hostile once the coordinator is gone.
    wait
}

echo "bench: alone" >&2
run alone 4
echo "bench: under attack" >&2
run attack 5
python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def figures(name):
    run = json.load(open(f"{out}/{name}/run/run.json"))
    rounds = run["rounds"]
    return {
        "rounds": len(rounds),
        "round": statistics.median(r["round_seconds"] for r in rounds),
        "train": statistics.median(r["train_phase_seconds"] for r in rounds),
        "rss": run["peak_rss_bytes"] / 2**20,
        "accuracy": rounds[-1].get("test_accuracy"),
        "refusals": sum(sum(r["refusals"].values()) for r in rounds),
    }
a, h = figures("alone"), figures("attack")
for name, f in (("alone", a), ("under attack", h)):
    print(f"{name}: {f['rounds']} rounds, median round {f['round']:.2f} s (outside evaluation {f['train']:.2f} s), "
          f"coordinator peak RSS {f['rss']:.0f} MiB, final accuracy {100 * (f['accuracy'] or 0):.2f}%, "
          f"refusals {f['refusals']}")
print(f"ratio under attack / alone: round {h['round'] / a['round']:.2f}x, "
      f"outside evaluation {h['train'] / a['train']:.2f}x, peak RSS {h['rss'] / a['rss']:.2f}x")
PY
