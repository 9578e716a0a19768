#!/usr/bin/env bash
# The real-node tier: a one-node Kubernetes cluster on this Linux machine
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy
# and a kubelet from $KUBEBUILDER_ASSETS; containerd, runc and the CNI plugins
# from the distribution), the agent and operator images packed from locally
# built binaries (no registry, no Docker: an OCI image archive imported with
# `ctr images import`), the chart installed with helm and pingmesh.yaml
# applied; then the checks a real kubelet makes possible.
#
#   hack/realnode.sh up      bring the cluster up, install the chart, apply pingmesh.yaml
#   hack/realnode.sh check   the operator turns Ready, agents register through the
#                            Service, metrics are served (waits up to the timeout)
#   hack/realnode.sh down    delete everything up made, restore the host's settings
#   hack/realnode.sh run     up, check, down (down also when something fails)
#   hack/realnode.sh env     print `export KUBECONFIG=...` (eval it)
#
# Needs root on Linux (a kubelet runs pods), KUBEBUILDER_ASSETS naming a folder
# with kube-apiserver, etcd, kube-controller-manager, kube-scheduler, kube-proxy
# and kubelet (kubectl optional: else the one on PATH), for example the server
# binaries of a Kubernetes release plus etcd; containerd, ctr, runc and the CNI
# plugins (Debian/Ubuntu: apt-get install containerd runc
# containernetworking-plugins), dnsmasq (dnsmasq-base), iptables, openssl,
# curl, and the binaries: cargo build --bins -p pingmesh-agent -p pingmesh-operator
# (--release too; release binaries are used when both exist). helm comes from
# hack/envtest.sh helm.
#
# Only one such cluster per machine: kube-proxy owns the host's KUBE-* iptables
# chains, and the agent pod binds its ports (9402/TCP, 9403/UDP) on the host.
# The cluster listens on loopback or on a bridge of its own (pmrn0, 10.213.0.1,
# which is the node address); only the agent pod binds its ports on every host
# address, as on any node. Pods get addresses from 10.213.0.0/24, Services
# from 10.213.1.0/24, and a dnsmasq on the node address answers cluster names
# and nothing else. Pod traffic is not masqueraded and image pulls are sent to
# a proxy that does not exist, so nothing leaves the machine.
#
# State (logs, certificates, kubeconfig, containerd's store, the kubelet's
# root) lives in $PINGMESH_REALNODE_DIR (default ${TMPDIR:-/tmp}/pingmesh-realnode).
#
# Environment:
#   KUBEBUILDER_ASSETS           the folder with the Kubernetes binaries (required)
#   PINGMESH_REALNODE_DIR        state directory (see above)
#   PINGMESH_REALNODE_PROFILE    release | debug: which target/ binaries to pack
#                                (default: release when both binaries exist there)
#   PINGMESH_REALNODE_TIMEOUT_S  how long each wait may take (default 180)
#   PINGMESH_REALNODE_PEER=0     no second agent: by default `up` also runs an
#                                agent process on the host (node realnode-peer),
#                                registered through the Service, so the pod's
#                                agent has a peer to probe
#   PINGMESH_REALNODE_KEEP=1     `run` leaves the cluster up
#   PINGMESH_HELM                helm binary (default: hack/envtest.sh helm)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
# shellcheck source=SCRIPTDIR/lib/pki.sh
. "${ROOT}/hack/lib/pki.sh"
readonly STATE="${PINGMESH_REALNODE_DIR:-${TMPDIR:-/tmp}/pingmesh-realnode}"
readonly TIMEOUT_S="${PINGMESH_REALNODE_TIMEOUT_S:-180}"

readonly NODE=pingmesh-node
readonly TOR=rack-a
readonly BRIDGE=pmrn0
readonly NODE_IP=10.213.0.1
readonly POD_CIDR=10.213.0.0/24
readonly POD_RANGE_START=10.213.0.10
readonly SERVICE_CIDR=10.213.1.0/24
readonly KUBERNETES_SVC_IP=10.213.1.1
readonly CLUSTER_DOMAIN=cluster.local
readonly NAMESPACE=pingmesh-system
readonly RELEASE=pingmesh
readonly OPERATOR=pingmesh-operator
readonly MESH=default
readonly AGENT_METRICS_PORT=9402
readonly AGENT_UDP_PORT=9403
readonly IMAGE_TAG=realnode
readonly IMAGE_PREFIX=localhost/pingmesh
readonly PAUSE_REF=localhost/pingmesh/pause:realnode
readonly PEER_NODE=realnode-peer
# Host settings the kubelet, kube-proxy and the CNI bridge plugin change;
# `up` records them and `down` puts them back.
readonly SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.route_localnet
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Fixed paths the kubelet (device plugin socket, container log links) and
# containerd (shim sockets) and CNI (result cache) use whatever their roots;
# `down` removes those `up` created.
readonly HOST_DIRS=(/var/lib/kubelet /var/log/containers /run/containerd /var/lib/cni)

log() { printf 'realnode.sh: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}
usage() {
  sed -n '10,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- preflight

ASSETS=""
KUBECTL=""
CNI_BIN=""

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is needed${2:+ ($2)}"
}

preflight() {
  [[ "$(uname -s)" == Linux ]] || die "the real-node tier runs a kubelet: Linux only (on a Mac, run it inside a Linux VM; docs/kubernetes.md)"
  [[ "$(id -u)" == 0 ]] || die "run as root: the kubelet, containerd and kube-proxy need it"
  ASSETS="${KUBEBUILDER_ASSETS:-}"
  [[ -n "${ASSETS}" ]] || die "KUBEBUILDER_ASSETS is not set: point it at a folder holding kube-apiserver, etcd, kube-controller-manager, kube-scheduler, kube-proxy and kubelet (docs/kubernetes.md, \"Real-node tier\")"
  local bin
  for bin in kube-apiserver etcd kube-controller-manager kube-scheduler kube-proxy kubelet; do
    [[ -x "${ASSETS}/${bin}" ]] || die "KUBEBUILDER_ASSETS=${ASSETS} has no executable ${bin}"
  done
  if [[ -x "${ASSETS}/kubectl" ]]; then
    KUBECTL="${ASSETS}/kubectl"
  else
    KUBECTL="$(command -v kubectl)" || die "kubectl is needed (in KUBEBUILDER_ASSETS or on PATH)"
  fi
  need containerd "apt-get install containerd"
  need containerd-shim-runc-v2 "apt-get install containerd"
  need ctr "apt-get install containerd"
  need runc "apt-get install runc"
  need dnsmasq "apt-get install dnsmasq-base"
  need iptables
  need ip "apt-get install iproute2"
  need openssl
  need curl
  need ldd
  need sha256sum
  local dir
  for dir in /usr/lib/cni /opt/cni/bin; do
    if [[ -x "${dir}/bridge" && -x "${dir}/host-local" && -x "${dir}/loopback" ]]; then
      CNI_BIN="${dir}"
      break
    fi
  done
  [[ -n "${CNI_BIN}" ]] || die "the CNI plugins bridge, host-local and loopback are needed in /usr/lib/cni or /opt/cni/bin (apt-get install containernetworking-plugins)"
}

# target/<profile>/ holding both binaries.
binaries_dir() {
  local profile="${PINGMESH_REALNODE_PROFILE:-}" p
  if [[ -z "${profile}" ]]; then
    for p in release debug; do
      if [[ -x "${ROOT}/target/${p}/pingmesh-agent" && -x "${ROOT}/target/${p}/pingmesh-operator" ]]; then
        profile="${p}"
        break
      fi
    done
  fi
  [[ -n "${profile}" ]] || die "no agent and operator binaries: cargo build --bins -p pingmesh-agent -p pingmesh-operator"
  local dir="${ROOT}/target/${profile}"
  [[ -x "${dir}/pingmesh-agent" && -x "${dir}/pingmesh-operator" ]] ||
    die "target/${profile} lacks pingmesh-agent or pingmesh-operator (cargo build --bins -p pingmesh-agent -p pingmesh-operator, with --release for target/release)"
  echo "${dir}"
}

# ---------------------------------------------------------------- helpers

k() { "${KUBECTL}" --kubeconfig "${STATE}/kubeconfig" "$@"; }

free_port() {
  local port tries=0
  while ((tries < 200)); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null &&
      ! (exec 3<>"/dev/tcp/${NODE_IP}/${port}") 2>/dev/null; then
      echo "${port}"
      return
    fi
    tries=$((tries + 1))
  done
  die "no free port found"
}

# Starts "$@" in the background, logging to $STATE/$1.log, pid in $STATE/$1.pid.
spawn() {
  local name="$1"
  shift
  nohup "$@" </dev/null >"${STATE}/${name}.log" 2>&1 &
  echo $! >"${STATE}/${name}.pid"
}

# A process that has not exited (a zombie waiting for its reaper has).
running() {
  local state
  state="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ -n "${state}" && "${state}" != Z* ]]
}

alive() { [[ -f "${STATE}/$1.pid" ]] && running "$(cat "${STATE}/$1.pid")"; }

# wait_for NAME WHAT CMD...: runs CMD until it succeeds while process NAME
# lives (NAME may be "-"), up to the timeout.
wait_for() {
  local name="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + TIMEOUT_S))
  while ((SECONDS < deadline)); do
    if [[ "${name}" != - ]] && ! alive "${name}"; then
      log "${name} exited while waiting for ${what}; last lines of ${STATE}/${name}.log:"
      tail -n 20 "${STATE}/${name}.log" >&2
      return 1
    fi
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  log "timed out after ${TIMEOUT_S}s waiting for ${what}"
  if [[ "${name}" != - ]]; then
    log "last lines of ${STATE}/${name}.log:"
    tail -n 20 "${STATE}/${name}.log" >&2
  fi
  return 1
}

stop_proc() {
  local name="$1" pidfile="${STATE}/$1.pid" pid i
  [[ -f "${pidfile}" ]] || return 0
  pid="$(cat "${pidfile}")"
  if running "${pid}"; then
    kill -TERM "${pid}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      running "${pid}" || break
      sleep 0.1
    done
    running "${pid}" && kill -KILL "${pid}" 2>/dev/null
  fi
  rm -f "${pidfile}"
}

api() {
  curl -fsS --max-time 3 --cacert "${STATE}/pki/ca.crt" \
    --cert "${STATE}/pki/admin.crt" --key "${STATE}/pki/admin.key" \
    "$(cat "${STATE}/server")$1"
}

phase_start=0
phase() {
  local now=${SECONDS}
  if [[ -n "${current_phase}" ]]; then
    printf '%s %ss\n' "${current_phase}" "$((now - phase_start))" >>"${STATE}/timings"
  fi
  current_phase="$1"
  phase_start=${now}
  [[ -n "$1" ]] && log "$1"
  return 0
}
current_phase=""

# ---------------------------------------------------------------- certificates

make_pki() {
  local pki="${STATE}/pki"
  pki_init "${pki}" pingmesh-realnode-ca \
    "IP:127.0.0.1,IP:${NODE_IP},IP:${KUBERNETES_SVC_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.${CLUSTER_DOMAIN}"
  pki_issue "${pki}" apiserver "/CN=kube-apiserver" server
  pki_issue "${pki}" admin "/O=system:masters/CN=pingmesh-realnode-admin" client
  pki_issue "${pki}" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
  pki_issue "${pki}" kubelet "/O=system:nodes/CN=system:node:${NODE}" client
  pki_issue "${pki}" controller-manager "/CN=system:kube-controller-manager" client
  pki_issue "${pki}" scheduler "/CN=system:kube-scheduler" client
  pki_issue "${pki}" proxy "/CN=system:kube-proxy" client
  pki_service_accounts "${pki}"
}

b64() { base64 <"$1" | tr -d '\n'; }

# write_kubeconfig FILE CERT_NAME
write_kubeconfig() {
  local pki="${STATE}/pki"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: realnode
    cluster:
      server: $(cat "${STATE}/server")
      certificate-authority-data: $(b64 "${pki}/ca.crt")
users:
  - name: $2
    user:
      client-certificate-data: $(b64 "${pki}/$2.crt")
      client-key-data: $(b64 "${pki}/$2.key")
contexts:
  - name: realnode
    context:
      cluster: realnode
      user: $2
current-context: realnode
EOF
  chmod 600 "$1"
}

# ---------------------------------------------------------------- host network

save_host_settings() {
  local key
  : >"${STATE}/sysctls"
  for key in "${SYSCTLS[@]}"; do
    if sysctl -n "${key}" >/dev/null 2>&1; then
      printf '%s=%s\n' "${key}" "$(sysctl -n "${key}")" >>"${STATE}/sysctls"
    fi
  done
  ls /var/run/netns 2>/dev/null >"${STATE}/netns-before" || true
  kube_chains >"${STATE}/chains-before"
  ls -d /sys/fs/cgroup/*/kubepods 2>/dev/null >"${STATE}/cgroups-before" || true
  local dir
  for dir in "${HOST_DIRS[@]}" /dev/infiniband; do
    [[ ! -e "${dir}" ]] || echo "${dir}"
  done >"${STATE}/dirs-before"
}

# "family table chain" of every KUBE-* iptables chain there is now.
kube_chains() {
  local family
  for family in iptables ip6tables; do
    command -v "${family}-save" >/dev/null 2>&1 || continue
    "${family}-save" 2>/dev/null |
      awk -v f="${family}" '/^\*/ {t = substr($0, 2)} /^:KUBE-/ {print f, t, substr($1, 2)}'
  done
}

# The KUBE-* chains that were not there before `up` (kube-proxy's and the
# kubelet's: KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT), with the
# rules that jump to them.
remove_new_chains() {
  local new=() line family table chain rule
  while IFS= read -r line; do
    grep -qxF "${line}" "${STATE}/chains-before" 2>/dev/null || new+=("${line}")
  done < <(kube_chains)
  ((${#new[@]})) || return 0
  for line in "${new[@]}"; do
    read -r family table chain <<<"${line}"
    "${family}" -t "${table}" -F "${chain}" 2>/dev/null || true
  done
  for line in "${new[@]}"; do
    read -r family table chain <<<"${line}"
    while IFS= read -r rule; do
      # xargs splits the rule as iptables-save quoted it (comments).
      printf '%s\n' "-D ${rule#-A }" | xargs "${family}" -t "${table}" 2>/dev/null || true
    done < <("${family}" -t "${table}" -S 2>/dev/null | grep -E -- "^-A .* -j ${chain}( |\$)")
  done
  for line in "${new[@]}"; do
    read -r family table chain <<<"${line}"
    "${family}" -t "${table}" -X "${chain}" 2>/dev/null || log "could not delete ${family} chain ${table}/${chain}"
  done
}

# What the kubelet and containerd leave outside the state directory: empty
# kubepods cgroups, and directories with fixed paths, when `up` made them.
remove_host_leftovers() {
  local cg dir
  for cg in /sys/fs/cgroup/*/kubepods; do
    [[ -d "${cg}" ]] || continue
    grep -qxF "${cg}" "${STATE}/cgroups-before" 2>/dev/null && continue
    find "${cg}" -depth -type d -exec rmdir {} + 2>/dev/null || log "could not remove cgroup ${cg}"
  done
  for dir in "${HOST_DIRS[@]}"; do
    [[ -e "${dir}" ]] || continue
    grep -qxF "${dir}" "${STATE}/dirs-before" 2>/dev/null && continue
    rm -rf "${dir}"
  done
  # The agent pod's hostPath /dev/infiniband (no type check): on a node
  # without RDMA the container runtime creates it, empty, on the host.
  if [[ -d /dev/infiniband ]] && ! grep -qxF /dev/infiniband "${STATE}/dirs-before" 2>/dev/null; then
    rmdir /dev/infiniband 2>/dev/null || true
  fi
}

restore_host_settings() {
  [[ -f "${STATE}/sysctls" ]] || return 0
  local line
  while IFS= read -r line; do
    sysctl -qw "${line}" >/dev/null 2>&1 || log "could not restore ${line}"
  done <"${STATE}/sysctls"
}

# The node's own bridge and address: the API server, the kubelet and the DNS
# server listen here, pods hang off it, and routes to Service addresses leave
# through it (so host processes reach Services from the node address).
setup_bridge() {
  ip link add "${BRIDGE}" type bridge
  ip addr add "${NODE_IP}/${POD_CIDR#*/}" dev "${BRIDGE}"
  ip link set "${BRIDGE}" up
  ip route add "${SERVICE_CIDR}" dev "${BRIDGE}" src "${NODE_IP}"
}

write_cni_config() {
  mkdir -p "${STATE}/cni/net.d" "${STATE}/cni/ipam"
  cat >"${STATE}/cni/net.d/10-pingmesh-realnode.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "pingmesh-realnode",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "${STATE}/cni/ipam",
        "ranges": [[{"subnet": "${POD_CIDR}", "gateway": "${NODE_IP}", "rangeStart": "${POD_RANGE_START}"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

# ---------------------------------------------------------------- control plane

# Ports are picked free but may be taken before the server binds them: each
# server gets three tries.
retry3() {
  local try
  for try in 1 2 3; do
    "$@" && return 0
    ((try < 3)) && log "retrying $1 on other ports"
  done
  return 1
}

start_etcd() {
  local client peer
  stop_proc etcd
  rm -rf "${STATE}/etcd"
  client="$(free_port)"
  peer="$(free_port)"
  spawn etcd "${ASSETS}/etcd" --name=realnode --data-dir="${STATE}/etcd" \
    --listen-client-urls="http://127.0.0.1:${client}" \
    --advertise-client-urls="http://127.0.0.1:${client}" \
    --listen-peer-urls="http://127.0.0.1:${peer}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${peer}" \
    --initial-cluster="realnode=http://127.0.0.1:${peer}" \
    --listen-metrics-urls="http://127.0.0.1:$(free_port)" \
    --unsafe-no-fsync
  echo "http://127.0.0.1:${client}" >"${STATE}/etcd-url"
  wait_for etcd "etcd" curl -fsS --max-time 2 "http://127.0.0.1:${client}/health"
}

start_apiserver() {
  local port pki="${STATE}/pki"
  stop_proc kube-apiserver
  port="$(free_port)"
  echo "https://${NODE_IP}:${port}" >"${STATE}/server"
  # Node address, not loopback: the lease endpoint reconciler publishes it in
  # the kubernetes Service, and kube-proxy sends pods there. The kubelet is
  # reached at the node's InternalIP (the default tries its host name first,
  # which only this machine's resolver could answer).
  spawn kube-apiserver "${ASSETS}/kube-apiserver" \
    --etcd-servers="$(cat "${STATE}/etcd-url")" \
    --bind-address="${NODE_IP}" --advertise-address="${NODE_IP}" --secure-port="${port}" \
    --tls-cert-file="${pki}/apiserver.crt" --tls-private-key-file="${pki}/apiserver.key" \
    --client-ca-file="${pki}/ca.crt" \
    --kubelet-client-certificate="${pki}/apiserver-kubelet-client.crt" \
    --kubelet-client-key="${pki}/apiserver-kubelet-client.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="${pki}/sa.pub" \
    --service-account-signing-key-file="${pki}/sa.key" \
    --kubelet-preferred-address-types=InternalIP \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range="${SERVICE_CIDR}" --allow-privileged=true \
    --cert-dir="${STATE}/apiserver-certs"
  wait_for kube-apiserver "kube-apiserver /readyz" api /readyz
}

start_controllers() {
  local pki="${STATE}/pki"
  write_kubeconfig "${STATE}/controller-manager.kubeconfig" controller-manager
  write_kubeconfig "${STATE}/scheduler.kubeconfig" scheduler
  write_kubeconfig "${STATE}/proxy.kubeconfig" proxy
  spawn kube-controller-manager "${ASSETS}/kube-controller-manager" \
    --kubeconfig="${STATE}/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$(free_port)" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="${pki}/sa.key" \
    --root-ca-file="${pki}/ca.crt" \
    --service-cluster-ip-range="${SERVICE_CIDR}"
  spawn kube-scheduler "${ASSETS}/kube-scheduler" \
    --kubeconfig="${STATE}/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$(free_port)" --leader-elect=false
  # iptables mode; localhost NodePorts off (they need route_localnet), the
  # conntrack limits left as they are.
  spawn kube-proxy "${ASSETS}/kube-proxy" \
    --kubeconfig="${STATE}/proxy.kubeconfig" --hostname-override="${NODE}" \
    --proxy-mode=iptables --cluster-cidr="${POD_CIDR}" \
    --iptables-localhost-nodeports=false --nodeport-addresses=primary \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 \
    --conntrack-tcp-timeout-close-wait=0 \
    --metrics-bind-address="127.0.0.1:$(free_port)" \
    --healthz-bind-address="127.0.0.1:$(free_port)"
}

# Cluster DNS: the Services' names (refreshed by write_dns_hosts), nothing
# forwarded anywhere.
start_dns() {
  mkdir -p "${STATE}/dns"
  write_dns_hosts
  spawn dnsmasq dnsmasq --keep-in-foreground --log-facility=- \
    --listen-address="${NODE_IP}" --bind-interfaces --port=53 \
    --no-resolv --no-hosts --no-poll --hostsdir="${STATE}/dns" \
    --local="/${CLUSTER_DOMAIN}/" --log-queries --pid-file="${STATE}/dnsmasq.real.pid" \
    --user=root
}

write_dns_hosts() {
  local out="${STATE}/dns/.services.new" lines=""
  if [[ -f "${STATE}/kubeconfig" ]] && api /readyz >/dev/null 2>&1; then
    lines="$(k get services -A -o jsonpath='{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.'"${CLUSTER_DOMAIN}"'{"\n"}{end}' |
      grep -v '^None ' || true)"
  fi
  printf '%s\n' "${lines}" >"${out}"
  mv "${out}" "${STATE}/dns/services"
}

# ---------------------------------------------------------------- containerd and images

start_containerd() {
  local c="${STATE}/containerd"
  mkdir -p "${c}"
  cat >"${c}/config.toml" <<EOF
version = 2
root = "${c}/root"
state = "${c}/state"
disabled_plugins = ["io.containerd.internal.v1.opt"]
[grpc]
  address = "${c}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_REF}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "${c}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${CNI_BIN}"
    conf_dir = "${STATE}/cni/net.d"
EOF
  # Every image is imported beforehand; a pull would be a bug, and goes to a
  # proxy that is not there instead of a registry.
  spawn containerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    containerd --config "${c}/config.toml"
  wait_for containerd "containerd" ctr_ version
}

ctr_() { ctr --address "${STATE}/containerd/containerd.sock" -n k8s.io "$@"; }

# add_file ROOTFS FILE [DEST]: FILE (dereferenced) at DEST (default: its path).
add_file() {
  local dest="$1${3:-$2}"
  mkdir -p "$(dirname "${dest}")"
  cp -L "$2" "${dest}"
}

# add_elf ROOTFS FILE [DEST]: FILE and every shared library it loads, at the
# paths the dynamic loader finds them on this machine.
add_elf() {
  local root="$1" file="$2" lib missing
  add_file "${root}" "${file}" "${3:-}"
  missing="$(ldd "${file}" 2>/dev/null | grep 'not found' || true)"
  [[ -z "${missing}" ]] || die "${file}: ${missing}"
  while IFS= read -r lib; do
    [[ -z "${lib}" || -e "${root}${lib}" ]] || add_file "${root}" "${lib}"
  done < <(ldd "${file}" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

# pack_image ROOTFS REF USER ENTRYPOINT_JSON CMD_JSON: an OCI image archive of
# one uncompressed layer, imported into containerd's k8s.io namespace as REF.
pack_image() {
  local rootfs="$1" ref="$2" user="$3" entrypoint="$4" cmd="$5"
  local work arch layout blobs layer_digest layer_size config_digest config_size
  local manifest_digest manifest_size
  work="$(mktemp -d "${STATE}/image.XXXXXX")"
  layout="${work}/layout"
  blobs="${layout}/blobs/sha256"
  mkdir -p "${blobs}"
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
  esac
  local top=()
  mapfile -t top < <(cd "${rootfs}" && ls -A)
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "${rootfs}" -cf "${work}/layer.tar" "${top[@]}"
  layer_digest="$(sha256sum "${work}/layer.tar" | cut -d' ' -f1)"
  layer_size="$(stat -c %s "${work}/layer.tar")"
  mv "${work}/layer.tar" "${blobs}/${layer_digest}"
  printf '{"architecture":"%s","os":"linux","config":{"User":"%s","Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":%s,"Cmd":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"hack/realnode.sh"}]}' \
    "${arch}" "${user}" "${entrypoint}" "${cmd}" "${layer_digest}" >"${work}/config.json"
  config_digest="$(sha256sum "${work}/config.json" | cut -d' ' -f1)"
  config_size="$(stat -c %s "${work}/config.json")"
  mv "${work}/config.json" "${blobs}/${config_digest}"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "${config_digest}" "${config_size}" "${layer_digest}" "${layer_size}" >"${work}/manifest.json"
  manifest_digest="$(sha256sum "${work}/manifest.json" | cut -d' ' -f1)"
  manifest_size="$(stat -c %s "${work}/manifest.json")"
  mv "${work}/manifest.json" "${blobs}/${manifest_digest}"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "${manifest_digest}" "${manifest_size}" "${arch}" "${ref}" "${ref##*:}" >"${layout}/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"${layout}/oci-layout"
  tar -C "${layout}" -cf "${work}/image.tar" oci-layout index.json blobs
  local try
  for try in 1 2 3; do
    if ctr_ images import "${work}/image.tar" >"${STATE}/import.log" 2>&1 &&
      ctr_ images ls -q >>"${STATE}/import.log" 2>&1 &&
      grep -qxF "${ref}" "${STATE}/import.log"; then
      break
    fi
    log "import of ${ref} (try ${try}) did not take:"
    cat "${STATE}/import.log" >&2
    ((try < 3)) || die "could not import ${ref} into containerd"
    sleep 1
  done
  log "imported ${ref} ($((layer_size / 1024 / 1024)) MiB layer)"
  rm -rf "${work}"
}

# The common part of every image: root and nonroot (65532) users, /tmp, CA
# certificates when this machine has them.
base_rootfs() {
  local root="$1"
  mkdir -p "${root}/etc" "${root}/tmp" "${root}/usr/local/bin"
  chmod 1777 "${root}/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"${root}/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"${root}/etc/group"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    add_file "${root}" /etc/ssl/certs/ca-certificates.crt
  fi
}

# add_binary ROOTFS BINARY: at /usr/local/bin/, debug info stripped (a debug
# build shrinks to a tenth), with its libraries.
add_binary() {
  local root="$1" bin="$2" dest
  dest="/usr/local/bin/$(basename "${bin}")"
  add_elf "${root}" "${bin}" "${dest}"
  if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "${root}${dest}"
  fi
  chmod 0755 "${root}${dest}"
}

build_images() {
  local bins="$1" root
  # The pod sandbox: `sleep infinity` as the pause process (the runtime kills
  # sandboxes with SIGKILL; nothing else is asked of it).
  root="${STATE}/rootfs/pause"
  base_rootfs "${root}"
  add_elf "${root}" "$(command -v sleep)" /usr/local/bin/sleep
  pack_image "${root}" "${PAUSE_REF}" 65535 '["/usr/local/bin/sleep"]' '["infinity"]'

  root="${STATE}/rootfs/operator"
  base_rootfs "${root}"
  add_binary "${root}" "${bins}/pingmesh-operator"
  pack_image "${root}" "${IMAGE_PREFIX}/pingmesh-operator:${IMAGE_TAG}" 65532:65532 \
    '["/usr/local/bin/pingmesh-operator"]' '["run"]'

  # The agent image carries the verbs providers and their configuration when
  # this machine has them (the real image installs ibverbs-providers).
  root="${STATE}/rootfs/agent"
  base_rootfs "${root}"
  add_binary "${root}" "${bins}/pingmesh-agent"
  local provider
  if [[ -d /etc/libibverbs.d ]]; then
    mkdir -p "${root}/etc/libibverbs.d"
    cp -L /etc/libibverbs.d/* "${root}/etc/libibverbs.d/" 2>/dev/null || true
    for provider in /usr/lib/*-linux-gnu/libibverbs/*.so; do
      [[ -e "${provider}" ]] && add_elf "${root}" "${provider}"
    done
  fi
  pack_image "${root}" "${IMAGE_PREFIX}/pingmesh-agent:${IMAGE_TAG}" 0:0 \
    '["/usr/local/bin/pingmesh-agent"]' '[]'
  rm -rf "${STATE}/rootfs"
}

# ---------------------------------------------------------------- kubelet

start_kubelet() {
  local pki="${STATE}/pki"
  write_kubeconfig "${STATE}/kubelet.kubeconfig" kubelet
  printf 'nameserver %s\n' "${NODE_IP}" >"${STATE}/resolv.conf"
  cat >"${STATE}/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${NODE_IP}
port: $(free_port)
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(free_port)
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: ${pki}/ca.crt
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://${STATE}/containerd/containerd.sock
cgroupDriver: cgroupfs
# cgroup v1 hosts: kubelets from 1.35 refuse them unless told otherwise.
failCgroupV1: false
failSwapOn: false
clusterDNS:
  - ${NODE_IP}
clusterDomain: ${CLUSTER_DOMAIN}
resolvConf: ${STATE}/resolv.conf
podLogsDir: ${STATE}/pod-logs
maxPods: 30
serializeImagePulls: false
# The imported images are all there is: never garbage-collect them, and do
# not evict on a developer machine's fuller disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  imagefs.available: 1%
EOF
  spawn kubelet "${ASSETS}/kubelet" \
    --config="${STATE}/kubelet.yaml" --kubeconfig="${STATE}/kubelet.kubeconfig" \
    --root-dir="${STATE}/kubelet" --cert-dir="${STATE}/kubelet/pki" --hostname-override="${NODE}" --node-ip="${NODE_IP}"
  wait_for kubelet "node ${NODE} to turn Ready" node_ready
}

node_ready() {
  [[ "$(k get node "${NODE}" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}

# ---------------------------------------------------------------- the chart

helm_bin() {
  "${ROOT}/hack/envtest.sh" helm
}

# Some API server builds add ConfigMaps of their own to the service account
# token volume (OpenShift's fork of Kubernetes: openshift-service-ca.crt);
# create any the namespace lacks, with the cluster CA, so the kubelet can
# mount the volume.
ensure_token_volume_configmaps() {
  local ns="$1" name key keys
  local probe='{"apiVersion":"v1","kind":"Pod","metadata":{"name":"realnode-probe"},"spec":{"containers":[{"name":"c","image":"'"${PAUSE_REF}"'"}]}}'
  while IFS=' ' read -r name keys; do
    [[ -n "${name}" ]] || continue
    k get configmap -n "${ns}" "${name}" >/dev/null 2>&1 && continue
    local args=()
    for key in ${keys}; do
      args+=("--from-file=${key}=${STATE}/pki/ca.crt")
    done
    log "creating ConfigMap ${ns}/${name} (${keys}) that this API server's token volumes name"
    k create configmap -n "${ns}" "${name}" "${args[@]}" >/dev/null
  done < <(printf '%s' "${probe}" | k create -n "${ns}" --dry-run=server -f - \
    -o jsonpath='{range .spec.volumes[*].projected.sources[*]}{.configMap.name} {range .configMap.items[*]}{.key} {end}{"\n"}{end}')
}

# A hostPath PersistentVolume for the chart's registry claim (the default
# values: SQLite on a ReadWriteOnce PVC); no provisioner runs here. hostPath
# volumes ignore fsGroup, so the directory belongs to the operator's uid.
create_registry_volume() {
  local dir="${STATE}/volumes/registry"
  mkdir -p "${dir}"
  chown 65532:65532 "${dir}"
  chmod 0770 "${dir}"
  k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pingmesh-realnode-registry
spec:
  capacity:
    storage: 1Gi
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath:
    path: ${dir}
    type: Directory
EOF
}

install_chart() {
  local helm
  helm="$(helm_bin)"
  k create namespace "${NAMESPACE}" >/dev/null
  k label namespace "${NAMESPACE}" pod-security.kubernetes.io/enforce=privileged --overwrite >/dev/null
  # The controller-manager makes the default ServiceAccount and the
  # kube-root-ca.crt ConfigMap of each namespace.
  wait_for - "ServiceAccount ${NAMESPACE}/default" k get serviceaccount -n "${NAMESPACE}" default
  wait_for - "ConfigMap ${NAMESPACE}/kube-root-ca.crt" k get configmap -n "${NAMESPACE}" kube-root-ca.crt
  ensure_token_volume_configmaps "${NAMESPACE}"
  create_registry_volume
  KUBECONFIG="${STATE}/kubeconfig" "${helm}" install "${RELEASE}" "${ROOT}/charts/pingmesh" \
    --namespace "${NAMESPACE}" \
    --set "operator.image.repository=${IMAGE_PREFIX}/pingmesh-operator" \
    --set "operator.image.tag=${IMAGE_TAG}" \
    --set operator.image.pullPolicy=Never \
    --set operator.grpcTls.mode=disabled --set operator.agentAuth.enabled=false \
    --set operator.apiAuth.enabled=false >"${STATE}/helm-install.log" 2>&1 ||
    {
      cat "${STATE}/helm-install.log" >&2
      die "helm install failed"
    }
  if grep -qi 'warning' "${STATE}/helm-install.log"; then
    log "helm install printed warnings:"
    grep -i 'warning' "${STATE}/helm-install.log" >&2
  fi
  write_dns_hosts
}

apply_mesh() {
  local ref="${IMAGE_PREFIX}/pingmesh-agent:${IMAGE_TAG}" manifest="${STATE}/pingmesh.yaml"
  sed -E -e "s#^([[:space:]]+image:)[[:space:]].*#\\1 ${ref}#" \
    -e 's#^([[:space:]]+imagePullPolicy:)[[:space:]].*#\1 Never#' \
    "${ROOT}/pingmesh.yaml" >"${manifest}"
  [[ "$(grep -c "image: ${ref}\$" "${manifest}")" == 1 && "$(grep -c 'imagePullPolicy: Never$' "${manifest}")" == 1 ]] ||
    die "pingmesh.yaml no longer has exactly one agent image and imagePullPolicy line to point at ${ref}"
  k apply -f "${manifest}" 2>"${STATE}/apply.err" >/dev/null || {
    cat "${STATE}/apply.err" >&2
    die "kubectl apply -f pingmesh.yaml failed"
  }
  if [[ -s "${STATE}/apply.err" ]]; then
    log "kubectl apply -f pingmesh.yaml printed:"
    cat "${STATE}/apply.err" >&2
  fi
}

operator_service_ip() {
  k get service -n "${NAMESPACE}" "${OPERATOR}" -o jsonpath='{.spec.clusterIP}'
}

# A second agent, a process on the host, registered through the operator's
# Service like the pod, under the same ToR: the pod's agent probes it.
start_peer() {
  local bins="$1" ip port
  ip="$(operator_service_ip)"
  port="$(free_port)"
  spawn peer-agent "${bins}/pingmesh-agent" --node "${PEER_NODE}" --tor "${TOR}" \
    --transport udp --controller "http://${ip}:9400" --insecure-plaintext \
    --udp-bind "${NODE_IP}:${port}" --metrics-addr "127.0.0.1:$(free_port)" \
    --log-format plain
}

# ---------------------------------------------------------------- commands

cmd_up() {
  preflight
  [[ ! -e "${STATE}" ]] || die "${STATE} exists: a cluster is up (hack/realnode.sh down first)"
  ! ip link show "${BRIDGE}" >/dev/null 2>&1 || die "bridge ${BRIDGE} exists: a cluster is up (hack/realnode.sh down first)"
  ! iptables -t nat -S KUBE-SERVICES >/dev/null 2>&1 ||
    die "iptables has a KUBE-SERVICES chain: another kube-proxy runs on this machine, or left its rules (kube-proxy --cleanup)"
  local port
  for port in "${AGENT_METRICS_PORT}" "${AGENT_UDP_PORT}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
      die "port ${port} is in use: the agent pod (host network) needs it"
    fi
  done
  local bins
  bins="$(binaries_dir)"
  mkdir -p "${STATE}"
  : >"${STATE}/timings"
  local start=${SECONDS}
  log "state in ${STATE}; binaries from ${bins}; Kubernetes from ${ASSETS}"
  save_host_settings
  phase "certificates, bridge ${BRIDGE} (${NODE_IP})"
  make_pki
  setup_bridge
  write_cni_config
  phase "etcd and kube-apiserver"
  retry3 start_etcd || die "etcd did not start"
  retry3 start_apiserver || die "kube-apiserver did not start"
  write_kubeconfig "${STATE}/kubeconfig" admin
  phase "controller-manager, scheduler, kube-proxy, DNS, containerd"
  start_controllers
  start_dns
  start_containerd
  phase "images (pause, operator, agent) into containerd"
  build_images "${bins}"
  phase "kubelet, node Ready"
  start_kubelet
  k label node "${NODE}" "topology.pingmesh.io/tor=${TOR}" --overwrite >/dev/null
  phase "helm install"
  install_chart
  phase "kubectl apply -f pingmesh.yaml"
  apply_mesh
  if [[ "${PINGMESH_REALNODE_PEER:-1}" != 0 ]]; then
    start_peer "${bins}"
  fi
  phase ""
  log "up in $((SECONDS - start))s:"
  sed 's/^/  /' "${STATE}/timings" >&2
  log "kubectl: eval \"\$(hack/realnode.sh env)\"; checks: hack/realnode.sh check; stop: hack/realnode.sh down"
}

find_kubectl() {
  if [[ -x "${KUBEBUILDER_ASSETS:-}/kubectl" ]]; then
    KUBECTL="${KUBEBUILDER_ASSETS}/kubectl"
  else
    KUBECTL="$(command -v kubectl)"
  fi
}

require_up() {
  [[ -f "${STATE}/kubeconfig" ]] || die "no cluster is up (hack/realnode.sh up)"
  find_kubectl || die "kubectl is needed (in KUBEBUILDER_ASSETS or on PATH)"
}

passed=()
failed=()
pass() {
  passed+=("$*")
  log "PASS: $*"
}
fail() {
  failed+=("$*")
  log "FAIL: $*"
}

# Seconds from RFC 3339 timestamp $1 to $2.
span() { echo $(($(date -d "$2" +%s) - $(date -d "$1" +%s))); }

operator_pod() {
  k get pods -n "${NAMESPACE}" -l "app.kubernetes.io/component=operator,app.kubernetes.io/instance=${RELEASE}" \
    -o jsonpath='{.items[0].metadata.name}'
}
agent_pod() {
  k get pods -n "${NAMESPACE}" -l app.kubernetes.io/name=pingmesh-agent \
    --field-selector "spec.nodeName=${NODE}" -o jsonpath='{.items[0].metadata.name}'
}
pod_ready() {
  [[ "$(k get pod -n "${NAMESPACE}" "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" == True ]]
}
pod_ready_after() {
  local created ready
  created="$(k get pod -n "${NAMESPACE}" "$1" -o jsonpath='{.metadata.creationTimestamp}')"
  ready="$(k get pod -n "${NAMESPACE}" "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')"
  span "${created}" "${ready}"
}
endpoint_ready() {
  [[ "$(k get endpointslices -n "${NAMESPACE}" -l "kubernetes.io/service-name=${OPERATOR}" \
    -o jsonpath='{.items[*].endpoints[?(@.conditions.ready==true)].addresses[0]}')" == *.* ]]
}
registered() {
  curl -fsS --max-time 3 "http://$1:9401/api/v1/agents" | grep -q "\"$2\""
}
mesh_available() {
  [[ "$(k get pingmesh -n "${NAMESPACE}" "${MESH}" -o jsonpath='{.status.conditions[?(@.type=="Available")].status}')" == True ]]
}
metric_positive() {
  # metric_positive URL SERIES_REGEX: some sample of the series is > 0.
  curl -fsS --max-time 3 "$1" | awk -v re="$2" '$0 !~ /^#/ && $1 ~ re && $2 + 0 > 0 {found = 1} END {exit !found}'
}

check_metrics() {
  local what="$1" url="$2" file="${STATE}/$3"
  if ! curl -fsS --max-time 5 "${url}" >"${file}"; then
    fail "${what}: ${url} answered no metrics"
    return
  fi
  if command -v promtool >/dev/null 2>&1; then
    local out
    if out="$(promtool check metrics <"${file}" 2>&1)"; then
      pass "${what}: ${url} scraped ($(grep -vc '^#' "${file}") samples), promtool check metrics clean"
    else
      fail "${what}: promtool check metrics: ${out}"
    fi
  else
    pass "${what}: ${url} scraped ($(grep -vc '^#' "${file}") samples; promtool not installed, format not checked)"
  fi
}

diagnostics() {
  log "--- diagnostics"
  k get nodes -o wide >&2 || true
  k get pods -A -o wide >&2 || true
  k get pingmesh -A >&2 || true
  k get events -n "${NAMESPACE}" --sort-by=.lastTimestamp >&2 || true
  local pod
  pod="$(operator_pod 2>/dev/null || true)"
  [[ -z "${pod}" ]] || {
    log "--- operator log (last 30 lines)"
    k logs -n "${NAMESPACE}" "${pod}" --tail=30 >&2 || true
  }
  pod="$(agent_pod 2>/dev/null || true)"
  [[ -z "${pod}" ]] || {
    log "--- agent log (last 30 lines)"
    k logs -n "${NAMESPACE}" "${pod}" --tail=30 >&2 || true
  }
}

mesh_patch() {
  k patch pingmesh -n "${NAMESPACE}" "${MESH}" --type merge -p "$1" >/dev/null
}
agent_replaced() {
  local now
  now="$(agent_pod)"
  [[ -n "${now}" && "${now}" != "$1" ]] && pod_ready "${now}"
}
agent_session() {
  curl -fsS --max-time 3 "http://$1:9401/api/v1/agents" | tr '{' '\n' | grep "\"${NODE}\"" | grep -o '"session":[0-9]*' | head -1
}
session_changed() {
  local now
  now="$(agent_session "$1")"
  [[ -n "${now}" && "${now}" != "$2" ]]
}

# An agent setting carried by the ConfigMap (transport: udp, which also runs
# the agent as non-root without capabilities) changes the pod template's
# config hash: the DaemonSet controller replaces the pod, and the new agent
# registers again.
check_rollout() {
  local ip="$1" old="$2" hash session
  [[ -n "${old}" ]] || return 0
  hash="$(k get daemonset -n "${NAMESPACE}" "${MESH}-agent" -o jsonpath='{.spec.template.metadata.annotations.pingmesh\.io/config-hash}')"
  session="$(agent_session "${ip}")"
  mesh_patch '{"spec":{"transport":"udp"}}'
  if wait_for - "a new agent pod after an agent setting changed" agent_replaced "${old}" &&
    wait_for - "the new agent to register" session_changed "${ip}" "${session}"; then
    local now new_hash uid
    now="$(agent_pod)"
    new_hash="$(k get daemonset -n "${NAMESPACE}" "${MESH}-agent" -o jsonpath='{.spec.template.metadata.annotations.pingmesh\.io/config-hash}')"
    uid="$(k get pod -n "${NAMESPACE}" "${now}" -o jsonpath='{.spec.securityContext.runAsUser}{.spec.containers[0].securityContext.runAsUser}')"
    if [[ "${new_hash}" != "${hash}" ]]; then
      pass "transport udp: config hash ${hash} -> ${new_hash}, pod ${old} replaced by ${now} (uid ${uid:-unset}), registered again"
    else
      fail "transport udp: pod replaced, but the config hash stayed ${hash}"
    fi
  else
    fail "transport udp: no new agent pod registered (pod $(agent_pod))"
  fi
}

node_condition() {
  k get node "${NODE}" -o jsonpath='{.status.conditions[?(@.type=="RdmaNetworkHealthy")].status}'
}
condition_is() { [[ "$(node_condition)" == "$1" ]]; }

check_node_condition() {
  mesh_patch '{"spec":{"nodeHealth":{"conditions":true}}}'
  if wait_for - "condition RdmaNetworkHealthy=True on ${NODE}" condition_is True; then
    pass "spec.nodeHealth.conditions on: ${NODE} has RdmaNetworkHealthy=True ($(k get node "${NODE}" -o jsonpath='{.status.conditions[?(@.type=="RdmaNetworkHealthy")].reason}'))"
  else
    fail "no RdmaNetworkHealthy=True on ${NODE} (now: '$(node_condition)')"
  fi
  mesh_patch '{"spec":{"nodeHealth":{"conditions":false}}}'
  if wait_for - "condition RdmaNetworkHealthy removed from ${NODE}" condition_is ""; then
    pass "spec.nodeHealth.conditions off: the condition is gone from ${NODE}"
  else
    fail "RdmaNetworkHealthy still on ${NODE} after conditions were turned off"
  fi
}

owned_gone() {
  ! k get daemonset -n "${NAMESPACE}" "${MESH}-agent" >/dev/null 2>&1 &&
    ! k get configmap -n "${NAMESPACE}" "${MESH}-agent" >/dev/null 2>&1 &&
    [[ -z "$(agent_pod)" ]]
}

# Deleting the PingMesh garbage-collects its DaemonSet, ConfigMap and agent
# pod; pingmesh.yaml is applied again afterwards.
check_garbage_collection() {
  k delete pingmesh -n "${NAMESPACE}" "${MESH}" --wait=false >/dev/null
  if wait_for - "DaemonSet, ConfigMap and agent pod of the deleted PingMesh to go" owned_gone; then
    pass "PingMesh deleted: its DaemonSet, ConfigMap and agent pod were garbage-collected"
  else
    fail "PingMesh deleted, but its owned objects stay: $(k get daemonset,configmap,pods -n "${NAMESPACE}" -o name | tr '\n' ' ')"
  fi
  apply_mesh
  if wait_for - "the agent pod of the re-applied PingMesh" agent_pod &&
    wait_for - "agent pod Ready" pod_ready "$(agent_pod)"; then
    pass "pingmesh.yaml applied again: agent pod $(agent_pod) Ready"
  else
    fail "pingmesh.yaml applied again, but no agent pod turned Ready"
  fi
}

cmd_check() {
  require_up
  write_dns_hosts
  local start=${SECONDS} pod ip agent
  ip="$(operator_service_ip)"

  # (a) The operator turns Ready and the Service gets a ready endpoint.
  if wait_for - "an operator pod" operator_pod && pod="$(operator_pod)" &&
    wait_for - "operator pod ${pod} Ready" pod_ready "${pod}"; then
    pass "operator pod ${pod} Ready $(pod_ready_after "${pod}")s after it was created"
  else
    fail "operator pod never turned Ready"
  fi
  if wait_for - "a ready endpoint of Service ${OPERATOR}" endpoint_ready; then
    pass "Service ${OPERATOR} has a ready endpoint"
  else
    fail "Service ${OPERATOR} has no ready endpoint"
  fi
  if curl -fsS --max-time 3 "http://${ip}:9401/readyz" >/dev/null; then
    pass "/readyz 200 through the Service (${ip}:9401)"
  else
    fail "/readyz through the Service (${ip}:9401) did not answer 200"
  fi
  if [[ -z "${pod:-}" ]]; then
    fail "no operator pod to read the log of"
  elif ! k logs -n "${NAMESPACE}" "${pod}" >"${STATE}/operator-pod.log" 2>&1; then
    fail "kubectl logs ${pod}: $(tail -n 1 "${STATE}/operator-pod.log")"
  elif grep -qi 'forbidden' "${STATE}/operator-pod.log"; then
    fail "operator log has RBAC denials: $(grep -i -m3 'forbidden' "${STATE}/operator-pod.log")"
  else
    pass "operator log (kubectl logs, through the kubelet) has no RBAC denial"
  fi

  # (b) The agent pod runs and registers through the Service (by its name,
  # resolved by the cluster DNS from the host network).
  if wait_for - "the agent pod on ${NODE}" agent_pod && agent="$(agent_pod)" &&
    wait_for - "agent pod ${agent} Ready" pod_ready "${agent}"; then
    pass "agent pod ${agent} Ready $(pod_ready_after "${agent}")s after it was created"
  else
    fail "no Ready agent pod on ${NODE}"
  fi
  if wait_for - "agent ${NODE} in /api/v1/agents" registered "${ip}" "${NODE}"; then
    pass "agent ${NODE} registered with the mesh controller (/api/v1/agents through the Service)"
  else
    fail "agent ${NODE} not in /api/v1/agents"
  fi
  if [[ -f "${STATE}/peer-agent.pid" ]]; then
    if wait_for - "agent ${PEER_NODE} in /api/v1/agents" registered "${ip}" "${PEER_NODE}"; then
      pass "host agent ${PEER_NODE} registered through the Service's ClusterIP"
    else
      fail "host agent ${PEER_NODE} not in /api/v1/agents"
    fi
  fi
  if wait_for - "PingMesh ${MESH} Available" mesh_available; then
    pass "PingMesh ${MESH}: $(k get pingmesh -n "${NAMESPACE}" "${MESH}" --no-headers | tr -s ' ')"
  else
    fail "PingMesh ${MESH} not Available: $(k get pingmesh -n "${NAMESPACE}" "${MESH}" -o jsonpath='{.status}')"
  fi
  if [[ -z "${agent:-}" ]]; then
    fail "no agent pod to read the log of"
  elif ! k logs -n "${NAMESPACE}" "${agent}" >"${STATE}/agent-pod.log" 2>&1; then
    fail "kubectl logs ${agent}: $(tail -n 1 "${STATE}/agent-pod.log")"
  elif grep -q $'\e\\[' "${STATE}/agent-pod.log"; then
    fail "agent log has colour escapes"
  else
    pass "agent log has no colour escapes"
  fi

  # (c) Metrics: the agent's on the node address, the operator's through the
  # Service; with the peer, probes answered both ways.
  check_metrics "agent metrics" "http://${NODE_IP}:${AGENT_METRICS_PORT}/metrics" agent.metrics
  check_metrics "operator metrics" "http://${ip}:9401/metrics" operator.metrics
  if wait_for - "pingmesh_controller_connected 1 on the agent" \
    metric_positive "http://${NODE_IP}:${AGENT_METRICS_PORT}/metrics" '^pingmesh_controller_connected(\\{|$)'; then
    pass "agent: pingmesh_controller_connected 1"
  else
    fail "agent: pingmesh_controller_connected is not 1"
  fi
  if [[ -f "${STATE}/peer-agent.pid" ]]; then
    if wait_for - "probes answered on the agent pod" \
      metric_positive "http://${NODE_IP}:${AGENT_METRICS_PORT}/metrics" '^pingmesh_probes_total\\{.*result="ok"'; then
      pass "agent pod probed its peer: $(curl -fsS "http://${NODE_IP}:${AGENT_METRICS_PORT}/metrics" | grep '^pingmesh_probes_total{.*result="ok"' | head -1)"
    else
      fail "agent pod: no pingmesh_probes_total{result=\"ok\"}"
    fi
    if wait_for - "a judged window on the operator" \
      metric_positive "http://${ip}:9401/metrics" '^pingmesh_controller_windows_evaluated_total(\\{|$)'; then
      pass "operator judged windows: $(curl -fsS "http://${ip}:9401/metrics" | grep -E '^pingmesh_(controller_windows_evaluated_total|tor_pair_loss_ratio)' | tr '\n' ' ')"
    else
      fail "operator: no window evaluated"
    fi
  fi

  # What only a controller-manager and a kubelet do: a rollout on an agent
  # setting, the Node condition, garbage collection of a deleted PingMesh.
  check_rollout "${ip}" "${agent:-}"
  check_node_condition
  check_garbage_collection

  log "checks took $((SECONDS - start))s"
  if ((${#failed[@]})); then
    diagnostics
    printf '\nFAILED (%d of %d):\n' "${#failed[@]}" "$((${#failed[@]} + ${#passed[@]}))" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    return 1
  fi
  printf '\nall %d real-node checks passed\n' "${#passed[@]}" >&2
}

cmd_env() {
  [[ -f "${STATE}/kubeconfig" ]] || die "no cluster is up (hack/realnode.sh up)"
  printf 'export KUBECONFIG=%q\n' "${STATE}/kubeconfig"
}

# Pods go first, through the API (the kubelet tears their sandboxes and
# networks down); then the processes; then whatever a failed run left.
cmd_down() {
  [[ "$(id -u)" == 0 ]] || die "run as root"
  if [[ ! -d "${STATE}" ]]; then
    log "nothing is up (${STATE} does not exist)"
    ip link del "${BRIDGE}" 2>/dev/null || true
    return 0
  fi
  [[ -f "${STATE}/timings" ]] || die "${STATE} was not made by hack/realnode.sh up"
  find_kubectl || KUBECTL=""
  stop_proc peer-agent
  if [[ -n "${KUBECTL}" && -f "${STATE}/kubeconfig" ]] && alive kube-apiserver && alive kubelet; then
    log "deleting the PingMesh, the release and the namespace"
    k delete pingmesh --all -n "${NAMESPACE}" --wait=false >/dev/null 2>&1 || true
    k delete namespace "${NAMESPACE}" --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)) && [[ -n "$(k get pods -A --field-selector "spec.nodeName=${NODE}" -o name 2>/dev/null)" ]]; do
      sleep 1
    done
    log "pods gone after ${SECONDS}s"
  fi
  stop_proc kubelet
  log "kubelet stopped after ${SECONDS}s"
  if alive containerd; then
    local id
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -s SIGKILL "${id}" >/dev/null 2>&1 || true
    done
    sleep 1
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks delete -f "${id}" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      ctr_ containers delete "${id}" >/dev/null 2>&1 || true
    done
  fi
  local name
  for name in containerd kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd dnsmasq; do
    stop_proc "${name}"
    log "${name} stopped after ${SECONDS}s"
  done
  # Shims of this containerd (its socket path is in their command line).
  local pid
  for pid in $(pgrep -f -- "-address ${STATE}/containerd/containerd.sock" || true); do
    kill -KILL "${pid}" 2>/dev/null || true
  done
  remove_new_chains
  # Mounts under the state directory (volumes, container root file systems).
  local mnt
  while IFS= read -r mnt; do
    umount "${mnt}" 2>/dev/null || umount -l "${mnt}" 2>/dev/null || log "could not unmount ${mnt}"
  done < <(awk -v s="${STATE}/" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r)
  # Network namespaces of pods whose sandboxes were not torn down.
  local ns
  for ns in /var/run/netns/cni-*; do
    [[ -e "${ns}" ]] || continue
    ns="${ns##*/}"
    grep -qxF "${ns}" "${STATE}/netns-before" 2>/dev/null && continue
    if [[ -z "$(ip netns pids "${ns}" 2>/dev/null)" ]]; then
      ip netns delete "${ns}" 2>/dev/null || true
    fi
  done
  ip link del "${BRIDGE}" 2>/dev/null || true
  remove_host_leftovers
  restore_host_settings
  rm -rf "${STATE}"
  log "down; removed ${STATE}"
}

# Each step in a process of its own, so that a step that dies still gets `down`.
cmd_run() {
  local self="${ROOT}/hack/realnode.sh" rc=0
  [[ ! -e "${STATE}" ]] || die "${STATE} exists: a cluster is up (hack/realnode.sh down first)"
  if ! "${self}" up; then
    rc=1
  elif ! "${self}" check; then
    rc=1
  fi
  if [[ -n "${PINGMESH_REALNODE_KEEP:-}" ]]; then
    log "PINGMESH_REALNODE_KEEP: left up; hack/realnode.sh down when done"
  else
    if ((rc)) && [[ -d "${STATE}" ]]; then
      local logs
      logs="$(mktemp -d "${TMPDIR:-/tmp}/pingmesh-realnode-logs.XXXXXX")"
      cp "${STATE}"/*.log "${logs}/" 2>/dev/null || true
      cp -r "${STATE}/pod-logs" "${logs}/" 2>/dev/null || true
      log "logs of the failed run kept in ${logs}"
    fi
    "${self}" down
  fi
  return "${rc}"
}

cd "${ROOT}"
case "${1:-}" in
  up) cmd_up ;;
  check) cmd_check ;;
  down) cmd_down ;;
  run) cmd_run ;;
  env) cmd_env ;;
  *) usage ;;
esac
