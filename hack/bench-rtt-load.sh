#!/usr/bin/env bash
# Network RTT over loopback, idle and with both cores saturated by busy loops,
# from PingMesh (kernel timestamps: host scheduling stays out of network RTT)
# next to ping(8) on the same address (user-space timing).
#
# Usage: hack/bench-rtt-load.sh [SECONDS=25]   (needs a release build, ping)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-25}
bin=target/release/pingmesh
[[ -x $bin ]] || cargo build --release --bin pingmesh
command -v ping >/dev/null || { echo "ping is needed (apt-get install iputils-ping)"; exit 1; }

# p50 and p99 (nearest rank) of numbers on stdin, in microseconds.
quantiles() { sort -g | awk '{ v[NR] = $1 } END { i50 = int(NR * 0.50 + 0.999); i99 = int(NR * 0.99 + 0.999); printf "%.1f / %.1f", v[i50], v[i99] }'; }

measure() {
  local json ping_us
  json=$($bin demo --agents 2 --tors 1 --tor-mesh-rate 200 --window-ms 5000 \
    --duration "${seconds}s" --json --http-addr 127.0.0.1:0 --log-level error 2>/dev/null)
  pm=$(python3 -c 'import json,sys; p=json.load(sys.stdin)["torPairs"][0]; print("%.1f / %.1f (%d samples)" % (p["p50NetworkRttNs"]/1e3, p["p99NetworkRttNs"]/1e3, p["ok"]))' <<<"$json")
  ping_us=$(ping -n -i 0.005 -c 2000 127.0.0.1 | sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | awk '{ print $1 * 1000 }' | quantiles)
  printf '| %s | %s | %s |\n' "$1" "$pm" "$ping_us"
}

echo "| condition | PingMesh network RTT p50 / p99 (us) | ping RTT p50 / p99 (us) |"
echo "|---|---|---|"
measure "idle"
loops=()
for _ in $(seq "$(nproc)"); do
  ( while :; do :; done ) &
  loops+=($!)
done
trap 'kill "${loops[@]}" 2>/dev/null || true' EXIT
measure "$(nproc) busy loops (all cores)"
