#!/usr/bin/env bash
# The LLaMA-2-7B-shaped float16 export sliced on the CUDA EP (bench/README.md, "The 7B float16
# model on the CUDA EP"). For the GPU machine: it has PyTorch and onnxruntime's Python package but
# no network, so the model (random weights) is exported there.
#
# usage: bench/cuda-7b.sh generate WORK
#          exports bench/configs/llama2-7b.json as float16 to WORK/model.onnx (13.5 GB of external
#          data); start it in the background early, it needs no GPU
#        bench/cuda-7b.sh slice WORK BINARY IDS.npy OUT [more onnx-slice flags]
#          waits for WORK/model.onnx, slices it at 0.25 on the CUDA EP (ORT_DYLIB_PATH: an
#          onnxruntime-gpu build) under bench/peak_memory.py, sampling the GPU's memory in use
#          every 0.5 s; writes OUT/report.json, OUT/memory.json, OUT/gpu-memory.csv
#        bench/cuda-7b.sh extrapolate SMALL_OUT LARGE_OUT [TOKENS]
#          from two slice runs' reports (different calibration sizes, same sequence length): each
#          phase's seconds per token (a line through both runs) and the command's time at TOKENS
#          calibration tokens (default 1024 × 2048, the paper's setting)
# CONFIG=config.json exports another shape; EP=cpu slices on the CPU (to try the script without a GPU).
# One device call: generate in the background, then slice at 16 × 2048 and 64 × 2048 random ids
# (--calib-batch 4), then extrapolate.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
verb=${1:?usage: bench/cuda-7b.sh generate WORK | slice WORK BINARY IDS.npy OUT [flags]}
work=${2:?missing WORK}
case "$verb" in
generate)
  mkdir -p "$work"
  start=$(date +%s)
  python3 "$here/bench/random_llama_export.py" "${CONFIG:-$here/bench/configs/llama2-7b.json}" "$work/model.onnx" \
    --dtype float16 > "$work/generate.log" 2>&1
  status=$?
  echo "generate exit $status after $(( $(date +%s) - start )) s" >> "$work/generate.log"
  touch "$work/generated"
  ;;
slice)
  bin=${3:?missing BINARY} ids=${4:?missing IDS.npy} out=${5:?missing OUT}
  shift 5
  mkdir -p "$out" "$work/sliced"
  rm -f "$work/sliced/model.onnx" "$work/sliced/model.onnx.data"  # never replaced by onnx-slice
  while [ ! -f "$work/generated" ]; do sleep 2; done
  tail -2 "$work/generate.log"
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$out/gpu-memory.csv" 2>&1 &
  sampler=$!
  python3 "$here/bench/peak_memory.py" --timeline 5 --json "$out/memory.json" -- \
    "$bin" "$work/model.onnx" -o "$work/sliced/model.onnx" --ratio 0.25 --ep "${EP:-cuda}" \
    --calib-ids "$ids" --quiet --report "$out/report.json" "$@"
  status=$?
  kill "$sampler" 2>/dev/null
  echo "slice exit $status"
  [ "$status" -eq 0 ] || exit "$status"
  du -sb "$work/sliced" 2>/dev/null
  python3 - "$out" <<'PY'
import csv, json, sys
# peak_memory.py has printed wall, CPU and memory already.
out = sys.argv[1]
seconds = json.load(open(f"{out}/report.json"))["seconds"]
print("  ".join(f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in seconds.items()))
used = [int(row[1]) for row in csv.reader(open(f"{out}/gpu-memory.csv")) if len(row) == 2 and row[1].strip().isdigit()]
print(f"GPU memory in use: peak {max(used) / 1024:.1f} GiB over {len(used)} samples" if used else "no GPU memory samples")
PY
  ;;
extrapolate)
  small=$work large=${3:?missing LARGE_OUT} tokens=${4:-2097152}
  python3 - "$small" "$large" "$tokens" <<'PY'
import json, sys
small, large = (json.load(open(f"{d}/report.json")) for d in sys.argv[1:3])
tokens = int(sys.argv[3])
n = [r["calibration_tokens"] for r in (small, large)]
total = 0.0
for phase in small["seconds"]:
    if phase == "total_seconds":
        continue
    a, b = small["seconds"][phase], large["seconds"][phase]
    per_token = (b - a) / (n[1] - n[0])
    fixed = a - per_token * n[0]
    at = fixed + per_token * tokens
    total += at
    print(f"{phase.removesuffix('_seconds'):>8}: {a:8.1f} s at {n[0]} tokens, {b:8.1f} s at {n[1]}: "
          f"{fixed:7.1f} s + {per_token * 1e3:.4f} ms/token -> {at:8.1f} s at {tokens}")
print(f"   total: {total:.0f} s ({total / 60:.1f} min) at {tokens} tokens (a line through two runs, per phase)")
PY
  ;;
*)
  echo "unknown verb $verb" >&2
  exit 2
  ;;
esac
