#!/usr/bin/env bash
# Agent cost at a given probe rate: CPU share of one core and resident memory of
# one agent process, measured from /proc over a fixed interval.
#
# Three agents under one ToR with a ToR-mesh rate of RATE/2 pps per target, so
# each agent sends RATE probes/s (2 targets) and answers RATE probes/s.
#
# Usage: hack/bench-agent.sh [RATE=1000] [SECONDS=30]   (needs a release build)
# TRACING=true runs the agents with the eBPF service tracer on (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
seconds=${2:-30}
bin=target/release
[[ -x $bin/pingmesh-agent && -x $bin/pingmesh-operator ]] || cargo build --release --workspace --bins
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

per_target=$(awk -v r="$rate" 'BEGIN { print r / 2 }')
cat >"$work/mesh.yaml" <<YAML
pinglist:
  torMeshRatePps: $per_target
  interTorSampleTors: 0
YAML
$bin/pingmesh-operator standalone --config "$work/mesh.yaml" --registry "sqlite://$work/reg.db" \
  --grpc-addr 127.0.0.1:19400 --http-addr 127.0.0.1:19401 --log-level warn &
pids+=($!)
sleep 1
for i in 1 2 3; do
  $bin/pingmesh-agent --node "bench-$i" --tor rack-1 --controller http://127.0.0.1:19400 \
    --udp-bind "127.0.0.1:0" --metrics-addr "127.0.0.1:1950$i" --log-level warn \
    --tracing "${TRACING:-false}" &
  pids+=($!)
done
agent=${pids[1]}
sleep 8 # registration, pinglists, first windows

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$agent/stat"; }
sent() { curl -s http://127.0.0.1:19501/metrics | awk '/^pingmesh_probes_total/ { s += $NF } END { print s + 0 }'; }
c0=$(cpu); s0=$(sent); t0=$(date +%s.%N)
sleep "$seconds"
c1=$(cpu); s1=$(sent); t1=$(date +%s.%N)
rss_kb=$(awk '/^VmRSS/ { print $2 }' "/proc/$agent/status")
hwm_kb=$(awk '/^VmHWM/ { print $2 }' "/proc/$agent/status")

awk -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$ticks" -v s0="$s0" -v s1="$s1" \
    -v rss="$rss_kb" -v hwm="$hwm_kb" -v rate="$rate" 'BEGIN {
  wall = t1 - t0
  printf "| target rate | probes done/s | CPU (one core) | RSS | peak RSS |\n"
  printf "|---|---|---|---|---|\n"
  printf "| %d/s sent + %d/s answered | %.0f | %.2f %% | %.1f MB | %.1f MB |\n",
    rate, rate, (s1 - s0) / wall, 100 * (c1 - c0) / hz / wall, rss / 1024, hwm / 1024
}'
