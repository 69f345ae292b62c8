#!/usr/bin/env bash
# Prepares a docker compose fleet: builds the images (when missing), splits
# the data into one folder per node with `coordinator partition`, makes a
# development CA with a certificate per node (`coordinator certs`), and writes
# .env (and docker-compose.override.yml for other than 4 nodes or stragglers).
# Then `docker-compose up` (or `docker compose up`) trains.
#
#   scripts/compose-prepare.sh                          # 4 nodes, synthetic data
#   FEDGE_NODES=8 FEDGE_DATA=~/.cache/fedge/cifar-10-batches-bin scripts/compose-prepare.sh
#   FEDGE_STRAGGLERS=1 scripts/compose-prepare.sh       # the last node is slow
#   FEDGE_SLOWDOWNS=lognormal:8 scripts/compose-prepare.sh  # devices 1x to 8x slower
#   FEDGE_ASYNC=1 FEDGE_SLOWDOWNS=speeds.csv scripts/compose-prepare.sh  # asynchronous training on a trace
#
# Variables: FEDGE_NODES (4), FEDGE_ROUNDS (5), FEDGE_DATA (a data set folder;
# default: the synthetic set), FEDGE_PARTITION (iid | dirichlet | shards |
# quantity; default iid), FEDGE_STRAGGLERS (0: how many of the last nodes get
# FEDGE_STRAGGLER_CPUS (0.1) and a FEDGE_STRAGGLER_UPLINK (200000) bytes/s
# link), FEDGE_SLOWDOWNS (lognormal:MAX, or a node,slowdown[,online,offline[,offset]]
# CSV file: each node's train.slowdown and availability; see `coordinator
# slowdowns`), FEDGE_ASYNC (1: asynchronous training, [async]),
# FEDGE_MIN_AVAILABLE (connected nodes before training starts; default
# FEDGE_NODES), FEDGE_NODE_CPUS (0.5), FEDGE_NODE_MEMORY (1g), FEDGE_FLEET_DIR
# (./fleet; must not exist unless FEDGE_FORCE=1), FEDGE_GRPC_PORT (7070),
# FEDGE_HTTP_PORT (8080), FEDGE_REBUILD=1 to rebuild the images.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
nodes=${FEDGE_NODES:-4}
rounds=${FEDGE_ROUNDS:-5}
stragglers=${FEDGE_STRAGGLERS:-0}
scheme=${FEDGE_PARTITION:-iid}
fleet=${FEDGE_FLEET_DIR:-$repo/fleet}
tag=${FEDGE_IMAGE_TAG:-latest}
env_file=${FEDGE_ENV_FILE:-$repo/.env}
override=${FEDGE_OVERRIDE_FILE:-$repo/docker-compose.override.yml}

log() { printf 'compose-prepare: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "FEDGE_NODES must be a positive number, got '$nodes'"
[[ $stragglers =~ ^[0-9]+$ ]] && (( stragglers <= nodes )) || die "FEDGE_STRAGGLERS must be 0..$nodes, got '$stragglers'"
min_available=${FEDGE_MIN_AVAILABLE:-$nodes}
[[ $min_available =~ ^[1-9][0-9]*$ ]] && (( min_available <= nodes )) || die "FEDGE_MIN_AVAILABLE must be 1..$nodes, got '$min_available'"
case ${FEDGE_ASYNC:-0} in 1|true) async=true ;; 0|false|"") async=false ;; *) die "FEDGE_ASYNC must be 0 or 1, got '$FEDGE_ASYNC'" ;; esac
command -v docker >/dev/null || die "docker is required"
case $fleet in /*) ;; *) fleet="$repo/$fleet" ;; esac
if [[ -e $fleet ]]; then
    [[ -n ${FEDGE_FORCE:-} ]] || die "$fleet exists (a previous fleet: its run/ holds that run); remove it or set FEDGE_FORCE=1"
    rm -rf "$fleet"
fi

if [[ -n ${FEDGE_REBUILD:-} ]] || ! docker image inspect "fedge/coordinator:$tag" "fedge/edge-node:$tag" >/dev/null 2>&1; then
    FEDGE_IMAGE_TAG=$tag bash scripts/docker-build.sh
fi

# Containers never run as root; as root on the host, hand the folder to the
# image's user instead.
uid=$(id -u) gid=$(id -g)
if (( uid == 0 )); then uid=10001 gid=10001; fi

mkdir -p "$fleet/run"
for i in $(seq 1 "$nodes"); do mkdir -p "$fleet/state/node-$i"; done
data_mount=()
data_args=(--synthetic)
if [[ -n ${FEDGE_DATA:-} ]]; then
    [[ -d $FEDGE_DATA ]] || die "FEDGE_DATA=$FEDGE_DATA is not a folder"
    data_mount=(-v "$(cd "$FEDGE_DATA" && pwd):/source:ro")
    data_args=(--data-path /source)
fi
chown -R "$uid:$gid" "$fleet" 2>/dev/null || true
run_tool() {
    docker run --rm --user "$uid:$gid" -v "$fleet:/fleet" "${data_mount[@]}" \
        --entrypoint coordinator "fedge/coordinator:$tag" "$@"
}
log "partitioning ${FEDGE_DATA:-the synthetic set} into $nodes nodes ($scheme)"
run_tool partition "${data_args[@]}" --out /fleet/data --nodes "$nodes" --scheme "$scheme"
log "making a development CA and certificates"
run_tool certs --out /fleet/pki --nodes "$nodes" --hosts coordinator,localhost,127.0.0.1

# Each node's slowdown (1: the machine's speed) and availability
# ("online,offline,offset", empty: always online), node-1 first.
slowdowns=()
availability=()
if [[ -n ${FEDGE_SLOWDOWNS:-} ]]; then
    spec=$FEDGE_SLOWDOWNS
    trace_mount=()
    if [[ $spec != lognormal:* ]]; then
        [[ -f $spec ]] || die "FEDGE_SLOWDOWNS=$spec is neither lognormal:MAX nor a file"
        trace_mount=(-v "$(cd "$(dirname "$spec")" && pwd)/$(basename "$spec"):/slowdowns.csv:ro")
        spec=/slowdowns.csv
    fi
    trace=$(docker run --rm --user "$uid:$gid" "${trace_mount[@]}" --entrypoint coordinator \
        "fedge/coordinator:$tag" slowdowns "$spec" --nodes "$nodes")
    mapfile -t slowdowns < <(tail -n +2 <<<"$trace" | cut -d, -f2)
    mapfile -t availability < <(tail -n +2 <<<"$trace" | cut -d, -f3-5)
    log "node slowdowns: ${slowdowns[*]}"
fi

cat > "$env_file" <<ENV
# Written by scripts/compose-prepare.sh for docker-compose.yml.
COMPOSE_PROJECT_NAME=fedge
FEDGE_FLEET_DIR=$fleet
FEDGE_NODES=$nodes
FEDGE_ROUNDS=$rounds
FEDGE_MIN_AVAILABLE=$min_available
FEDGE_ASYNC=$async
FEDGE_UID=$uid
FEDGE_GID=$gid
FEDGE_IMAGE_TAG=$tag
FEDGE_NODE_CPUS=${FEDGE_NODE_CPUS:-0.5}
FEDGE_NODE_MEMORY=${FEDGE_NODE_MEMORY:-1g}
FEDGE_GRPC_PORT=${FEDGE_GRPC_PORT:-7070}
FEDGE_HTTP_PORT=${FEDGE_HTTP_PORT:-8080}
ENV

# Nodes beyond the four docker-compose.yml lists extend node-1; nodes it lists
# beyond FEDGE_NODES are scaled to 0; stragglers get less CPU and a slow link;
# slowed nodes their train.slowdown.
rm -f "$override"
if (( nodes != 4 || stragglers > 0 || ${#slowdowns[@]} > 0 )); then
    {
        echo "# Written by scripts/compose-prepare.sh: $nodes nodes, $stragglers straggler(s)${FEDGE_SLOWDOWNS:+, slowdowns $FEDGE_SLOWDOWNS}."
        echo "services:"
        for i in $(seq 1 "$(( nodes > 4 ? nodes : 4 ))"); do
            name="node-$i"
            if (( i > nodes )); then
                printf '  %s:\n    scale: 0\n' "$name"
                continue
            fi
            slow=$(( i > nodes - stragglers ))
            slowdown=${slowdowns[i-1]:-1.000}
            window=${availability[i-1]:-}
            [[ $window == ,* || $window == "" ]] && window=""
            (( i <= 4 && slow == 0 )) && [[ $slowdown == 1.000 && -z $window ]] && continue
            printf '  %s:\n' "$name"
            if (( i > 4 )); then
                cat <<YAML
    extends:
      file: docker-compose.yml
      service: node-1
    volumes:
      - \${FEDGE_FLEET_DIR:-./fleet}/data/$name:/data:ro
      - \${FEDGE_FLEET_DIR:-./fleet}/pki/nodes/$name:/etc/fedge/pki:ro
      - \${FEDGE_FLEET_DIR:-./fleet}/state/$name:/var/lib/fedge
YAML
            fi
            printf '    environment:\n      FEDGE_NODE_NAME: %s\n' "$name"
            if [[ $slowdown != 1.000 ]]; then
                printf '      FEDGE_NODE_TRAIN__SLOWDOWN: "%s"\n' "$slowdown"
            fi
            if [[ -n $window ]]; then
                IFS=, read -r online offline offset <<<"$window"
                printf '      FEDGE_NODE_AVAILABILITY__ONLINE: "%s"\n' "$online"
                printf '      FEDGE_NODE_AVAILABILITY__OFFLINE: "%s"\n' "$offline"
                [[ -n $offset ]] && printf '      FEDGE_NODE_AVAILABILITY__OFFSET: "%s"\n' "$offset"
            fi
            if (( slow )); then
                printf '      FEDGE_NODE_UPLOAD_BYTES_PER_SEC: "%s"\n' "${FEDGE_STRAGGLER_UPLINK:-200000}"
                printf '    cpus: %s\n' "${FEDGE_STRAGGLER_CPUS:-0.1}"
            fi
        done
    } > "$override"
    log "wrote $(basename "$override") ($nodes nodes, $stragglers straggler(s)${FEDGE_SLOWDOWNS:+, slowdowns $FEDGE_SLOWDOWNS})"
fi
log "fleet ready in $fleet; now run: docker-compose up   (or: docker compose up)"
log "then watch it: https://localhost:${FEDGE_HTTP_PORT:-8080}/#token=$(cat "$fleet/pki/operator/token" 2>/dev/null || echo "<the token in $fleet/pki/operator/token>")"
log "  (the development CA $fleet/pki/ca.pem signed its certificate), or:"
log "  coordinator status --url https://localhost:${FEDGE_HTTP_PORT:-8080} --ca $fleet/pki/ca.pem --token-file $fleet/pki/operator/token"
