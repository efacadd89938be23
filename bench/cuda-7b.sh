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
#          from two slice runs' reports (different calibration sizes, same sequence length): the
#          seconds per token of the phases that grow with the tokens (runtime, pca: a line through
#          both runs), the others as the larger run had them, and the command's time at TOKENS
#          calibration tokens (default 1024 × 2048, the paper's setting)
# CONFIG=config.json exports another shape; EP=cpu slices on the CPU (to try the script without a GPU).
#        bench/cuda-7b.sh scale WORK BINARY OUT [SMALL LARGE]
#          the two runs extrapolate needs, in one call: random ids of SMALL and LARGE samples ×
#          2048 tokens (default 16 and 64), sliced at --calib-batch 4 into OUT/small and
#          OUT/large, then extrapolate; the GPU's device time is short, so start generate in the
#          background first and keep LARGE to what fits one call
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
scale)
  bin=${3:?missing BINARY} out=${4:?missing OUT} small=${5:-16} large=${6:-64}
  mkdir -p "$out"
  for n in "$small" "$large"; do
    python3 -c "import numpy as np, sys; np.save(sys.argv[1], np.random.default_rng(0).integers(3, 32000, size=(int(sys.argv[2]), 2048), dtype=np.int64))" \
      "$out/ids-$n.npy" "$n"
  done
  "$0" slice "$work" "$bin" "$out/ids-$small.npy" "$out/small" --calib-batch 4 || exit $?
  "$0" slice "$work" "$bin" "$out/ids-$large.npy" "$out/large" --calib-batch 4 || exit $?
  "$0" extrapolate "$out/small" "$out/large"
  ;;
extrapolate)
  small=$work large=${3:?missing LARGE_OUT} tokens=${4:-2097152}
  python3 - "$small" "$large" "$tokens" <<'PY'
import json, sys
small, large = (json.load(open(f"{d}/report.json")) for d in sys.argv[1:3])
tokens = int(sys.argv[3])
n = [r["calibration_tokens"] for r in (small, large)]
total = 0.0
# Only the segment runs and the statistics grow with the tokens; the rest (fuse, session, rotate,
# save) is per model, taken from the larger run.
growing = {"runtime_seconds", "pca_seconds"}
for phase in small["seconds"]:
    if phase == "total_seconds":
        continue
    a, b = small["seconds"][phase], large["seconds"][phase]
    if phase not in growing:
        total += b
        print(f"{phase.removesuffix('_seconds'):>8}: {a:8.1f} s and {b:8.1f} s: per model -> {b:8.1f} s")
        continue
    per_token = (b - a) / (n[1] - n[0])
    fixed = a - per_token * n[0]
    at = fixed + per_token * tokens
    total += at
    print(f"{phase.removesuffix('_seconds'):>8}: {a:8.1f} s at {n[0]} tokens, {b:8.1f} s at {n[1]}: "
          f"{fixed:7.1f} s + {per_token * 1e3:.4f} ms/token -> {at:8.1f} s at {tokens}")
print(f"   total: {total:.0f} s ({total / 60:.1f} min) at {tokens} tokens (runtime and pca: a line through the two runs)")
PY
  ;;
*)
  echo "unknown verb $verb" >&2
  exit 2
  ;;
esac
