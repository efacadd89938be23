#!/usr/bin/env bash
# The CUDA execution provider, end to end, on a machine with an NVIDIA GPU (see bench/README.md,
# "CUDA check"). ORT_DYLIB_PATH must point at an onnxruntime-gpu build's libonnxruntime.
#
# usage: bench/cuda.sh BIN_DIR [OUT_DIR]
#   BIN_DIR holds: onnx-slice and cuda_check (release builds with the `cuda` feature),
#   config.json (SmolLM2-135M's), calib_ids_n32.npy and eval_ids_brown.npy (../shared/tools/smollm2).
# 1. bench/cuda-check.sh over every fixture (CUDA vs CPU EP; ratio 0 must keep the logits ≤ 1e-4).
# 2. A SmolLM2-135M-shaped model with random weights (PyTorch's dynamo exporter; the pretrained
#    weights are not needed for timing), sliced at 0.25 on the CUDA EP and on the CPU EP, from the
#    same 32 × 512 calibration ids; each result's perplexity on the Brown ids (meaningless in
#    absolute terms for random weights, but the two must agree).
set -uo pipefail
bin=${1:?usage: bench/cuda.sh BIN_DIR [OUT_DIR]}
out=${2:-${OUT:-bench/out}}
mkdir -p "$out"
nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$out/gpu.txt"

CALIB_SEQLEN=${CALIB_SEQLEN:-128} OUT="$out" bench/cuda-check.sh "$bin/cuda_check"
echo "cuda_check exit status: $?"

work=$(mktemp -d)
python3 bench/random_llama_export.py "$bin/config.json" "$work/model.onnx" 2>&1 | grep -v Warning | tail -3
for ep in cuda cpu; do
  start=$(date +%s%N)
  "$bin/onnx-slice" "$work/model.onnx" -o "$work/sliced-$ep.onnx" --ratio 0.25 --ep "$ep" \
    --calib-ids "$bin/calib_ids_n32.npy" --calib-batch 8 --report "$out/report-$ep.json" --quiet
  status=$?
  echo "slice on $ep: exit $status, $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print({k: round(v, 2) for k, v in r["seconds"].items()})' "$out/report-$ep.json"
done
for model in model sliced-cuda sliced-cpu; do
  "$bin/onnx-slice" eval "$work/$model.onnx" --ids "$bin/eval_ids_brown.npy" --ignore-id 2 --batch 8 --ep cuda --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(sys.argv[1], "perplexity", r["perplexity"], "eval seconds", round(r["seconds"], 2), r["ep"])' "$model"
done
rm -rf "$work"
