#!/usr/bin/env bash
# Inference speed of SmolLM2-135M sliced by onnx-slice against the dense model, in ONNX Runtime on
# the CPU, in one run per export (bench/speed.py: interleaved rounds, medians, fused-op counts, and
# with PROFILE=1 where the time goes per operator type).
#
# Usage: bench/speed.sh [EXPORTS_DIR] [TOOLS_DIR]
#   EXPORTS_DIR  the folder with optimum's `plain/` (no KV cache) and `past/` (KV cache) exports,
#                built by ../shared/tools/smollm2/make_smollm2_onnx.sh
#                (default ~/.cache/onnx-slice-models/smollm2/smollm2-onnx)
#   TOOLS_DIR    the folder with calib_ids_n32.npy (default ../shared/tools/smollm2)
# Environment: SET (bases or methods, below), THREADS (ONNX Runtime's intra-op threads, default 1),
# REPS (rounds, default 5),
# CLOCK (wall or cpu, default wall; cpu times the process's CPU seconds, for a shared machine),
# EXPORTS (default "past": prefill runs with an empty cache there, decode needs it; add "plain" for
# the export without KV cache), PROFILE=1, PYTHON (a python
# with onnxruntime, onnx and numpy; default: a venv made once with the pinned versions below).
# The sliced models are written once to bench/out/speed/EXPORT/NAME/ and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
exports="${1:-$HOME/.cache/onnx-slice-models/smollm2/smollm2-onnx}"
tools="${2:-../shared/tools/smollm2}"
threads="${THREADS:-1}"
reps="${REPS:-5}"
out=bench/out/speed

bench_python() {
  local home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
  local venv="$home/venv-bench"
  if ! "$venv/bin/python" -c "import onnxruntime, onnx, numpy" 2>/dev/null; then
    echo "speed.sh: creating $venv (onnxruntime 1.31.1, the version onnx-slice runs; once)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
      "onnxruntime==1.31.1" "onnx==1.23.2" "numpy<3" >&2
  fi
  echo "$venv/bin/python"
}
python="${PYTHON:-$(bench_python)}"

scripts/setup-ort.sh >/dev/null
cargo build --quiet --release --locked
bin=target/release/onnx-slice

# name|flags. SET=bases (default): the command line's defaults at ratio 0.25, then 75 % of the
# dense weight bytes with each basis (the size-honest comparison: the same bytes, the width each
# basis affords). SET=methods: every method at 80 % and 75 % of the dense weight bytes.
case "${SET:-bases}" in
  bases)
    configs=(
      "ratio0.25-global|--ratio 0.25"
      "size75-global|--target-size 75% --basis global"
      "size75-block|--target-size 75% --basis block"
      "size75-point|--target-size 75% --basis point"
    ) ;;
  methods)
    configs=()
    for size in 80 75; do
      configs+=(
        "size$size-slicegpt-global|--target-size $size% --method slicegpt --basis global"
        "size$size-slicegpt-block-alloc|--target-size $size% --method slicegpt --basis block --allocate-widths"
        "size$size-neurons|--target-size $size% --method neurons"
        "size$size-combined|--target-size $size% --method combined"
      )
    done ;;
  *) echo "speed.sh: SET is bases or methods" >&2; exit 2 ;;
esac
profile=()
[ "${PROFILE:-0}" = 1 ] && profile=(--profile)
for export in ${EXPORTS:-past}; do
  dense="$exports/$export"
  dirs=("$dense")
  for config in "${configs[@]}"; do
    name="${config%%|*}"
    read -r -a flags <<< "${config#*|}"
    dir="$out/$export/$name"
    if [ ! -f "$dir/model.onnx" ]; then
      mkdir -p "$dir"
      "$bin" "$dense/model.onnx" -o "$dir/model.onnx" "${flags[@]}" \
        --calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 --report "$dir/report.json" --quiet
      cp "$dense/config.json" "$dir/"
    fi
    dirs+=("$dir")
  done
  echo "## $export export ($dense)"
  "$python" bench/speed.py "${dirs[@]}" --threads "$threads" --reps "$reps" --clock "${CLOCK:-wall}" \
    ${profile[@]+"${profile[@]}"}
done
