#!/usr/bin/env bash
# Load and save throughput against `cp` of the same files (same process, same machine).
# Usage: bench/io.sh [MODEL.onnx] [REPEATS]
# Default model: SmolLM2-135M's optimum export built by the shared smollm2 tool
# (~/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx), else a fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
default="$HOME/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx"
[ -f "$default" ] || default=fixtures/phi/genai/model.onnx
cargo run --quiet --release --locked --example io_bench -- "${1:-$default}" "${2:-3}"
