#!/usr/bin/env bash
# End-to-end test on a real Kubernetes cluster (kind): the chart, the
# operator's reconciler and the agents' probing, together.
#
#   1. builds both images for this machine and loads them into kind
#   2. helm install charts/pingmesh, kubectl apply pingmesh.yaml
#   3. waits for one Ready agent per worker, then for the PingMesh status:
#      agentsReady == workers, pathsProbed > 0, condition Available=True
#   4. reads an agent's /metrics through a port-forward: some
#      pingmesh_probes_total{result="ok"} > 0, and probe series under both
#      ToRs of kind-config.yaml (the operator placed endpoints by node label)
#   5. turns spec.nodeHealth.conditions on: every worker gets
#      RdmaNetworkHealthy=True; turned off again, the condition goes
#   6. deletes the PingMesh and checks its DaemonSet, ConfigMap and pods are
#      garbage-collected; helm uninstall and checks the release's objects are
#      gone (the CRD stays: crds.keep)
#
# Usage: hack/e2e-kind.sh           run (creates the cluster when missing and
#                                   deletes it afterwards unless it existed)
#        hack/e2e-kind.sh --check   exit 0 if this machine can run it, else
#                                   say what is missing and exit 2
#
# Environment:
#   KIND_CLUSTER_NAME        cluster (default pingmesh)
#   PINGMESH_E2E_KEEP=1      keep the cluster and the installed objects
#   PINGMESH_E2E_TIMEOUT_S   per wait (default 300)
#   PINGMESH_E2E_SKIP_BUILD=1  use images already loaded (tag: e2e)
# Needs docker, kind, kubectl, helm (3.8+) and curl; macOS: Docker Desktop or
# colima, `brew install kind kubectl helm`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly CLUSTER="${KIND_CLUSTER_NAME:-pingmesh}"
readonly CONTEXT="kind-${CLUSTER}"
readonly NAMESPACE="pingmesh-system"
readonly RELEASE="pingmesh"
readonly MESH="default"
readonly TAG="e2e"
readonly OPERATOR_IMAGE="ghcr.io/pingmesh/pingmesh-operator:${TAG}"
readonly AGENT_IMAGE="ghcr.io/pingmesh/pingmesh-agent:${TAG}"
readonly TIMEOUT_S="${PINGMESH_E2E_TIMEOUT_S:-300}"
readonly METRICS_PORT=9402
readonly LOCAL_METRICS_PORT=19402

created_cluster=0
port_forward_pid=""

log() { printf '\n=== e2e-kind: %s\n' "$*" >&2; }
die() {
  printf 'e2e-kind: FAIL: %s\n' "$*" >&2
  exit 1
}

k() { kubectl --context "${CONTEXT}" "$@"; }
kn() { kubectl --context "${CONTEXT}" -n "${NAMESPACE}" "$@"; }

missing_prerequisites() {
  local tool missing=()
  for tool in docker kind kubectl helm curl; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
  done
  if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
    missing+=("a running Docker daemon")
  fi
  if ((${#missing[@]})); then
    printf '%s\n' "${missing[@]}"
  fi
}

# wait_until DESCRIPTION COMMAND...: polls COMMAND every 3 s until it succeeds.
wait_until() {
  local what=$1 deadline=$((SECONDS + TIMEOUT_S))
  shift
  until "$@"; do
    if ((SECONDS >= deadline)); then
      die "timed out after ${TIMEOUT_S}s waiting for ${what}"
    fi
    sleep 3
  done
}

diagnostics() {
  printf '\n--- diagnostics\n' >&2
  k get nodes -L topology.pingmesh.io/tor >&2 || true
  kn get pingmesh,daemonsets,deployments,configmaps,pods -o wide >&2 || true
  kn describe pingmesh "${MESH}" >&2 || true
  kn get events --sort-by=.lastTimestamp >&2 || true
  kn logs "deployment/${RELEASE}-operator" --tail=100 >&2 || true
}

cleanup() {
  local status=$?
  if [[ -n "${port_forward_pid}" ]]; then
    kill "${port_forward_pid}" 2>/dev/null || true
  fi
  if ((status != 0)); then
    diagnostics
  fi
  if [[ "${PINGMESH_E2E_KEEP:-0}" != 1 && "${created_cluster}" == 1 ]]; then
    "${ROOT}/hack/kind-down.sh" || true
  fi
  exit "${status}"
}

# Name of the DaemonSet the operator made for the mesh (found by owner, not by
# naming convention).
agent_daemonset() {
  kn get daemonsets -o \
    jsonpath="{range .items[?(@.metadata.ownerReferences[0].kind==\"PingMesh\")]}{.metadata.name}{\"\\n\"}{end}" |
    head -n 1
}

owned_by_mesh() {
  local resource=$1
  kn get "${resource}" -o \
    jsonpath="{range .items[*]}{.metadata.name}{\" \"}{.metadata.ownerReferences[*].kind}{\"\\n\"}{end}" |
    awk '/ PingMesh/ {print $1}'
}

agent_pods() {
  local daemonset=$1
  kn get pods -o \
    jsonpath="{range .items[?(@.metadata.ownerReferences[0].name==\"${daemonset}\")]}{.metadata.name}{\"\\n\"}{end}"
}

has_agent_daemonset() {
  [[ -n "$(agent_daemonset)" ]]
}

# Succeeds once `want` pods of the DaemonSet are Ready.
agents_ready() {
  local daemonset=$1 want=$2 ready
  ready="$(kn get pods -o \
    jsonpath="{range .items[?(@.metadata.ownerReferences[0].name==\"${daemonset}\")]}{.metadata.name}{\" \"}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}" |
    awk '$2 == "True"' | wc -l | tr -d ' ')"
  printf '  %s/%s agent pods ready\n' "${ready}" "${want}" >&2
  ((ready >= want))
}

worker_count() {
  k get nodes -l '!node-role.kubernetes.io/control-plane' -o name | wc -l | tr -d ' '
}

status_field() {
  kn get pingmesh "${MESH}" -o jsonpath="{$1}" 2>/dev/null
}

mesh_is_available() {
  local workers=$1 ready probed available
  ready="$(status_field .status.agentsReady)"
  probed="$(status_field .status.pathsProbed)"
  available="$(status_field '.status.conditions[?(@.type=="Available")].status')"
  printf '  agentsReady=%s/%s pathsProbed=%s Available=%s\n' "${ready:-?}" "${workers}" "${probed:-?}" "${available:-?}" >&2
  [[ "${ready}" == "${workers}" && "${probed:-0}" -gt 0 && "${available}" == True ]]
}

# Sum of pingmesh_probes_total samples with result="ok" in a /metrics page.
ok_probes() {
  curl -fsS "http://127.0.0.1:${LOCAL_METRICS_PORT}/metrics" |
    awk '/^pingmesh_probes_total\{/ && /result="ok"/ {sum += $NF} END {printf "%d\n", sum}'
}

agent_reports_ok_probes() {
  local count
  count="$(ok_probes 2>/dev/null || echo 0)"
  printf '  pingmesh_probes_total{result="ok"} = %s\n' "${count}" >&2
  ((count > 0))
}

# The ToR label values (src_tor, dst_tor) of the agent's probe series.
probed_tors() {
  curl -fsS "http://127.0.0.1:${LOCAL_METRICS_PORT}/metrics" |
    grep -o '_tor="[^"]*"' | sed 's/^.*="//; s/"$//' | sort -u | tr '\n' ' '
}

agent_probes_both_tors() {
  local tors
  tors="$(probed_tors 2>/dev/null || true)"
  printf '  ToRs in probe series: %s\n' "${tors:-none}" >&2
  [[ " ${tors} " == *" tor-a "* && " ${tors} " == *" tor-b "* ]]
}

readonly CONDITION=RdmaNetworkHealthy

# Succeeds when every worker's ${CONDITION} status is $1 ("" = absent).
workers_condition_is() {
  local want=$1 node status mismatch=0
  for node in $(k get nodes -l '!node-role.kubernetes.io/control-plane' -o name); do
    status="$(k get "${node}" -o jsonpath="{.status.conditions[?(@.type==\"${CONDITION}\")].status}")"
    printf '  %s %s=%s\n' "${node#node/}" "${CONDITION}" "${status:-absent}" >&2
    [[ "${status}" == "${want}" ]] || mismatch=1
  done
  return "${mismatch}"
}

nothing_left() {
  local what=$1
  shift
  [[ -z "$("$@" 2>/dev/null)" ]] || {
    printf '  still there: %s\n' "${what}" >&2
    return 1
  }
}

release_objects() {
  kn get deployments,services,serviceaccounts,roles,rolebindings,persistentvolumeclaims \
    -l "app.kubernetes.io/instance=${RELEASE}" -o name
  k get clusterroles,clusterrolebindings -l "app.kubernetes.io/instance=${RELEASE}" -o name
}

main() {
  local missing
  missing="$(missing_prerequisites)"
  if [[ "${1:-}" == --check ]]; then
    if [[ -n "${missing}" ]]; then
      printf 'e2e-kind: cannot run here; missing: %s\n' "$(tr '\n' ',' <<<"${missing}" | sed 's/,$//; s/,/, /g')" >&2
      exit 2
    fi
    exit 0
  fi
  [[ -z "${missing}" ]] || die "missing: $(tr '\n' ' ' <<<"${missing}")"
  trap cleanup EXIT

  log "cluster ${CLUSTER}"
  if ! kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
    created_cluster=1
  fi
  "${ROOT}/hack/kind-up.sh"
  local workers
  workers="$(worker_count)"
  ((workers > 0)) || die "the cluster has no worker nodes"

  if [[ "${PINGMESH_E2E_SKIP_BUILD:-0}" != 1 ]]; then
    log "building ${OPERATOR_IMAGE} and ${AGENT_IMAGE}"
    DOCKER_BUILDKIT=1 docker build -f "${ROOT}/images/operator.Dockerfile" -t "${OPERATOR_IMAGE}" "${ROOT}"
    DOCKER_BUILDKIT=1 docker build -f "${ROOT}/images/agent.Dockerfile" -t "${AGENT_IMAGE}" "${ROOT}"
  fi
  kind load docker-image --name "${CLUSTER}" "${OPERATOR_IMAGE}" "${AGENT_IMAGE}"

  log "helm install ${RELEASE} into ${NAMESPACE}"
  k create namespace "${NAMESPACE}" --dry-run=client -o yaml | k apply -f - >/dev/null
  k label namespace "${NAMESPACE}" pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null
  helm --kube-context "${CONTEXT}" upgrade --install "${RELEASE}" "${ROOT}/charts/pingmesh" \
    --namespace "${NAMESPACE}" \
    --set operator.image.tag="${TAG}" \
    --set operator.image.pullPolicy=Never \
    --set dashboards.enabled=false \
    --wait --timeout "${TIMEOUT_S}s"

  log "kubectl apply pingmesh.yaml (agent image ${AGENT_IMAGE})"
  sed -E "s#^([[:space:]]*image:[[:space:]]*).*pingmesh-agent.*#\\1${AGENT_IMAGE}#" "${ROOT}/pingmesh.yaml" |
    kn apply -f -

  log "waiting for ${workers} ready agents"
  wait_until "the agent DaemonSet" has_agent_daemonset
  local daemonset
  daemonset="$(agent_daemonset)"
  wait_until "${workers} ready agent pods of ${daemonset}" agents_ready "${daemonset}" "${workers}"

  log "waiting for PingMesh ${MESH} to report the mesh available"
  wait_until "agentsReady == ${workers}, pathsProbed > 0, Available=True" mesh_is_available "${workers}"
  kn get pingmesh "${MESH}"

  log "agent metrics through a port-forward"
  local pod
  pod="$(agent_pods "${daemonset}" | head -n 1)"
  kn port-forward "pod/${pod}" "${LOCAL_METRICS_PORT}:${METRICS_PORT}" >/dev/null 2>&1 &
  port_forward_pid=$!
  wait_until "${pod} to report successful probes" agent_reports_ok_probes
  wait_until "${pod} to probe under both ToRs (tor-a, tor-b from node labels)" agent_probes_both_tors
  kill "${port_forward_pid}" 2>/dev/null || true
  port_forward_pid=""

  log "Node condition ${CONDITION}: on, every worker True; off, gone"
  kn patch pingmesh "${MESH}" --type merge -p '{"spec":{"nodeHealth":{"conditions":true}}}'
  wait_until "${CONDITION}=True on every worker" workers_condition_is True
  kn patch pingmesh "${MESH}" --type merge -p '{"spec":{"nodeHealth":{"conditions":false}}}'
  wait_until "${CONDITION} removed from every worker" workers_condition_is ""

  if [[ "${PINGMESH_E2E_KEEP:-0}" == 1 ]]; then
    log "PINGMESH_E2E_KEEP=1: leaving everything installed"
    return
  fi

  log "deleting PingMesh ${MESH}: owned objects must be garbage-collected"
  kn delete pingmesh "${MESH}" --wait --timeout "${TIMEOUT_S}s"
  wait_until "the agent DaemonSet to go" nothing_left "DaemonSets owned by the PingMesh" owned_by_mesh daemonsets
  wait_until "the agent ConfigMap to go" nothing_left "ConfigMaps owned by the PingMesh" owned_by_mesh configmaps
  wait_until "the agent pods to go" nothing_left "agent pods" agent_pods "${daemonset}"

  log "helm uninstall: the release's objects must go, the CRD stays (crds.keep)"
  helm --kube-context "${CONTEXT}" uninstall "${RELEASE}" --namespace "${NAMESPACE}" --wait --timeout "${TIMEOUT_S}s"
  wait_until "the release's objects to go" nothing_left "objects of release ${RELEASE}" release_objects
  k get crd pingmeshes.pingmesh.io >/dev/null || die "the CRD was deleted although crds.keep is true"
  k delete crd pingmeshes.pingmesh.io --wait --timeout "${TIMEOUT_S}s" >/dev/null

  log "passed"
}

main "$@"
