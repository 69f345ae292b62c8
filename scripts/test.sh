#!/usr/bin/env bash
# The test command: installs libtorch when needed, checks formatting and
# lints, and runs every unit and integration test (real coordinator and
# edge-node processes over TCP).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
scripts/install-libtorch.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
