#!/usr/bin/env bash
# The web view in a real browser: Debian's headless Chromium, driven by
# playwright-core (pinned in e2e/web/package-lock.json), against a live
# `pingmesh demo` (a fault injected, seen, cleared) and against a real
# controller with 120 ToRs fed by synthetic agents (aggregation); plus the
# heatmap model's unit tests under node. Screenshots go to target/web-test/.
# Needs chromium and npm (hack/deps.sh installs both).
#
# Usage: hack/web-test.sh            build what it needs, then run
#        PINGMESH_SCREENSHOTS=docs/images hack/web-test.sh
#                                    refresh the docs' screenshots
#        PINGMESH_CHROMIUM=PATH ...   another Chromium than /usr/bin/chromium
set -euo pipefail
cd "$(dirname "$0")/.."

chromium=${PINGMESH_CHROMIUM:-/usr/bin/chromium}
[[ -x $chromium ]] || { echo "$chromium is missing: apt-get install chromium (hack/deps.sh)" >&2; exit 1; }
command -v npm >/dev/null || { echo "npm is missing: apt-get install npm (hack/deps.sh)" >&2; exit 1; }

# The demo and the fixture, with the page embedded as it is now (two
# commands: a target flag such as --example would narrow both packages).
cargo build --locked -p pingmesh-cli
cargo build --locked -p pingmesh-operator --example web_fixture

(cd e2e/web && npm ci --no-audit --no-fund --loglevel=error)
cd e2e/web
PINGMESH_CHROMIUM=$chromium node --test --test-concurrency=1 tests/
