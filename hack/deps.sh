#!/usr/bin/env bash
# What the full test suite needs from the system, checked in a second: on a
# Debian/Ubuntu machine, as root, it installs what is missing; otherwise it
# prints the one command to run and fails.
#
# Usage: hack/deps.sh        (hack/test.sh runs it first)
set -euo pipefail

# Debian package -> a file or command that shows it is installed.
declare -A probes=(
  # rdma-sys (the agent's RDMA transport) generates bindings with bindgen and
  # links libibverbs and librdmacm.
  [pkg-config]=pkg-config
  [clang]=clang
  [libclang-dev]=/usr/lib/llvm-*/lib/libclang.so
  [libibverbs-dev]=/usr/include/infiniband/verbs.h
  [librdmacm-dev]=/usr/include/rdma/rdma_cma.h
  # The agent's eBPF tracer (the default `ebpf` feature): ebpf-probes' build.rs
  # compiles bpf/*.c with clang (above) against libbpf's headers.
  [libbpf-dev]=/usr/include/bpf/bpf_helpers.h
  # End-to-end tests: iptables fault injection, network namespaces.
  [iptables]=iptables
  [iproute2]=ip
  # The chaos suite checks the SQLite registry file with the sqlite3 shell.
  [sqlite3]=sqlite3
  # promtool: metric exposition, alert rules and their unit tests.
  [prometheus]=promtool
  # Manifest checks: shellcheck of hack/, Python tools in a venv.
  [shellcheck]=shellcheck
  [python3-venv]=/usr/lib/python3*/ensurepip/__init__.py
  # rqlited for the registry suite comes from npm.
  [npm]=npm
  # The web view's browser tests (hack/web-test.sh): Debian's Chromium, driven
  # by playwright-core from npm.
  [chromium]=chromium
)

present() {
  local probe=$1
  if [[ $probe == /* ]]; then
    # A glob: present when it matches a file.
    compgen -G "$probe" >/dev/null
  else
    command -v "$probe" >/dev/null 2>&1 || [[ -x /usr/sbin/$probe || -x /sbin/$probe ]]
  fi
}

missing=()
for pkg in "${!probes[@]}"; do
  present "${probes[$pkg]}" || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
IFS=$'\n' read -r -d '' -a missing < <(printf '%s\n' "${missing[@]}" | sort && printf '\0')

command -v cargo >/dev/null || { echo "cargo is missing: install Rust from rustup first" >&2; exit 1; }
install=(apt-get install -y -q --no-install-recommends "${missing[@]}")
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  "${install[@]}" >/dev/null
  exit 0
fi
echo "the test suite needs these packages: ${missing[*]}" >&2
echo "run: sudo apt-get update && sudo ${install[*]}" >&2
exit 1
