#!/usr/bin/env bash
# Deletes the kind cluster made by hack/kind-up.sh (and everything in it).
#
# Environment: KIND_CLUSTER_NAME (default pingmesh).
set -euo pipefail

readonly CLUSTER="${KIND_CLUSTER_NAME:-pingmesh}"

command -v kind >/dev/null 2>&1 || {
  printf 'kind-down.sh: kind is not installed\n' >&2
  exit 1
}
if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  kind delete cluster --name "${CLUSTER}"
else
  printf 'kind-down.sh: no cluster named %s\n' "${CLUSTER}" >&2
fi
