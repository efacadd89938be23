#!/usr/bin/env bash
# Regenerates src/protobuf/onnx.rs from proto/onnx.proto (dev-only; needs no protoc installed).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --manifest-path scripts/gen-proto/Cargo.toml --target-dir target/gen-proto
