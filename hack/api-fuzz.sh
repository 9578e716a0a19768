#!/usr/bin/env bash
# Schema-based fuzzing of the HTTP JSON API (docs/fuzzing.md): a live
# `pingmesh demo` (a mesh controller with agents, a lossy node so there are
# findings, a history of judged windows) and schemathesis, pinned, run from
# the document the controller serves at /api/v1/openapi.json. Fails on any
# 5xx, on a response that does not conform to the document (status, media
# type, body schema), and on any other check schemathesis runs (--checks all).
#
# Usage: hack/api-fuzz.sh                 build, start, fuzz, stop
#        API_FUZZ_EXAMPLES=N hack/api-fuzz.sh   examples per operation (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."

readonly SCHEMATHESIS="schemathesis==4.32.5"
readonly VENV=.tools/api-fuzz-venv

log() { printf 'api-fuzz: %s\n' "$*" >&2; }

# The tool, once, in a venv of its own (python3-venv: hack/deps.sh).
stamp="${VENV}/.pingmesh-packages"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$SCHEMATHESIS" ]]; then
  log "installing ${SCHEMATHESIS} into ${VENV}"
  [[ -x ${VENV}/bin/python ]] || python3 -m venv "$VENV"
  "${VENV}/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS"
  echo "$SCHEMATHESIS" >"$stamp"
fi

cargo build --locked -p pingmesh-cli
work=$(mktemp -d)
demo_pid=
cleanup() {
  [[ -n $demo_pid ]] && kill "$demo_pid" 2>/dev/null && wait "$demo_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:${port}"
# One-second windows and 30% loss on node-2: findings and history within seconds.
target/debug/pingmesh demo --agents 6 --tors 3 --window-ms 1000 --duration 10m \
  --http-addr "127.0.0.1:${port}" --inject 'loss:node-2:30%' >"${work}/demo.log" 2>&1 &
demo_pid=$!

# Ready once a window has been judged and a finding is open.
ready=0
for _ in $(seq 1 60); do
  if python3 - "${base}/api/v1/summary" <<'PY' 2>/dev/null; then
import json, sys, urllib.request
summary = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
sys.exit(0 if summary["findings"] else 1)
PY
    ready=1
    break
  fi
  sleep 1
done
if ((!ready)); then
  tail -30 "${work}/demo.log" >&2
  log "the demo did not judge a lossy window within 60 s"
  exit 1
fi
log "demo up at ${base} with findings; fuzzing the API from ${base}/api/v1/openapi.json"

started=$SECONDS
"${VENV}/bin/schemathesis" run "${base}/api/v1/openapi.json" \
  --checks all \
  --max-examples "${API_FUZZ_EXAMPLES:-100}" \
  --seed 42 \
  --workers 1 \
  --report junit --report-dir "${work}/report"
log "schemathesis passed in $((SECONDS - started)) s"
