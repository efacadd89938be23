#!/usr/bin/env bash
# SliceGPT on a real model, SmolLM2-135M (LLaMA architecture), against the reference
# implementation's numbers in ../shared/tools/smollm2/REFERENCE.md: same calibration ids
# (32 × 512), same evaluation windows (Brown, 64 × 512, id 2 ignored), ratios 0 … 0.3.
#
# Usage: bench/smollm2.sh [MODEL.onnx] [TOOLS_DIR]
#   MODEL.onnx  the optimum export built by ../shared/tools/smollm2/make_smollm2_onnx.sh
#               (default ~/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx)
#   TOOLS_DIR   the folder with calib_ids_n32.npy and eval_ids_brown.npy (default ../shared/tools/smollm2)
# Environment: SLICE_FLAGS, extra flags for every slicing (e.g. --center-embeddings); TABLE, the
# table's name (default smollm2).
# Needs /usr/bin/time (Debian package `time`) for peak memory. Writes bench/out/$TABLE.md.
set -euo pipefail
default_table=smollm2
source "$(dirname "$0")/smollm2-common.sh"

rows=()
dense=$(evaluate "$model")
rows+=("dense|$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["perplexity"])' "$dense")|||||")
for ratio in 0 0.1 0.2 0.25 0.3; do
  sliced="$out/smollm2-$ratio.onnx"
  rm -f "$sliced" "$sliced.data"  # onnx-slice never replaces an existing output
  /usr/bin/time -f "%e %M" -o "$out/time-$ratio.txt" \
    "$bin" "$model" -o "$sliced" --ratio "$ratio" --basis point --calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 \
    --report "$out/report-$ratio.json" --quiet ${slice_flags[@]+"${slice_flags[@]}"}
  ppl=$(evaluate "$sliced")
  rows+=("$ratio|$(python3 - "$ppl" "$out/report-$ratio.json" "$out/time-$ratio.txt" <<'PY'
import json, sys
ppl = json.loads(sys.argv[1])["perplexity"]
report = json.load(open(sys.argv[2]))
wall, rss_kb = open(sys.argv[3]).read().split()
k = min(report["widths"])
print(f'{ppl}|{k}|{report["parameters_after"]}|{report["file_bytes_after"]}|{float(wall):.1f}|{int(rss_kb) / 1e6:.2f}')
PY
)")
done
rm -f "$out"/smollm2-*.onnx "$out"/smollm2-*.onnx.data

python3 - "${rows[@]}" > "$out/$table.md" <<'PY'
import sys
reference = {  # ../shared/tools/smollm2/REFERENCE.md (TransformerCompression @6b12cde, CPU, 2 threads)
    "dense": (37.280, None), "0": (37.345, 92.6), "0.1": (80.506, 94.0), "0.2": (168.734, 88.8),
    "0.25": (219.240, 89.7), "0.3": (298.813, 84.1),
}
print("| ratio | k | perplexity (Brown) | reference | Δ | parameters | file bytes | onnx-slice s | reference s | speed-up | peak RSS GB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in sys.argv[1:]:
    ratio, ppl, k, params, size, wall, rss = row.split("|")
    ref_ppl, ref_s = reference[ratio]
    delta = f"{100 * (float(ppl) / ref_ppl - 1):+.2f} %"
    speed = f"{ref_s / float(wall):.2f}×" if wall else ""
    params = f"{int(params):,}" if params else ""
    size = f"{int(size):,}" if size else ""
    print(f"| {ratio} | {k or 576} | {float(ppl):.3f} | {ref_ppl} | {delta} | {params} | {size} | {wall} | {ref_s or ''} | {speed} | {rss} |")
PY
cat "$out/$table.md"
