#!/usr/bin/env bash
# Agent cost at a given probe rate: CPU share of one core and resident memory of
# one agent process, measured from /proc over a fixed interval.
#
# AGENTS agents (3 by default) under one ToR with a ToR-mesh rate of
# RATE/(AGENTS-1) pps per target, so each agent sends RATE probes/s to
# AGENTS-1 targets and answers RATE probes/s. A real rack has some 30-40
# targets per agent at 10 pps; AGENTS=21 spreads the same rate over 20.
#
# Usage: hack/bench-agent.sh [RATE=1000] [SECONDS=30]   (needs a release build)
# TRACING=true runs the agents with the eBPF service tracer on (needs root).
# BIN=dir takes the binaries from dir instead of target/release (a build kept
# from before a change, to measure both on the same machine and load).
# Where `perf` can read tracepoints (root), the table also gives system calls
# and context switches of the measured agent per probe done (sent + answered
# counts as one). CALLGRIND=1 runs the measured agent under valgrind's callgrind
# and gives user-space instructions per probe over the same interval instead of
# CPU (valgrind slows the agent; the interval's profile is the newest
# /tmp/callgrind.out.bench.*, for callgrind_annotate).
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
seconds=${2:-30}
bin=${BIN:-target/release}
[[ -x $bin/pingmesh-agent && -x $bin/pingmesh-operator ]] || cargo build --release --workspace --bins
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

agents=${AGENTS:-3}
(( agents >= 2 && agents <= 98 )) || { echo "AGENTS must be 2-98" >&2; exit 2; }
per_target=$(awk -v r="$rate" -v n="$agents" 'BEGIN { print r / (n - 1) }')
cat >"$work/mesh.yaml" <<YAML
pinglist:
  torMeshRatePps: $per_target
  interTorSampleTors: 0
YAML
"$bin"/pingmesh-operator standalone --config "$work/mesh.yaml" --registry "sqlite://$work/reg.db" \
  --grpc-addr 127.0.0.1:19400 --http-addr 127.0.0.1:19401 --log-level warn &
pids+=($!)
sleep 1
for ((i = 1; i <= agents; i++)); do
  cmd=("$bin/pingmesh-agent")
  if [[ $i == 1 ]]; then
    [[ ${CALLGRIND:-0} == 1 ]] && cmd=(valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file=/tmp/callgrind.out.bench "${cmd[@]}")
  fi
  "${cmd[@]}" --node "bench-$i" --tor rack-1 --controller http://127.0.0.1:19400 \
    --udp-bind "127.0.0.1:0" --metrics-addr "127.0.0.1:$((19500 + i))" --log-level warn \
    --tracing "${TRACING:-false}" &
  pids+=($!)
done
agent=${pids[1]}
sleep 8 # registration, pinglists, first windows
[[ ${CALLGRIND:-0} == 1 ]] && sleep 12 # valgrind starts slowly

ticks=$(getconf CLK_TCK)
cpu() { awk '{ print $14 + $15 }' "/proc/$agent/stat"; }
sent() { curl -s http://127.0.0.1:19501/metrics | awk '/^pingmesh_probes_total/ { s += $NF } END { print s + 0 }'; }
perf_out=$work/perf.txt
counting=()
if [[ ${CALLGRIND:-0} == 1 ]]; then
  callgrind_control -i on "$agent" >/dev/null
elif perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$agent" -o "$perf_out" &
  counting=($!)
fi
c0=$(cpu); s0=$(sent); t0=$(date +%s.%N)
sleep "$seconds"
c1=$(cpu); s1=$(sent); t1=$(date +%s.%N)
if [[ ${CALLGRIND:-0} == 1 ]]; then
  callgrind_control -d "$agent" >/dev/null
  callgrind_control -i off "$agent" >/dev/null
  sleep 1
  # The newest dump of this run's agent (callgrind_control -d writes a new file each time).
  newest=$(find /tmp -maxdepth 1 -name 'callgrind.out.bench.*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
  instructions=$(awk '/^summary:/ { print $2 }' "$newest")
  awk -v i="$instructions" -v s0="$s0" -v s1="$s1" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "| probes done/s (under callgrind) | user instructions per probe |\n|---|---|\n"
    printf "| %.0f | %.0f |\n", (s1 - s0) / (t1 - t0), i / (s1 - s0)
  }'
  exit 0
fi
syscalls=-; switches=-
if [[ ${#counting[@]} -gt 0 ]]; then
  kill -INT "${counting[0]}"; wait "${counting[0]}" 2>/dev/null || true
  syscalls=$(awk -F, '/raw_syscalls:sys_enter/ { print $1 }' "$perf_out")
  switches=$(awk -F, '/context-switches/ { print $1 }' "$perf_out")
fi
rss_kb=$(awk '/^VmRSS/ { print $2 }' "/proc/$agent/status")
hwm_kb=$(awk '/^VmHWM/ { print $2 }' "/proc/$agent/status")

awk -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$ticks" -v s0="$s0" -v s1="$s1" \
    -v rss="$rss_kb" -v hwm="$hwm_kb" -v rate="$rate" -v sc="$syscalls" -v cs="$switches" 'BEGIN {
  wall = t1 - t0; done = s1 - s0
  printf "| target rate | probes done/s | CPU (one core) | syscalls/probe | switches/probe | RSS | peak RSS |\n"
  printf "|---|---|---|---|---|---|---|\n"
  printf "| %d/s sent + %d/s answered | %.0f | %.2f %% | %s | %s | %.1f MB | %.1f MB |\n",
    rate, rate, done / wall, 100 * (c1 - c0) / hz / wall,
    sc == "-" ? "-" : sprintf("%.2f", sc / done), cs == "-" ? "-" : sprintf("%.2f", cs / done),
    rss / 1024, hwm / 1024
}'
