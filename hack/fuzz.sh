#!/usr/bin/env bash
# Coverage-guided fuzzing of PingMesh's untrusted inputs (docs/fuzzing.md):
# the probe wire decoder, every gRPC request the controller takes, the mesh
# controller's YAML config and the PingMesh spec's validation. libFuzzer via
# libfuzzer-sys, built on stable Rust: the sanitizer-coverage passes are
# plain -C flags, no -Zsanitizer (so no nightly and no AddressSanitizer; the
# code under test is safe Rust, and debug assertions and overflow checks are
# on). A crash, a timeout or an out-of-memory ends the script non-zero, with
# the input under fuzz/artifacts/<target>/.
#
# Usage: hack/fuzz.sh                 replay fuzz/regressions, then fuzz each
#                                     target FUZZ_SECONDS (default 30) seconds
#        hack/fuzz.sh --long          10 million executions per target
#                                     (FUZZ_RUNS to change), corpus kept in
#                                     fuzz/target/corpus-long/<target>
#        hack/fuzz.sh --seeds         rewrite fuzz/corpus/* from the encoders
#        hack/fuzz.sh ... TARGET...   only these targets
set -euo pipefail
cd "$(dirname "$0")/.."
readonly ROOT=$PWD

mode=short
targets=()
for arg in "$@"; do
  case $arg in
    --long) mode=long ;;
    --seeds) mode=seeds ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) targets+=("$arg") ;;
  esac
done
((${#targets[@]})) || targets=(wire grpc mesh_config pingmesh_spec)

# What cargo-fuzz passes, minus -Zsanitizer: libFuzzer's inline 8-bit
# counters, the PC table (for cov/ft) and compare tracing (so the fuzzer
# learns magic numbers and string compares).
coverage_flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  --cfg fuzzing
)
# An explicit --target keeps the flags off build scripts and proc macros,
# which run on the host without the libFuzzer runtime.
host=$(rustc -vV | sed -n 's/^host: //p')
# libfuzzer-sys compiles libFuzzer (C++): clang++ when there is no c++.
if ! command -v c++ >/dev/null && command -v clang++ >/dev/null; then
  export CXX=clang++
fi
export RUSTFLAGS="${coverage_flags[*]}"

build() {
  (cd fuzz && cargo build --locked --release --target "$host" "$@")
}

if [[ $mode == seeds ]]; then
  # The generator links the same instrumented crates (libFuzzer's runtime
  # supplies the coverage callbacks; its main is not linked in).
  build --example seeds
  "fuzz/target/${host}/release/examples/seeds"
  exit 0
fi

build --bins
bin_dir="fuzz/target/${host}/release"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

status=0
for target in "${targets[@]}"; do
  [[ -x "${bin_dir}/${target}" ]] || { echo "no fuzz target ${target}" >&2; exit 2; }
  mkdir -p "fuzz/artifacts/${target}"
  common=(
    -artifact_prefix="${ROOT}/fuzz/artifacts/${target}/"
    -timeout=10
    -rss_limit_mb=2048
    -print_final_stats=1
  )
  # Every input that ever crashed a target replays first (fuzz/regressions).
  regressions=("fuzz/regressions/${target}"/*)
  if [[ -e ${regressions[0]} ]]; then
    printf '\n=== fuzz %s: replaying %d regression inputs\n' "$target" "${#regressions[@]}"
    "${bin_dir}/${target}" "${common[@]}" "${regressions[@]}" >"${work}/${target}.replay" 2>&1 || {
      tail -40 "${work}/${target}.replay"
      echo "fuzz ${target}: a regression input fails again" >&2
      status=1
      continue
    }
  fi
  if [[ $mode == long ]]; then
    corpus="fuzz/target/corpus-long/${target}"
    log="fuzz/target/long-${target}.log"
    limit=(-runs="${FUZZ_RUNS:-10000000}")
  else
    corpus="${work}/corpus-${target}"
    log="${work}/${target}.log"
    limit=(-max_total_time="${FUZZ_SECONDS:-30}")
  fi
  mkdir -p "$corpus"
  printf '\n=== fuzz %s (%s)\n' "$target" "${limit[*]}"
  started=$SECONDS
  # New inputs go to the first folder; the committed seeds are only read.
  if "${bin_dir}/${target}" "${common[@]}" "${limit[@]}" "$corpus" "fuzz/corpus/${target}" >"$log" 2>&1; then
    # The last status line (cov, ft, corpus, exec/s) and the final stats.
    grep -E '^#[0-9]+' "$log" | tail -1 || true
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
    printf 'fuzz %s: no crash in %d s; corpus %d inputs\n' "$target" "$((SECONDS - started))" \
      "$(find "$corpus" -type f | wc -l)"
  else
    tail -60 "$log"
    echo "fuzz ${target}: FAILED (crash input under fuzz/artifacts/${target}/)" >&2
    status=1
  fi
done
exit "$status"
