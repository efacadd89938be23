#!/usr/bin/env bash
# Runs the test suite on a fresh machine: fetches ONNX Runtime's library and makes the test venvs
# (once), then cargo test in the release profile, the one scripts/onnx-slice builds, so that the
# two share one build.
#
#   scripts/test.sh           every test (what CI runs through .ci/run, before the wheel's test)
#   scripts/test.sh --fast    every test that needs no clients' venv: all but tests/clients.rs,
#                             which loads sliced folders in optimum and onnxruntime-genai (torch:
#                             a 5.7 GB venv). Minutes, after the first build.
# Other arguments go to cargo test (a test name filters).
set -euo pipefail
cd "$(dirname "$0")/.."
fast=
if [ "${1:-}" = --fast ]; then
  fast=1
  shift
fi
scripts/setup-ort.sh >/dev/null
scripts/setup-check.sh >/dev/null
[ -n "$fast" ] || scripts/setup-clients.sh >/dev/null
if [ ! -x "${CARGO_TARGET_DIR:-target}/release/onnx-slice" ]; then
  echo "test.sh: first build, in release mode: compiling every dependency takes several minutes (scripts/onnx-slice" \
       "shares this build, so whichever runs first pays for it)" >&2
fi
if [ -z "$fast" ]; then
  exec cargo test --release --locked "$@"
fi
# Every target but tests/clients.rs: the library's and the binary's unit tests, each other
# integration test and the doc tests (clippy --all-targets builds the examples).
targets=(--lib --bins)
for test in tests/*.rs; do
  name=$(basename "$test" .rs)
  [ "$name" = clients ] || targets+=(--test "$name")
done
cargo test --release --locked "${targets[@]}" "$@"
cargo test --release --locked --doc "$@"
