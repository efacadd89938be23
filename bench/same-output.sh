#!/usr/bin/env bash
# A refactoring check: runs one onnx-slice binary over a fixed set of slicings (every fixture with
# a random basis and with PCA at each basis option, targets with and without allocated widths,
# folders in and out, float16/bfloat16, and optionally SmolLM2-135M) and writes the SHA-256 of
# every output file, one line per file, to OUT/sums.txt. Run it with the binary before a change
# and the one after, then compare the two sums files: a change meant to keep behaviour must leave
# them identical.
#
# Usage: bench/same-output.sh BINARY OUT_DIR
# Environment: SMOLLM2=path/to/model.onnx adds three slicings of SmolLM2-135M (a minute or two
# each); TOOLS (default ../shared/tools/smollm2) has its calibration ids.
#
#   bench/same-output.sh /tmp/before/onnx-slice /tmp/same-before
#   bench/same-output.sh target/release/onnx-slice /tmp/same-after
#   diff /tmp/same-before/sums.txt /tmp/same-after/sums.txt && echo identical
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(realpath "$1")"
out="$2"
tools="${TOOLS:-../shared/tools/smollm2}"
rm -rf "$out"
mkdir -p "$out"
calib=(--calib fixtures/calibration.txt --tokenizer fixtures/_hf/llama/tokenizer.json --calib-samples 8 --calib-seqlen 32 --quiet)

run() { # name, then the arguments after MODEL -o OUT
  local name="$1" model="$2"
  shift 2
  "$bin" "$model" -o "$out/$name" "$@" > "$out/$name.log" 2>&1 || echo "exit $?" >> "$out/$name.log"
}

for model in fixtures/*/*/model.onnx; do
  case "$model" in */lowp/*) continue ;; esac
  tag=$(echo "$model" | cut -d/ -f2,3 | tr / _)
  run "$tag-random.onnx" "$model" --ratio 0.25 --orientation random-basis --seed 3 --quiet
  for basis in point block global; do
    run "$tag-pca-$basis.onnx" "$model" --ratio 0.25 --basis "$basis" "${calib[@]}"
  done
done
for arch in llama gpt2 phi gpt_neox; do
  model=fixtures/$arch/optimum/model.onnx
  run "$arch-target-block-alloc.onnx" "$model" --target-size 85% --basis block --allocate-widths "${calib[@]}"
  run "$arch-target-global.onnx" "$model" --target-size 85% "${calib[@]}"
  run "$arch-center-head.onnx" "$model" --ratio 0.3 --center-embeddings --slice-head "${calib[@]}"
  run "$arch-identity-ext.onnx" "$model" --ratio 0.5 --orientation identity --external-data --quiet
done
run "llama-optimum-folder" fixtures/llama/optimum --ratio 0.25 "${calib[@]}"
run "qwen2-genai-folder" fixtures/qwen2/genai --ratio 0.25 --basis point "${calib[@]}"
for model in fixtures/lowp/*/*/model.onnx; do
  tag=$(echo "$model" | cut -d/ -f3,4 | tr / _)
  run "lowp-$tag-random.onnx" "$model" --ratio 0.25 --orientation random-basis --seed 3 --quiet
  run "lowp-$tag-pca.onnx" "$model" --ratio 0.25 "${calib[@]}"
done
if [ -n "${SMOLLM2:-}" ]; then
  ids=(--calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 --quiet)
  run smollm2-global-80.onnx "$SMOLLM2" --target-size 80% "${ids[@]}"
  run smollm2-block-alloc-80.onnx "$SMOLLM2" --target-size 80% --basis block --allocate-widths "${ids[@]}"
  run smollm2-point-25.onnx "$SMOLLM2" --ratio 0.25 --basis point "${ids[@]}"
fi
# Every output file, and the last line of every log (the summary or the error), hashed.
(cd "$out" && find . -type f ! -name sums.txt ! -name '*.log' | sort | xargs sha256sum) > "$out/sums.txt"
for log in "$out"/*.log; do
  printf '%s  %s\n' "$(tail -n 1 "$log" | sed 's/[0-9.]* s\b/T s/g' | sha256sum | cut -c1-16)" "$(basename "$log")"
done >> "$out/sums.txt"
wc -l < "$out/sums.txt"
