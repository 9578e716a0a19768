#!/usr/bin/env bash
# Page weight and time to first render of the web view at 1,024, 9,900 and
# 22,350 ToR pairs: Debian's headless Chromium against a real controller
# (release build) fed by synthetic agents. Prints the Markdown table kept in
# docs/benchmarks.md ("Web view"). Not part of hack/test.sh: speed is never
# asserted in tests.
#
# Usage: hack/web-bench.sh            LOADS=N: page loads per size (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p pingmesh-operator --example web_fixture
(cd e2e/web && npm ci --no-audit --no-fund --loglevel=error)
cd e2e/web
PINGMESH_BIN_DIR=../../target/release node bench.mjs
