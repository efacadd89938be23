#!/usr/bin/env bash
# Slice, then quantize (issue 24): SmolLM2-135M dense and sliced, quantized by ONNX Runtime's own
# quantizers (int8 quantize_dynamic with its defaults; int4 MatMulNBits, block 32, symmetric),
# perplexity from `onnx-slice eval`. bench/quantize.py does the work; this script makes the Python
# environment once, writes the models, and runs the phases.
#
# Usage: bench/quantize.sh [PHASE ...]      (default: models table)
#   models     the sliced models, written once to bench/out/quant/models/ (kept when present)
#   table      float / int8 / int4 perplexity and bytes of every model (WINDOWS, default 64)
#   diagnose   per-kind ranking, each kind quantized alone and all but each kind
#              (DIAG_WINDOWS, default 16), for DIAG_MODELS (default: all)
#   layers     per-layer ranking of the worst kinds (LAYER_KINDS, e.g. "s80-global:int8:down")
#   experiments   exclusions, rotations, the last skip as a Pad, int8's weights and activations
#              apart (EXP_WINDOWS, default 8)
#   recipe     every basis and method at 80 %, quantized as the README says (WINDOWS, default 16)
# Environment: MODEL (the dense optimum export, float32; default the one make_smollm2_onnx.sh
# builds), TOOLS (calibration and evaluation ids), ONNX_SLICE_BIN (default: a release build of
# this checkout, built if missing), PYTHON (a python with onnxruntime, onnx, onnx_ir and numpy;
# default: a venv made once with the pinned versions below).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:-$HOME/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx}"
tools="${TOOLS:-../shared/tools/smollm2}"
out=bench/out/quant
mkdir -p "$out/models"

quant_python() {
  local home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
  local venv="$home/venv-quant"
  if ! "$venv/bin/python" -c "
import onnxruntime, onnx, onnx_ir, numpy, sys
sys.exit(onnxruntime.__version__ != '1.31.1')" 2>/dev/null; then
    echo "quantize.sh: creating $venv (onnxruntime 1.31.1, the version onnx-slice runs; once)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "onnxruntime==1.31.1" "onnx==1.23.2" "onnx_ir==1.1.0" "numpy==2.4.6" >&2
  fi
  echo "$venv/bin/python"
}
python="${PYTHON:-$(quant_python)}"

if [ -z "${ONNX_SLICE_BIN:-}" ]; then
  scripts/setup-ort.sh >/dev/null
  cargo build --quiet --release --locked
  ONNX_SLICE_BIN=target/release/onnx-slice
fi
export ONNX_SLICE_BIN
bin="$ONNX_SLICE_BIN"
q() { "$python" bench/quantize.py --ids "$tools/eval_ids_brown.npy" "$@"; }

m="$out/models"
calib=(--calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8)
# name|flags: the exact rewrites at full width (no slicing) separate the rewrite from the slicing
configs=(
  "r0-identity|--ratio 0 --orientation identity"
  "r0-random|--ratio 0 --orientation random-basis --seed 1"
  "r0-pca|--ratio 0 ${calib[*]}"
  "s80-global|--target-size 80% ${calib[*]}"
  "s80-block-alloc|--target-size 80% --basis block --allocate-widths ${calib[*]}"
  "s80-point|--target-size 80% --basis point ${calib[*]}"
)
names=(dense)
for c in "${configs[@]}"; do names+=("${c%%|*}"); done
path() { if [ "$1" = dense ]; then echo "$model"; else echo "$m/$1.onnx"; fi; }

phase_models() {
  for c in "${configs[@]}"; do
    local name="${c%%|*}" flags
    read -r -a flags <<< "${c#*|}"
    [ -f "$m/$name.onnx" ] && continue
    echo "== $name: onnx-slice ${flags[*]}" >&2
    "$bin" "$model" -o "$m/$name.onnx" "${flags[@]}" >&2
  done
}

phase_table() {
  local specs=()
  for n in "${names[@]}"; do specs+=("$n=$(path "$n")"); done
  q table --windows "${WINDOWS:-64}" "${specs[@]}" | tee "$out/table-w${WINDOWS:-64}.md"
}

phase_diagnose() {
  for n in ${DIAG_MODELS:-${names[*]}}; do
    for s in int8 int4; do
      q diagnose "$(path "$n")" --scheme "$s" --windows "${DIAG_WINDOWS:-8}" \
        --modes "${DIAG_MODES:-alone,without}" | tee "$out/diagnose-$n-$s.md"
    done
  done
}

phase_layers() {
  for spec in ${LAYER_KINDS:-}; do
    IFS=: read -r n s kinds <<< "$spec"
    q diagnose "$(path "$n")" --scheme "$s" --windows "${LAYER_WINDOWS:-8}" --modes alone \
      --layers "$kinds" | tee "$out/layers-$n-$s-${kinds//,/+}.md"
  done
}

phase_experiments() {
  # exact rewrites (float logits checked against the input's): a randomized Hadamard rotation
  # inside each basis group, and the unsliced last point's basis chosen so that the last skip is a
  # zero Pad instead of a k × D MatMul
  [ -f "$m/s80-global-had.onnx" ] ||
    q rotate "$m/s80-global.onnx" "$m/s80-global-had.onnx" --rotation hadamard --seed 1 --check
  [ -f "$m/s80-global-pad.onnx" ] ||
    q padskip "$m/s80-global.onnx" "$m/s80-global-pad.onnx" --check
  [ -f "$m/s80-global-had-pad.onnx" ] ||
    q padskip "$m/s80-global-had.onnx" "$m/s80-global-had-pad.onnx" --check
  [ -f "$m/r0-pca-had.onnx" ] ||
    q rotate "$m/r0-pca.onnx" "$m/r0-pca-had.onnx" --rotation hadamard --seed 1 --check
  [ -f "$m/s80-block-alloc-rnd.onnx" ] ||
    q rotate "$m/s80-block-alloc.onnx" "$m/s80-block-alloc-rnd.onnx" --rotation random --seed 1 --check
  local w="${EXP_WINDOWS:-8}" ad=emb_adapter,head_adapter
  q table --windows "$w" \
    "s80-global=$m/s80-global.onnx" \
    "s80-global, last skip a Pad=$m/s80-global-pad.onnx" \
    "s80-global, Hadamard, last skip a Pad=$m/s80-global-had-pad.onnx" \
    "s80-global, Hadamard, last skip a Pad, adapters float=$m/s80-global-had-pad.onnx:$ad" \
    "s80-block-alloc=$m/s80-block-alloc.onnx" \
    "s80-block-alloc, shortcuts float=$m/s80-block-alloc.onnx:shortcut" \
    "s80-point=$m/s80-point.onnx" "s80-point, shortcuts float=$m/s80-point.onnx:shortcut" \
    "r0-pca=$m/r0-pca.onnx" "r0-pca, adapters float=$m/r0-pca.onnx:$ad" \
    "r0-random=$m/r0-random.onnx" "r0-random, adapters float=$m/r0-random.onnx:$ad" \
    "s80-global, last skip a Pad, adapters float=$m/s80-global-pad.onnx:$ad" \
    "s80-block-alloc, random rotations, shortcuts float=$m/s80-block-alloc-rnd.onnx:shortcut" \
    "s80-block-alloc, shortcuts + adapters float=$m/s80-block-alloc.onnx:shortcut,$ad" \
    "s80-global, Hadamard=$m/s80-global-had.onnx" \
    "r0-pca, Hadamard, adapters float=$m/r0-pca-had.onnx:$ad" \
    | tee "$out/experiments-w$w.md"
  q split --windows "$w" "dense=$model" "r0-identity=$m/r0-identity.onnx" \
    "r0-pca=$m/r0-pca.onnx" "s80-global=$m/s80-global.onnx" | tee "$out/split-w$w.md"
}

# The README's recipe on every basis and method at 80 % of the dense bytes, written by this
# checkout's onnx-slice (models kept in bench/out/quant/recipe/ when present): float, then int8 and
# int4 with nodes_to_exclude from each model's metadata (none for dense and neurons).
recipe_configs=(
  "slicegpt-global|--target-size 80% --method slicegpt --basis global"
  "slicegpt-block|--target-size 80% --method slicegpt --basis block"
  "slicegpt-point|--target-size 80% --method slicegpt --basis point"
  "slicegpt-block-alloc|--target-size 80% --method slicegpt --basis block --allocate-widths"
  "neurons|--target-size 80% --method neurons"
  "combined|--target-size 80% --method combined"
)

phase_recipe() {
  local r="$out/recipe" specs=("dense=$model:recipe")
  mkdir -p "$r"
  for c in "${recipe_configs[@]}"; do
    local name="${c%%|*}" flags
    read -r -a flags <<< "${c#*|}"
    if [ ! -f "$r/$name.onnx" ]; then
      echo "== $name: onnx-slice ${flags[*]}" >&2
      "$bin" "$model" -o "$r/$name.onnx" "${flags[@]}" "${calib[@]}" --report "$r/$name.json" \
        --quiet >&2
    fi
    specs+=("$name=$r/$name.onnx:recipe")
  done
  q table --windows "${WINDOWS:-16}" "${specs[@]}" | tee "$out/recipe-w${WINDOWS:-16}.md"
}

for phase in "${@:-models table}"; do
  for p in $phase; do "phase_$p"; done
done
