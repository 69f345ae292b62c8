#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (libtorch; Debian's chromium for the dashboard test; PyTorch for Python
# for the check of an exported model), checks formatting and lints,
# validates the Kubernetes manifests, builds the container images where
# Docker is reachable, and runs every unit and integration test (real
# coordinator and edge-node processes over TCP; chaos tests across
# containers). A test whose tool is missing fails; FEDGE_BROWSER=0,
# FEDGE_PYTORCH=0 and FEDGE_CHAOS=0 skip those tests on purpose.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-libtorch.sh
if [[ ${FEDGE_BROWSER:-1} != 0 ]] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    sudo=(); [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    echo "test: installing chromium (Debian) for the dashboard test" >&2
    "${sudo[@]}" apt-get install -y --no-install-recommends chromium >/dev/null \
        || { "${sudo[@]}" apt-get update >/dev/null && "${sudo[@]}" apt-get install -y --no-install-recommends chromium >/dev/null; } \
        || echo "test: chromium could not be installed; the dashboard test will fail (FEDGE_BROWSER=0 skips it)" >&2
fi
if [[ ${FEDGE_PYTORCH:-1} != 0 ]]; then
    bash scripts/install-torch-python.sh >/dev/null \
        || echo "test: torch for Python could not be installed; the PyTorch check will fail (FEDGE_PYTORCH=0 skips it)" >&2
fi
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets depend on the torch-free protocol crate only: they must
# build without libtorch.
env -u LIBTORCH cargo check --manifest-path tests/fuzz/Cargo.toml --bins --locked
scripts/validate-k8s.sh
# The chaos tests run the compose fleet: they need the images where Docker
# is (FEDGE_CHAOS=0 skips them and the image build).
if [[ ${FEDGE_CHAOS:-1} == 0 ]]; then
    echo "test: FEDGE_CHAOS=0: the chaos tests will say they are skipped" >&2
elif docker info >/dev/null 2>&1; then
    scripts/docker-build.sh
else
    echo "test: no Docker engine reachable; the chaos tests will say they are skipped" >&2
fi
cargo test --workspace --locked
