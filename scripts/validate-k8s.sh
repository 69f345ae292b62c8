#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/k8s against the Kubernetes API
# schemas (kubernetes-validate, strict: unknown fields are errors), and the
# compose file with compose's own parser when compose is installed.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
version=1.37.0
if ! python3 -c "import kubernetes_validate" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==1.37.0" >&2
fi
manifests=(deploy/k8s/namespace.yaml deploy/k8s/coordinator.yaml deploy/k8s/edge-node.yaml)
python3 -m kubernetes_validate --strict --quiet -k "$version" "${manifests[@]}"
echo "validate-k8s: ${#manifests[@]} manifests valid against Kubernetes $version (strict)" >&2
if docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config --quiet
elif command -v docker-compose >/dev/null; then
    docker-compose -f docker-compose.yml config --quiet
fi
