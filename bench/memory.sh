#!/usr/bin/env bash
# Peak memory (RSS and its anonymous part) and seconds per phase of one slicing run
# (bench/README.md, "Memory"). Builds the release binary first.
#
# usage: bench/memory.sh MODEL.onnx CALIB_IDS.npy OUT_FOLDER [more onnx-slice flags]
#   e.g. bench/memory.sh smollm2/model.onnx ../shared/tools/smollm2/calib_ids_n32.npy /tmp/out \
#          --calib-batch 8
# Writes OUT_FOLDER/model.onnx (and .data), OUT_FOLDER/report.json (seconds per phase) and
# OUT_FOLDER/memory.json (peaks, wall and CPU seconds).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=$1 ids=$2 out=$3
shift 3
mkdir -p "$out"
rm -f "$out/model.onnx" "$out/model.onnx.data"  # onnx-slice never replaces an existing output
(cd "$here" && cargo build --release --locked --quiet)
python3 "$here/bench/peak_memory.py" --json "$out/memory.json" -- \
  "$here/target/release/onnx-slice" "$model" -o "$out/model.onnx" --ratio 0.25 \
  --calib-ids "$ids" --quiet --report "$out/report.json" "$@"
python3 - "$out/report.json" <<'PY'
import json, sys
seconds = json.load(open(sys.argv[1]))["seconds"]
print("  ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in seconds.items()))
PY
