#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches ONNX Runtime's library (once), then cargo test
# in the release profile, the one scripts/onnx-slice builds, so that the two share one build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh >/dev/null
scripts/setup-check.sh >/dev/null
cargo test --release --locked "$@"
