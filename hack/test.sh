#!/usr/bin/env bash
# The project's whole test suite, as CI runs it: formatting, lints (the Linux
# build and the --no-default-features build that stands in for macOS), unit and
# integration tests, the registry suite against a real 3-node rqlite cluster,
# and the multi-process end-to-end tests (iptables fault injection needs root).
# With KUBEBUILDER_ASSETS set (a folder holding kube-apiserver and etcd) also
# the envtest tier: the operator against a real API server (hack/envtest.sh).
#
# Usage: hack/test.sh            everything this machine can run
#        SKIP_LINT=1 hack/test.sh   tests only
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }
skipped=()
# Tiers and #[ignore]d tests that need hardware or binaries CI does not have:
# listed with the command that runs them, never a CI failure. Every ignored
# test this script does not run is named here or in `skipped`.
not_run=()

# Installs the system packages the suite needs (as root on Debian/Ubuntu),
# or stops here with the command to run.
hack/deps.sh

if [[ -z "${SKIP_LINT:-}" ]]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy (default features)"
  cargo clippy --workspace --all-targets --locked -- -D warnings
  step "cargo clippy (--no-default-features, the macOS build)"
  cargo clippy --workspace --all-targets --locked --no-default-features -- -D warnings
  step "cargo clippy (the agent's macOS timestamping path, compiled on Linux)"
  cargo clippy -p pingmesh-agent --all-targets --locked --no-default-features \
    --features portable-timestamps -- -D warnings
fi

step "Kubernetes manifests, dashboards, alerts, Tiltfile (offline)"
hack/validate-manifests.sh

step "cargo test (default features)"
cargo test --workspace --locked

step "cargo test (--no-default-features, the macOS build)"
cargo test --workspace --locked --no-default-features

step "cargo test (the agent with the timestamping and transport code macOS runs)"
cargo test -p pingmesh-agent --locked --no-default-features --features portable-timestamps

step "registry suite against a real 3-node rqlite cluster"
if hack/rqlite.sh start 3; then
  trap 'hack/rqlite.sh stop >/dev/null 2>&1 || true' EXIT
  PINGMESH_TEST_RQLITE_URL="$(hack/rqlite.sh url)" \
  PINGMESH_RQLITED="$(hack/rqlite.sh bin)" \
    cargo test -p pingmesh-operator --locked --test registry -- --include-ignored
  hack/rqlite.sh stop
  trap - EXIT
else
  skipped+=("rqlite registry suite (rqlited could not be installed or started)")
fi

step "end-to-end: controller and agents as separate processes"
cargo build --workspace --bins --locked
e2e_env=(PINGMESH_E2E=1)
if command -v promtool >/dev/null; then
  e2e_env+=(PINGMESH_PROMTOOL="$(command -v promtool)")
else
  skipped+=("promtool check metrics (install Debian's prometheus package)")
fi
if [[ "$(id -u)" == 0 ]] && command -v iptables >/dev/null; then
  e2e_env+=(PINGMESH_E2E_IPTABLES=1)
else
  skipped+=("iptables fault injection (needs root and iptables)")
fi
not_run+=("RDMA e2e mesh (e2e/tests/rdma_mesh.rs) and the RDMA transport on a device (node-agent/tests/rdma_hardware.rs): need an RDMA device (no RDMA stack here); on a host with one, or soft-RoCE: sudo hack/softroce.sh, or PINGMESH_RDMA_DEVICE=rxe0 cargo test -p pingmesh-agent --test rdma_hardware -- --ignored --test-threads=1 and PINGMESH_RDMA_DEVICE=rxe0 cargo test -p pingmesh-e2e --test rdma_mesh -- --ignored")
not_run+=("UDP TX-timestamp keys across a firewall drop (node-agent/src/transport/udp.rs, a_firewall_drop_keeps_keys_matched*): need root and nft (Debian nftables) in a private network namespace; the command is in the doc comment of firewall_drop_keeps_keys_matched")
env "${e2e_env[@]}" cargo test -p pingmesh-e2e --locked --test mesh -- --include-ignored --test-threads=1

step "chaos suite: rqlite leader loss, controller SIGKILL and partition, agent churn (memory back to its baseline), registry disk full"
if [[ "$(id -u)" == 0 ]] && command -v iptables >/dev/null && command -v sqlite3 >/dev/null && ip netns list >/dev/null 2>&1; then
  # A 30 s partition instead of the full 120 s (docs/chaos.md has a full-length run's figures).
  PINGMESH_CHAOS_PARTITION_SECS=30 hack/chaos.sh
else
  skipped+=("chaos suite (needs root, iptables, sqlite3 and network namespaces): sudo hack/chaos.sh")
fi

step "fleet simulator smoke run: 50 nodes, 3 windows against a real controller"
target/debug/pingmesh-fleet-sim --endpoints 400 --window-ms 1000 --windows 3 --check

step "web view in a real browser (Debian chromium, playwright-core)"
hack/web-test.sh

step "fuzzing: every fuzz target 20 s from its committed corpus, regressions replayed first (hack/fuzz.sh)"
FUZZ_SECONDS=20 hack/fuzz.sh

step "HTTP API fuzzing: schemathesis from /api/v1/openapi.json against a live demo (hack/api-fuzz.sh)"
hack/api-fuzz.sh

step "end-to-end: fault localization on a leaf-spine fabric of network namespaces"
if [[ "$(id -u)" == 0 ]] && command -v iptables >/dev/null && ip netns list >/dev/null 2>&1; then
  # Same-5-tuple path traces through a real Linux router (raw sockets, ICMP).
  PINGMESH_NETNS_TESTS=1 cargo test -p pingmesh-agent --locked --test path_trace -- --include-ignored --test-threads=1
  PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --locked --test fabric -- --include-ignored --test-threads=1
  # Service awareness on the same fabric: services hit by a fault, ranked.
  PINGMESH_E2E_FABRIC=1 cargo test -p pingmesh-e2e --locked --test services -- --include-ignored --test-threads=1
else
  skipped+=("leaf-spine fabric e2e, path traces and service impact (need root, iptables and network namespaces: hack/fabric.sh)")
fi

step "eBPF tracer: the real BPF programs in this machine's kernel"
if [[ "$(id -u)" == 0 ]]; then
  # The tracepoint attaches through tracefs, which is not always mounted.
  mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || true
  PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --locked --test tracer_bpf -- --include-ignored
  # The flow table fed by the real programs: TCP between namespaces, fake verbs, pod attribution.
  PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --locked --test service_flows_bpf -- --include-ignored --test-threads 1
  # ib_core kernel hooks: the off path, the verifier, field decoding, the lost counter.
  PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --locked --test ib_core_bpf -- --include-ignored --test-threads 1
else
  skipped+=("eBPF tracer tests (need root: PINGMESH_BPF_TESTS=1 cargo test -p pingmesh-agent --test tracer_bpf -- --include-ignored, docs/tracing.md)")
fi

# The ib_core kprobe/fentry hooks attaching for real need a kernel that allows
# kprobes or fentry and has rdma_rxe; CI's and this suite's machines do not.
not_run+=("ib_core kernel hooks attached for real (needs kprobes or fentry and rdma_rxe), as root: PINGMESH_BPF_TESTS=1 PINGMESH_IB_CORE_TESTS=1 cargo test -p pingmesh-agent --test ib_core_bpf -- --include-ignored --test-threads 1 kernel_hooks_see (docs/tracing.md)")

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  step "envtest: the operator against a real API server (KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS})"
  hack/envtest.sh check
  cargo test -p pingmesh-e2e --locked --test envtest -- --include-ignored
else
  not_run+=("envtest tier, the operator against a real kube-apiserver and etcd: set KUBEBUILDER_ASSETS to a folder holding them (docs/kubernetes.md, \"Envtest\")")
fi

# The real-node tier (hack/realnode.sh) needs root, containerd and the node
# binaries, and changes this machine's network settings while it runs: never
# run from here, only named.
realnode_assets=1
for bin in kube-apiserver etcd kube-controller-manager kube-scheduler kube-proxy kubelet; do
  [[ -x "${KUBEBUILDER_ASSETS:-}/${bin}" ]] || realnode_assets=0
done
if ((realnode_assets)); then
  not_run+=("real-node tier, a one-node cluster with a kubelet and containerd: run it yourself, as root: hack/realnode.sh run (docs/kubernetes.md, \"Real-node tier\")")
else
  not_run+=("real-node tier, a one-node cluster with a kubelet and containerd: KUBEBUILDER_ASSETS must also hold kubelet, kube-scheduler, kube-controller-manager and kube-proxy; then, as root: hack/realnode.sh run (docs/kubernetes.md, \"Real-node tier\")")
fi

if [[ -n "${PINGMESH_E2E_KIND:-}" ]]; then
  step "end-to-end on kind (real cluster; needs docker, kind, kubectl, helm)"
  hack/e2e-kind.sh
else
  not_run+=("end-to-end on kind, a real cluster: needs docker, kind, kubectl and helm; PINGMESH_E2E_KIND=1 hack/test.sh, or hack/e2e-kind.sh")
fi

if ((${#not_run[@]})); then
  printf '\nNOT RUN here (needs hardware or binaries CI does not have; informational, never a failure):\n'
  printf '  - %s\n' "${not_run[@]}"
fi
if ((${#skipped[@]})); then
  printf '\nSKIPPED on this machine:\n'
  printf '  - %s\n' "${skipped[@]}"
  [[ -n "${CI:-}" ]] && { echo "CI must run everything"; exit 1; }
fi
echo "all checks passed"
