#!/usr/bin/env bash
# Creates the kind cluster "pingmesh" from kind-config.yaml: one control plane
# and three workers labelled topology.pingmesh.io/tor=tor-a|tor-a|tor-b.
# Installs nothing into it (`tilt up` or hack/e2e-kind.sh does that).
#
# Usage: hack/kind-up.sh       idempotent: an existing cluster is kept
#
# Environment:
#   KIND_CLUSTER_NAME   cluster name (default pingmesh; the kube context is kind-<name>)
#   KIND_NODE_IMAGE     kindest/node image to use (default: kind's own)
# Needs docker (Docker Desktop or colima on macOS), kind and kubectl.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly CLUSTER="${KIND_CLUSTER_NAME:-pingmesh}"

die() {
  printf 'kind-up.sh: %s\n' "$*" >&2
  exit 1
}

for tool in docker kind kubectl; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} is not installed (macOS: brew install kind kubectl; Docker Desktop or colima)"
done
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (start Docker Desktop or 'colima start')"

if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  printf 'kind-up.sh: cluster %s already exists\n' "${CLUSTER}" >&2
else
  args=(create cluster --name "${CLUSTER}" --config "${ROOT}/kind-config.yaml" --wait 180s)
  if [[ -n "${KIND_NODE_IMAGE:-}" ]]; then
    args+=(--image "${KIND_NODE_IMAGE}")
  fi
  kind "${args[@]}"
fi

kubectl --context "kind-${CLUSTER}" wait --for=condition=Ready nodes --all --timeout=180s >/dev/null
kubectl --context "kind-${CLUSTER}" get nodes -L topology.pingmesh.io/tor
