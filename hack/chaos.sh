#!/usr/bin/env bash
# The chaos suite (e2e/tests/chaos.rs, docs/chaos.md): the rqlite leader
# killed under load, the controller SIGKILLed and restarted, the controller
# partitioned from every agent, a churn of hundreds of agents, the SQLite
# registry's disk full. Needs root (iptables, network namespaces, mount), the
# Debian packages iptables, iproute2 and sqlite3, and npm for rqlited.
#
# Usage: sudo hack/chaos.sh                  the whole suite, 2-minute partition
#        sudo PINGMESH_CHAOS_PARTITION_SECS=30 hack/chaos.sh   as CI runs it
#        sudo hack/chaos.sh --known-failures the tests that fail on purpose
#                                            (none at present; docs/chaos.md)
#
# Environment: PINGMESH_CHAOS_PARTITION_SECS (default 120),
# PINGMESH_CHAOS_CHURN_WAVES (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."

# Tests that show a gap outside the suite's reach; they fail until it is fixed.
# (churn_returns_controller_memory_to_its_baseline was one until the controller
# trimmed its heap; it is part of the churn scenario now.)
readonly KNOWN_FAILURES=()

[[ "$(id -u)" == 0 ]] || { echo "chaos.sh: needs root (iptables, namespaces, mount)" >&2; exit 1; }
for tool in iptables ip sqlite3; do
  command -v "$tool" >/dev/null || { echo "chaos.sh: $tool is missing (hack/deps.sh installs it)" >&2; exit 1; }
done

cargo build --workspace --bins --locked
rqlited="$(hack/rqlite.sh bin)"
export PINGMESH_E2E_CHAOS=1 PINGMESH_RQLITED="${rqlited}"
export PINGMESH_CHAOS_PARTITION_SECS="${PINGMESH_CHAOS_PARTITION_SECS:-120}"

if [[ "${1:-}" == --known-failures ]]; then
  for test in ${KNOWN_FAILURES[@]+"${KNOWN_FAILURES[@]}"}; do
    cargo test -p pingmesh-e2e --locked --test chaos -- --ignored --exact "$test" --nocapture || true
  done
  exit 0
fi

skips=()
for test in ${KNOWN_FAILURES[@]+"${KNOWN_FAILURES[@]}"}; do
  skips+=(--skip "$test")
done
# --nocapture: every scenario prints its figures as a `chaos:` line.
cargo test -p pingmesh-e2e --locked --test chaos -- --include-ignored --test-threads=1 \
  --nocapture ${skips[@]+"${skips[@]}"}
