#!/usr/bin/env bash
# The CUDA execution provider end to end on the fixtures (bench/cuda_check.rs; bench/README.md).
# Runs a prebuilt example binary (no cargo needed), so it can run on a machine that only has the
# repository copy, the binary and ONNX Runtime's GPU build.
#
# Usage: bench/cuda-check.sh [BINARY] [MODEL.onnx...]
#   BINARY   default target/release/examples/cuda_check
#            (cargo build --release --features cuda --example cuda_check)
#   MODEL    default: every fixtures/<arch>/<exporter>/model.onnx
# Needs ORT_DYLIB_PATH: the onnxruntime-gpu libonnxruntime, with libonnxruntime_providers_cuda.so
# beside it. Writes ${OUT:-bench/out}/cuda_check.json and cuda_check.log; exits non-zero on FAIL.
# Calibration samples are CALIB_SEQLEN tokens long (default 128, the fixtures' position count:
# the library finds no position limit in the rotary exports without config.json, and at the
# CLI's 2048 the run takes 25 times longer).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/examples/cuda_check}"
shift $(( $# > 0 ))
out="${OUT:-bench/out}"
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the onnxruntime-gpu library (see bench/README.md)}"
[ -x "$bin" ] || { echo "cuda-check: no executable $bin; build it with: cargo build --release --features cuda --example cuda_check" >&2; exit 1; }
mkdir -p "$out"
"$bin" --ep cuda --json "$out/cuda_check.json" --calib-seqlen "${CALIB_SEQLEN:-128}" "$@" 2>&1 | tee "$out/cuda_check.log"
