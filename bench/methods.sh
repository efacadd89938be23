#!/usr/bin/env bash
# Every method side by side on SmolLM2-135M at size targets (shares of the dense model's weight
# bytes), in one run: Brown perplexity, MLP and stream widths, weight bytes, and each run's wall
# and CPU seconds (bench/peak_memory.py). The same calibration ids (the reference's 32 × 512) and
# evaluation (Brown, 64 × 512, id 2 ignored) as bench/budgets.sh.
#
# Usage: bench/methods.sh [MODEL.onnx] [TOOLS_DIR]   (as bench/smollm2.sh)
# Environment: TARGETS (default "90% 80% 70%"), CONFIGS (default: every configuration below, by
# name), TABLE (default methods). Each finished run is appended to bench/out/$TABLE.rows and the
# table bench/out/$TABLE.md rebuilt from it, so an interrupted run keeps what it measured (delete
# the .rows file to start afresh).
#
# Configurations (name: flags):
#   slicegpt-global:       --method slicegpt --basis global
#   slicegpt-block-alloc:  --method slicegpt --basis block --allocate-widths
#   neurons:               --method neurons (widths allocated per block, the default)
#   neurons-uniform:       --method neurons --uniform-widths
#   combined:              --method combined
set -euo pipefail
default_table=methods
source "$(dirname "$0")/smollm2-common.sh"
read -r -a targets <<< "${TARGETS:-90% 80% 70%}"
declare -A flags=(
  [slicegpt-global]="--method slicegpt --basis global"
  [slicegpt-block-alloc]="--method slicegpt --basis block --allocate-widths"
  [neurons]="--method neurons"
  [neurons-uniform]="--method neurons --uniform-widths"
  [combined]="--method combined"
)
read -r -a configs <<< "${CONFIGS:-slicegpt-global slicegpt-block-alloc neurons neurons-uniform combined}"

table_from_rows() {
  python3 - "$out/$table.rows" > "$out/$table.md" <<'PY'
import json, sys
print("| target | method | weight bytes (% of dense) | stream widths | MLP widths (min–max) | Brown perplexity | wall s | CPU s |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    target, config, ppl, report, memory = line.rstrip("\n").split("\t")
    r, m = json.load(open(report)), json.load(open(memory))
    share = r["weight_bytes_after"] / r["weight_bytes_before"]
    sliced = r["widths"][:-1]
    stream = f"{min(sliced)}–{max(sliced)}" if min(sliced) != max(sliced) else f"{sliced[0]}"
    mlp = r.get("mlp_widths")
    mlp = f"{min(mlp)}–{max(mlp)}" if mlp else "1536"
    ppl = json.loads(ppl)["perplexity"]
    print(f"| {target} | {config} | {r['weight_bytes_after']:,} ({share:.1%}) | {stream} | {mlp} | {ppl:.2f} | {m['wall_seconds']:.1f} | {m['cpu_seconds']:.1f} |")
PY
}

for target in "${targets[@]}"; do
  for config in "${configs[@]}"; do
    name="$config-${target%\%}"
    sliced="$out/methods-$name.onnx"
    rm -f "$sliced" "$sliced.data"  # onnx-slice never replaces an existing output
    read -r -a these <<< "${flags[$config]}"
    python3 bench/peak_memory.py --json "$out/memory-$name.json" -- \
      "$bin" "$model" -o "$sliced" --target-size "$target" "${these[@]}" \
      --calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 --report "$out/report-$name.json" --quiet \
      ${slice_flags[@]+"${slice_flags[@]}"}
    ppl=$(evaluate "$sliced" | tr -d '\n')
    printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$config" "$ppl" "$out/report-$name.json" "$out/memory-$name.json" >> "$out/$table.rows"
    rm -f "$sliced" "$sliced.data"
    table_from_rows
  done
done
cat "$out/$table.md"
