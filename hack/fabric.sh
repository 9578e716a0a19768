#!/usr/bin/env bash
# A leaf-spine test fabric of network namespaces on one Linux machine (root only),
# with iptables fault injection. Used by hand and by e2e/tests/fabric.rs.
#
#   hack/fabric.sh up                          build it (removes an old one first)
#   hack/fabric.sh down                        remove everything (idempotent); ends
#                                              processes still inside its namespaces
#   hack/fabric.sh status                      namespaces, injected faults, ping matrix
#   hack/fabric.sh hosts                       one line per host:
#                                              <netns> <host> <tor> <fabric IP>
#   hack/fabric.sh switches                    every router's addresses, as the
#                                              controller's traces.switches (YAML)
#   hack/fabric.sh inject host <host> <pct>    drop pct % of what the host sends and
#                                              receives on its fabric cable (at the ToR
#                                              end: the host's sends succeed and vanish,
#                                              like a broken NIC); mgmt is untouched
#   hack/fabric.sh inject host-local <host> <pct>
#                                              the same in the host's own iptables
#                                              (INPUT/OUTPUT on fabric0): dropped sends
#                                              fail with EPERM in the sender
#   hack/fabric.sh inject tor <tor> <pct>      drop pct % of what the ToR forwards
#   hack/fabric.sh inject spine <spine> <pct>  drop pct % of what the spine forwards
#   hack/fabric.sh inject link <from> <to> <pct>
#                                              drop pct % of what <from> forwards to <to>,
#                                              one direction of a spine-ToR link
#                                              (e.g. `inject link sp2 tor3 30`)
#   hack/fabric.sh clear                       remove every injected fault
#   hack/fabric.sh faults                      list injected faults
#   hack/fabric.sh ecmp [src] [dst] [ports]    send one UDP datagram per source port
#                                              (default h11 -> h31, 16 ports) and print
#                                              which spine carried each
#   hack/fabric.sh paths                       read `<src host> <dst host> <sport> <dport>`
#                                              lines on stdin, print the routers each UDP
#                                              flow crosses (`tor1 sp2 tor3`), from the
#                                              kernel's own ECMP choice (`ip route get`)
#
# pct is a number in (0, 100]; 100 is a black hole (plain DROP), anything else is
# `-m statistic --mode random --probability pct/100 -j DROP`. Every fault rule
# carries the iptables comment `pmf-fault:<kind>:<target>:<pct>`; `clear` deletes
# exactly those. Names take the netns prefix or not: `h21` and `pmf-h21` are one host.
#
# Topology (netns names; every link is a veth pair):
#
#   spines  pmf-sp1  pmf-sp2             every ToR has one link to each spine
#   ToRs    pmf-tor1  pmf-tor2  pmf-tor3
#   hosts   pmf-h11 pmf-h12 | pmf-h21 pmf-h22 | pmf-h31 pmf-h32   (host H of ToR T)
#   mgmt    pmf-mgmt: bridge br0, one port to every host, outside the fabric
#           (the controller runs here; agents reach it without crossing a ToR)
#
# Addresses (nothing outside 10.77.0.0/16 and 10.78.0.0/24 is used):
#   host H of ToR T      fabric0 10.77.T.1H/32 (h21: 10.77.2.11), default via 10.77.T.1
#                        mgmt0   10.78.0.TH/24 (h21: 10.78.0.21)
#   ToR T                10.77.T.1/32 on every host port (named h1, h2), a /32 route
#                        per host; ECMP routes to the other ToRs' 10.77.U.0/24 and
#                        to 10.77.0.0/16 over both spines (ports named sp1, sp2)
#   link spine S - ToR T 10.77.1ST.0/30: spine .1 (port named torT), ToR .2
#                        (sp2 - tor3: 10.77.123.1 and 10.77.123.2)
#   pmf-mgmt             br0 10.78.0.1/24, one port per host (named hTH)
#
# Routers (ToRs, spines) forward with net.ipv4.fib_multipath_hash_policy=1 (hash
# on the 5-tuple, so UDP source ports spread over both spines), rp_filter off (ECMP
# makes paths asymmetric) and icmp_ratelimit 0 (every TTL expiry answers, so
# traceroute over many flows is complete). IPv6 is off everywhere.
set -euo pipefail

readonly PREFIX="pmf-"
readonly TORS=(tor1 tor2 tor3)
readonly SPINES=(sp1 sp2)
readonly HOSTS=(h11 h12 h21 h22 h31 h32)
readonly MGMT="${PREFIX}mgmt"
readonly MGMT_IP="10.78.0.1"
readonly FAULT_TAG="pmf-fault"
readonly COUNT_TAG="pmf-count"

die() {
  echo "fabric.sh: $*" >&2
  exit 1
}

usage() {
  local code=${1:-0}
  if [[ ${code} -eq 0 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  else
    {
      echo "usage:"
      sed -n '5,/^# pct is/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    } >&2
  fi
  exit "${code}"
}

# Index (1-based) of a ToR or spine name: tor3 -> 3, sp2 -> 2.
num() { echo "${1##*[a-z]}"; }

# ToR of a host: h21 -> tor2.
tor_of() {
  local h=$1
  echo "tor${h:1:1}"
}

host_ip() {
  local h=$1
  echo "10.77.${h:1:1}.1${h:2:1}"
}

host_mgmt_ip() {
  local h=$1
  echo "10.78.0.${h:1:2}"
}

# Spine S - ToR T link addresses.
spine_link_ip() { echo "10.77.1$1$2.1"; }
tor_link_ip() { echo "10.77.1$1$2.2"; }

all_namespaces() {
  local n
  for n in "${SPINES[@]}" "${TORS[@]}" "${HOSTS[@]}"; do
    echo "${PREFIX}${n}"
  done
  echo "${MGMT}"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}

sysctl_ns() {
  local ns=$1
  shift
  local kv
  for kv in "$@"; do
    in_ns "$ns" sysctl -qw "$kv" >/dev/null
  done
}

need_root() {
  [[ ${EUID} -eq 0 ]] || die "needs root (network namespaces, iptables)"
}

need_tool() {
  command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install -y $2"
}

# A short name from a user argument: pmf-h21 -> h21.
short() { echo "${1#"${PREFIX}"}"; }

is_one_of() {
  local want=$1
  shift
  local x
  for x in "$@"; do
    [[ ${x} == "${want}" ]] && return 0
  done
  return 1
}

new_ns() {
  local ns=$1
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
  sysctl_ns "$ns" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
    net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}

new_router() {
  new_ns "$1"
  sysctl_ns "$1" net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
    net.ipv4.icmp_ratelimit=0
  # A hash seed of its own per router, as real fabrics have: Linux's L4 hash is
  # symmetric, so with one seed everywhere a probe and its ACK take the same
  # spine both ways and a one-way link fault looks exactly like its reverse.
  # Kernels before 6.11 have no seed: paths stay symmetric there.
  if in_ns "$1" test -e /proc/sys/net/ipv4/fib_multipath_hash_seed; then
    sysctl_ns "$1" "net.ipv4.fib_multipath_hash_seed=$(cksum <<<"$1" | cut -d' ' -f1)"
  fi
}

# veth pair: <ns1> <if1> <ns2> <if2>, both ends up.
veth() {
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
  ip -n "$1" link set "$2" up
  ip -n "$3" link set "$4" up
}

cmd_up() {
  need_root
  cmd_down >/dev/null
  local s t h ns tor

  for s in "${SPINES[@]}"; do new_router "${PREFIX}${s}"; done
  for t in "${TORS[@]}"; do new_router "${PREFIX}${t}"; done
  for h in "${HOSTS[@]}"; do new_ns "${PREFIX}${h}"; done
  new_ns "${MGMT}"
  ip -n "${MGMT}" link add br0 type bridge
  ip -n "${MGMT}" addr add "${MGMT_IP}/24" dev br0
  ip -n "${MGMT}" link set br0 up

  # ToR <-> spine links.
  for s in "${SPINES[@]}"; do
    for t in "${TORS[@]}"; do
      local si ti
      si=$(num "$s")
      ti=$(num "$t")
      veth "${PREFIX}${s}" "$t" "${PREFIX}${t}" "$s"
      ip -n "${PREFIX}${s}" addr add "$(spine_link_ip "$si" "$ti")/30" dev "$t"
      ip -n "${PREFIX}${t}" addr add "$(tor_link_ip "$si" "$ti")/30" dev "$s"
      # The spine reaches ToR T's hosts through ToR T.
      ip -n "${PREFIX}${s}" route add "10.77.${ti}.0/24" via "$(tor_link_ip "$si" "$ti")"
    done
  done

  # Hosts: fabric port to the ToR, management port to the bridge.
  for h in "${HOSTS[@]}"; do
    ns="${PREFIX}${h}"
    tor=$(tor_of "$h")
    local ti port ip
    ti=$(num "$tor")
    port="h${h:2:1}"
    ip=$(host_ip "$h")
    veth "$ns" fabric0 "${PREFIX}${tor}" "$port"
    ip -n "${PREFIX}${tor}" addr add "10.77.${ti}.1/32" dev "$port"
    ip -n "${PREFIX}${tor}" route add "${ip}/32" dev "$port"
    ip -n "$ns" addr add "${ip}/32" dev fabric0
    ip -n "$ns" route add "10.77.${ti}.1/32" dev fabric0
    ip -n "$ns" route add default via "10.77.${ti}.1" dev fabric0 src "$ip"

    veth "$ns" mgmt0 "${MGMT}" "$h"
    ip -n "${MGMT}" link set "$h" master br0
    ip -n "$ns" addr add "$(host_mgmt_ip "$h")/24" dev mgmt0
  done

  # ToRs: ECMP over both spines to every other ToR's hosts, and to the rest of
  # the fabric (spine link addresses, for traceroute replies and by-hand pings).
  for t in "${TORS[@]}"; do
    local ti u ui hops
    ti=$(num "$t")
    hops=()
    for s in "${SPINES[@]}"; do
      hops+=(nexthop via "$(spine_link_ip "$(num "$s")" "$ti")" weight 1)
    done
    for u in "${TORS[@]}"; do
      [[ ${u} == "${t}" ]] && continue
      ui=$(num "$u")
      ip -n "${PREFIX}${t}" route add "10.77.${ui}.0/24" "${hops[@]}"
    done
    ip -n "${PREFIX}${t}" route add 10.77.0.0/16 "${hops[@]}"
  done
  echo "fabric up: ${#SPINES[@]} spines, ${#TORS[@]} ToRs, ${#HOSTS[@]} hosts; mgmt ${MGMT} ${MGMT_IP}"
}

cmd_down() {
  need_root
  local ns pids
  while read -r ns; do
    ns_exists "$ns" || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [[ -n ${pids} ]]; then
      # shellcheck disable=SC2086 # one pid per word
      kill ${pids} 2>/dev/null || true
    fi
    ip netns del "$ns"
  done < <(all_namespaces)
}

cmd_hosts() {
  local h
  for h in "${HOSTS[@]}"; do
    echo "${PREFIX}${h} ${h} $(tor_of "$h") $(host_ip "$h")"
  done
}

# Every router's interface addresses, as the mesh controller's `traces.switches`
# (YAML, indented to sit under `traces:`): path traces learn addresses, this
# folds them into router names.
cmd_switches() {
  local s t
  echo "  switches:"
  for t in "${TORS[@]}"; do
    echo "    ${t}:"
    echo "      - 10.77.${t:3:1}.1"
    for s in "${SPINES[@]}"; do
      echo "      - $(tor_link_ip "${s:2:1}" "${t:3:1}")"
    done
  done
  for s in "${SPINES[@]}"; do
    echo "    ${s}:"
    for t in "${TORS[@]}"; do
      echo "      - $(spine_link_ip "${s:2:1}" "${t:3:1}")"
    done
  done
}

# Deletes this script's rules carrying <tag> in one namespace.
delete_tagged() {
  local ns=$1 tag=$2 line
  local -a args
  ns_exists "$ns" || return 0
  while read -r line; do
    [[ -n ${line} ]] || continue
    line=${line/#-A /-D }
    line=${line//\"/}
    read -ra args <<<"$line"
    in_ns "$ns" iptables "${args[@]}"
  done < <(in_ns "$ns" iptables -S | grep -- "--comment \"\{0,1\}${tag}" || true)
}

cmd_clear() {
  need_root
  local ns
  while read -r ns; do
    delete_tagged "$ns" "${FAULT_TAG}"
  done < <(all_namespaces)
}

cmd_faults() {
  need_root
  local ns
  while read -r ns; do
    ns_exists "$ns" || continue
    in_ns "$ns" iptables -S | grep -- "${FAULT_TAG}" | sed "s/^/${ns}: /" || true
  done < <(all_namespaces)
}

check_pct() {
  local pct=$1
  [[ ${pct} =~ ^[0-9]+([.][0-9]+)?$ ]] || die "percent must be a number: ${pct}"
  awk -v p="$pct" 'BEGIN { exit !(p > 0 && p <= 100) }' || die "percent must be in (0, 100]: ${pct}"
}

# Percent -> the iptables match that drops that share: black hole at 100.
drop_spec() {
  local pct=$1
  if awk -v p="$pct" 'BEGIN { exit !(p == 100) }'; then
    echo "-j DROP"
  else
    awk -v p="$pct" 'BEGIN { printf "-m statistic --mode random --probability %.6f -j DROP\n", p / 100 }'
  fi
}

# add_rule <ns> <comment> <chain> [matches...] -- <percent>
add_rule() {
  local ns=$1 comment=$2 chain=$3
  shift 3
  local -a matches=()
  while [[ $# -gt 0 && $1 != "--" ]]; do
    matches+=("$1")
    shift
  done
  shift
  check_pct "$1"
  local -a drop
  read -ra drop <<<"$(drop_spec "$1")"
  ns_exists "$ns" || die "${ns} does not exist: run \`hack/fabric.sh up\` first"
  in_ns "$ns" iptables -I "$chain" "${matches[@]}" -m comment --comment "$comment" "${drop[@]}"
}

cmd_inject() {
  need_root
  need_tool iptables iptables
  [[ $# -ge 1 ]] || usage 2
  local kind=$1
  shift
  [[ $# -ge 1 ]] || usage 2
  check_pct "${@: -1}"
  case "$kind" in
    host | host-local)
      [[ $# -eq 2 ]] || usage 2
      local h
      h=$(short "$1")
      is_one_of "$h" "${HOSTS[@]}" || die "no host ${1} (hosts: ${HOSTS[*]})"
      local tag="${FAULT_TAG}:${kind}:${h}:$2"
      if [[ ${kind} == host-local ]]; then
        # The host's own firewall: what it sends fails with EPERM, not silently.
        add_rule "${PREFIX}${h}" "$tag" INPUT -i fabric0 -- "$2"
        add_rule "${PREFIX}${h}" "$tag" OUTPUT -o fabric0 -- "$2"
      else
        # On the wire: the ToR end of the host's cable, both directions, so the
        # host's sends succeed and vanish like on a broken NIC or cable.
        local tor port
        tor="${PREFIX}$(tor_of "$h")"
        port="h${h:2:1}"
        add_rule "$tor" "$tag" FORWARD -i "$port" -- "$2"
        add_rule "$tor" "$tag" FORWARD -o "$port" -- "$2"
        add_rule "$tor" "$tag" INPUT -i "$port" -- "$2"
        add_rule "$tor" "$tag" OUTPUT -o "$port" -- "$2"
      fi
      ;;
    tor | spine)
      [[ $# -eq 2 ]] || usage 2
      local r
      r=$(short "$1")
      if [[ ${kind} == tor ]]; then
        is_one_of "$r" "${TORS[@]}" || die "no ToR ${1} (ToRs: ${TORS[*]})"
      else
        is_one_of "$r" "${SPINES[@]}" || die "no spine ${1} (spines: ${SPINES[*]})"
      fi
      add_rule "${PREFIX}${r}" "${FAULT_TAG}:${kind}:${r}:$2" FORWARD -- "$2"
      ;;
    link)
      [[ $# -eq 3 ]] || usage 2
      local from to
      from=$(short "$1")
      to=$(short "$2")
      if ! { is_one_of "$from" "${SPINES[@]}" && is_one_of "$to" "${TORS[@]}"; } &&
        ! { is_one_of "$from" "${TORS[@]}" && is_one_of "$to" "${SPINES[@]}"; }; then
        die "a link runs between a spine (${SPINES[*]}) and a ToR (${TORS[*]}): ${1} ${2}"
      fi
      # Each router names its port after the router at the other end.
      add_rule "${PREFIX}${from}" "${FAULT_TAG}:link:${from}->${to}:$3" FORWARD -o "$to" -- "$3"
      ;;
    *) usage 2 ;;
  esac
}

cmd_status() {
  need_root
  need_tool ping iputils-ping
  local ns missing=0
  echo "namespaces:"
  while read -r ns; do
    if ns_exists "$ns"; then
      echo "  ${ns}"
    else
      echo "  ${ns} (missing)"
      missing=1
    fi
  done < <(all_namespaces)
  [[ ${missing} -eq 0 ]] || die "fabric incomplete: run \`hack/fabric.sh up\`"
  echo "faults:"
  cmd_faults | sed 's/^/  /'

  local tmp src dst
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: tmp is local
  trap "rm -rf '${tmp}'" EXIT
  for src in "${HOSTS[@]}"; do
    for dst in "${HOSTS[@]}"; do
      [[ ${src} == "${dst}" ]] && continue
      (in_ns "${PREFIX}${src}" ping -n -q -c 10 -i 0.05 -W 1 "$(host_ip "$dst")" 2>/dev/null |
        sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' >"${tmp}/${src}-${dst}") &
    done
    # Management: host -> controller address.
    (in_ns "${PREFIX}${src}" ping -n -q -c 3 -i 0.05 -W 1 "${MGMT_IP}" 2>/dev/null |
      sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' >"${tmp}/${src}-mgmt") &
  done
  wait
  echo "ping loss % (10 pings, fabric IPs; mgmt: to ${MGMT_IP}):"
  printf '  %-6s' "from"
  for dst in "${HOSTS[@]}"; do printf '%6s' "$dst"; done
  printf '%6s\n' mgmt
  for src in "${HOSTS[@]}"; do
    printf '  %-6s' "$src"
    for dst in "${HOSTS[@]}" mgmt; do
      if [[ ${src} == "${dst}" ]]; then
        printf '%6s' "-"
      else
        printf '%6s' "$(cat "${tmp}/${src}-${dst}" 2>/dev/null || echo '?')"
      fi
    done
    printf '\n'
  done
}

# Packets counted by the pmf-count rule in a spine.
spine_count() {
  in_ns "${PREFIX}$1" iptables -nvxL FORWARD |
    awk -v tag="${COUNT_TAG}" '$0 ~ tag { print $1; exit }'
}

cmd_ecmp() {
  need_root
  need_tool iptables iptables
  need_tool python3 python3
  local src dst ports
  src=$(short "${1:-h11}")
  dst=$(short "${2:-h31}")
  ports=${3:-16}
  is_one_of "$src" "${HOSTS[@]}" || die "no host ${src}"
  is_one_of "$dst" "${HOSTS[@]}" || die "no host ${dst}"
  [[ ${ports} =~ ^[0-9]+$ ]] || die "ports must be a number: ${ports}"
  local s
  for s in "${SPINES[@]}"; do
    delete_tagged "${PREFIX}${s}" "${COUNT_TAG}"
    in_ns "${PREFIX}${s}" iptables -I FORWARD -p udp --dport 40999 -m comment --comment "${COUNT_TAG}"
  done
  local sport i before after via
  local -A used=()
  echo "${src} ($(host_ip "$src")) -> ${dst} ($(host_ip "$dst")):40999"
  for ((i = 0; i < ports; i++)); do
    sport=$((41000 + i))
    declare -A before_of=()
    for s in "${SPINES[@]}"; do before_of[$s]=$(spine_count "$s"); done
    in_ns "${PREFIX}${src}" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.sendto(b"pmf-ecmp", (sys.argv[3], 40999))
' "$(host_ip "$src")" "$sport" "$(host_ip "$dst")"
    sleep 0.05
    via=""
    for s in "${SPINES[@]}"; do
      before=${before_of[$s]}
      after=$(spine_count "$s")
      if [[ ${after} -gt ${before} ]]; then
        via="${via}${s} "
        used[$s]=1
      fi
    done
    echo "  source port ${sport}: via ${via:-nothing (lost)}(route get: $(flow_path "$src" "$dst" "$sport" 40999))"
  done
  for s in "${SPINES[@]}"; do delete_tagged "${PREFIX}${s}" "${COUNT_TAG}"; done
  echo "spines used: ${!used[*]}"
  [[ ${#used[@]} -eq ${#SPINES[@]} ]] || die "not every spine carried a flow: is L4 hashing on?"
}

# The routers a UDP flow from host to host crosses, as the source ToR's FIB picks.
flow_path() {
  local src=$1 dst=$2 sport=$3 dport=$4
  local st dt spine
  st=$(tor_of "$src")
  dt=$(tor_of "$dst")
  if [[ ${st} == "${dt}" ]]; then
    echo "$st"
    return
  fi
  spine=$(ip -n "${PREFIX}${st}" route get "$(host_ip "$dst")" from "$(host_ip "$src")" \
    iif "h${src:2:1}" ipproto udp sport "$sport" dport "$dport" |
    sed -n 's/.* dev \(sp[0-9]*\).*/\1/p' | head -n 1)
  echo "${st} ${spine:-?} ${dt}"
}

cmd_paths() {
  need_root
  local src dst sport dport
  while read -r src dst sport dport; do
    [[ -n ${src} ]] || continue
    src=$(short "$src")
    dst=$(short "$dst")
    is_one_of "$src" "${HOSTS[@]}" || die "no host ${src}"
    is_one_of "$dst" "${HOSTS[@]}" || die "no host ${dst}"
    [[ ${sport} =~ ^[0-9]+$ && ${dport} =~ ^[0-9]+$ ]] || die "ports must be numbers: ${sport} ${dport}"
    flow_path "$src" "$dst" "$sport" "$dport"
  done
}

main() {
  [[ $# -ge 1 ]] || usage 2
  local cmd=$1
  shift
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    hosts) cmd_hosts ;;
    switches) cmd_switches ;;
    inject) cmd_inject "$@" ;;
    clear) cmd_clear ;;
    faults) cmd_faults ;;
    ecmp) cmd_ecmp "$@" ;;
    paths) cmd_paths ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
  esac
}

main "$@"
