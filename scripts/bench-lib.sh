# Shared by the fleet benchmarks (source it): the setup and one fleet run
# in S1's setting (every node every round, E=1, B=32, local SGD lr 0.05
# momentum 0.9) on real CIFAR-10.

# Installs libtorch, prepares CIFAR-10 (sets `data`), builds the release
# binaries and copies them to `bin`, so a rebuild cannot change them mid-run.
bench_setup() {
    scripts/install-libtorch.sh >/dev/null
    data=$(scripts/get-cifar10.sh)
    cargo build --release --bins
    bin=$(mktemp -d)
    trap 'rm -rf "$bin"' EXIT
    rel=${CARGO_TARGET_DIR:-target}/release
    cp "$rel/coordinator" "$rel/edge-node" "$bin/"
}

# bench_fleet OUT NAME NODES ROUNDS [coordinator fleet arguments...]
# Runs OUT/NAME (log in OUT/NAME.log) unless it already finished.
bench_fleet() {
    local out=$1 name=$2 nodes=$3 rounds=$4
    shift 4
    if [[ -f $out/$name/run.json ]] && grep -q '"finished": true' "$out/$name/run.json"; then
        echo "bench: $name already done" >&2
        return
    fi
    rm -rf "${out:?}/$name"
    mkdir -p "$out"
    echo "bench: $name" >&2
    "$bin/coordinator" fleet --nodes "$nodes" --rounds "$rounds" --data-path "$data" --out-dir "$out/$name" \
        --set "sampling.min_nodes=$nodes" --set "sampling.min_available=$nodes" --set train.epochs=1 \
        --set train.batch_size=32 --set train.learning_rate=0.05 --set train.momentum=0.9 \
        "$@" 2>"$out/$name.log"
}
