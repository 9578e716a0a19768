#!/usr/bin/env bash
# Sets up soft-RoCE (rxe) on a Linux machine or VM and runs the RDMA hardware
# tests against it. Needs root, a kernel with the rdma_rxe module, and the
# rdma-core user space (iproute2's `rdma`, libibverbs with the rxe provider).
#
# Usage: sudo hack/softroce.sh [NETDEV]     (default: the interface of the default route)
#        sudo hack/softroce.sh --teardown
#
# The interface must have an IPv4 address: the agent picks the RoCE v2
# IPv4-mapped GID automatically. Soft-RoCE has no completion timestamps, so
# the samples it yields are software-timed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${PINGMESH_RDMA_DEVICE:-rxe0}"

if [[ "${1:-}" == "--teardown" ]]; then
  rdma link delete "$DEVICE" 2>/dev/null || true
  echo "removed $DEVICE"
  exit 0
fi

NETDEV="${1:-$(ip -o route show default | awk '{print $5; exit}')}"
if [[ -z "$NETDEV" ]]; then
  echo "no network interface given and no default route to pick one from" >&2
  exit 1
fi
if ! ip -4 -o addr show dev "$NETDEV" | grep -q inet; then
  echo "$NETDEV has no IPv4 address; RoCE v2 IPv4-mapped GIDs need one" >&2
  exit 1
fi

if [[ -f /etc/debian_version ]] && ! command -v rdma >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rdma-core ibverbs-providers ibverbs-utils \
    libibverbs-dev librdmacm-dev libclang-dev pkg-config iproute2 >/dev/null
fi

modprobe rdma_rxe || { echo "this kernel has no rdma_rxe module" >&2; exit 1; }
if ! rdma link show "$DEVICE/1" >/dev/null 2>&1; then
  rdma link add "$DEVICE" type rxe netdev "$NETDEV"
fi
rdma link show "$DEVICE/1"
ibv_devices || true

# Show the GID table the agent chooses from (type and address per index).
port=/sys/class/infiniband/$DEVICE/ports/1
for gid in "$port"/gids/*; do
  i=$(basename "$gid")
  addr=$(cat "$gid" 2>/dev/null || true)
  [[ "$addr" == "0000:0000:0000:0000:0000:0000:0000:0000" || -z "$addr" ]] && continue
  echo "  gid $i: $addr ($(cat "$port/gid_attrs/types/$i" 2>/dev/null || echo '?'))"
done

# UD queue pairs pin memory: make sure locked memory is not capped at 64 KiB.
ulimit -l unlimited 2>/dev/null || echo "warning: could not raise the memlock limit" >&2

PINGMESH_RDMA_DEVICE="$DEVICE" cargo test -p pingmesh-agent --test rdma_hardware -- --ignored --test-threads=1
# Then the whole mesh: a controller and two agents probing each other over the device.
cargo build --workspace --bins
PINGMESH_RDMA_DEVICE="$DEVICE" cargo test -p pingmesh-e2e --test rdma_mesh -- --ignored
