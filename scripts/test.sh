#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: fetches ONNX Runtime's library (once), then cargo test
# in the release profile, the one scripts/onnx-slice builds, so that the two share one build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-ort.sh >/dev/null
scripts/setup-check.sh >/dev/null
scripts/setup-clients.sh >/dev/null
if [ ! -x "${CARGO_TARGET_DIR:-target}/release/onnx-slice" ]; then
  echo "test.sh: first build, in release mode: compiling every dependency takes several minutes (scripts/onnx-slice" \
       "shares this build, so whichever runs first pays for it)" >&2
fi
cargo test --release --locked "$@"
