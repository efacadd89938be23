#!/usr/bin/env bash
# SmolLM2-135M sliced to size targets (shares of the dense model's weight bytes) with every --basis
# option, side by side in one run: perplexity (Brown), widths, bytes, slicing time; against the
# reference implementation's perplexity interpolated at the same size from
# ../shared/tools/smollm2/REFERENCE.md (its parameter counts include its untied head and shortcuts;
# everything is fp32, so bytes = 4 × parameters on both sides).
#
# Usage: bench/budgets.sh [MODEL.onnx] [TOOLS_DIR]   (as bench/smollm2.sh)
# Environment: BASES (default "point block global"), TARGETS (default "80% 90% 70%"), WIDTHS
# (default "uniform"; "uniform allocated" adds --allocate-widths runs), SLICE_FLAGS (extra flags
# for every slicing), TABLE (default budgets), TIMES_ONLY=1 (slice only, no evaluation: each
# option's seconds per phase and the process's CPU seconds side by side; table $TABLE-times. CPU
# seconds compare the options on a shared machine too, where wall seconds measure the neighbours). Each finished run is appended to
# bench/out/$TABLE.rows, and the table bench/out/$TABLE.md is rebuilt from it, so an interrupted
# run keeps what it measured (delete the .rows file to start afresh).
set -euo pipefail
default_table=budgets
source "$(dirname "$0")/smollm2-common.sh"
read -r -a bases <<< "${BASES:-point block global}"
read -r -a targets <<< "${TARGETS:-80% 90% 70%}"
read -r -a widths <<< "${WIDTHS:-uniform}"

table_from_rows() {
  python3 - "$out/$table.rows" > "$out/$table.md" <<'PY'
import json, sys
DENSE = 134_515_008  # parameters of the dense model (tied)
# (parameters incl. shortcuts, perplexity) of the reference at ratios 0 … 0.5 (REFERENCE.md).
REFERENCE = [(182_697_984, 37.345), (163_708_928, 80.506), (147_489_984, 168.734), (140_652_288, 219.240),
             (131_641_088, 298.813), (122_750_720, 398.926), (116_162_240, 483.136), (109_641_728, 550.028),
             (101_053_440, 671.664)]

def reference_at(share):
    """The reference's perplexity at `share` of the dense size, linear between its measured sizes."""
    points = sorted((p / DENSE, ppl) for p, ppl in REFERENCE)
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if s0 <= share <= s1:
            return p1 + (p0 - p1) * (s1 - share) / (s1 - s0)
    return None

print("| target | basis | widths | k (min–max) | shortcut params | weight bytes (% of dense) | perplexity | reference at the same bytes | reference / onnx-slice | slicing s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    target, basis, widths, seconds, ppl, report = line.rstrip("\n").split("\t")
    ppl = json.loads(ppl)["perplexity"]
    r = json.load(open(report))
    share = r["weight_bytes_after"] / r["weight_bytes_before"]
    sliced = r["widths"][:-1]
    ref = reference_at(share)
    smallest = REFERENCE[-1]
    ref_text = f"{ref:.1f}" if ref else f"> {smallest[1]} (its smallest model is {smallest[0] / DENSE:.1%})"
    gain = f"{ref / ppl:.2f}×" if ref else f"> {smallest[1] / ppl:.2f}×"
    print(f"| {target} | {basis} | {widths} | {min(sliced)}–{max(sliced)} | {r['shortcut_parameters']:,} | {r['weight_bytes_after']:,} ({share:.1%}) | {ppl:.2f} | {ref_text} | {gain} | {seconds} |")
PY
}

times_from_rows() {
  python3 - "$out/$table-times.rows" > "$out/$table-times.md" <<'PY'
import json, sys
phases = ["fuse", "session", "runtime", "pca", "rotate", "save", "total"]
print("| target | basis | widths | " + " | ".join(f"{p} s" for p in phases) + " | CPU s | peak RSS GiB |")
print("|---|---|---|" + "---|" * (len(phases) + 2))
for line in open(sys.argv[1]):
    target, basis, widths, report, memory = line.rstrip("\n").split("\t")
    seconds = json.load(open(report))["seconds"]
    memory = json.load(open(memory))
    cells = [f"{seconds[p + '_seconds']:.1f}" for p in phases]
    cells += [f"{memory['cpu_seconds']:.1f}", f"{memory['peak_rss_bytes'] / 2**30:.2f}"]
    print(f"| {target} | {basis} | {widths} | " + " | ".join(cells) + " |")
PY
}

for target in "${targets[@]}"; do
  for width in "${widths[@]}"; do
    for basis in "${bases[@]}"; do
      name="$basis-$width-${target%\%}"
      sliced="$out/budget-$name.onnx"
      rm -f "$sliced" "$sliced.data"  # onnx-slice never replaces an existing output
      allocate=(); [ "$width" = allocated ] && allocate=(--allocate-widths)
      start=$(date +%s.%N)
      python3 bench/peak_memory.py --json "$out/memory-$name.json" -- \
        "$bin" "$model" -o "$sliced" --target-size "$target" --basis "$basis" ${allocate[@]+"${allocate[@]}"} \
        --calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 --report "$out/report-$name.json" --quiet \
        ${slice_flags[@]+"${slice_flags[@]}"}
      seconds=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
      if [ "${TIMES_ONLY:-0}" = 1 ]; then
        printf '%s\t%s\t%s\t%s\t%s\n' "$target" "$basis" "$width" "$out/report-$name.json" "$out/memory-$name.json" >> "$out/$table-times.rows"
        rm -f "$sliced" "$sliced.data"
        times_from_rows
        continue
      fi
      ppl=$(evaluate "$sliced" | tr -d '\n')
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$target" "$basis" "$width" "$seconds" "$ppl" "$out/report-$name.json" >> "$out/$table.rows"
      rm -f "$sliced" "$sliced.data"
      table_from_rows
    done
  done
done
if [ "${TIMES_ONLY:-0}" = 1 ]; then cat "$out/$table-times.md"; else cat "$out/$table.md"; fi
