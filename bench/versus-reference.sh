#!/usr/bin/env bash
# onnx-slice against the reference SliceGPT side by side, on this machine, in one run: the
# reference's rotate-and-slice step (../shared/tools/reference/run.sh, its own RESULT line) and
# onnx-slice's whole command with `--basis point` and with the default basis, at the same ratio and
# on the same calibration ids, interleaved over ROUNDS rounds (machines of this kind differ by more
# than the margins measured, so only a ratio within one run means something).
#
# Usage: bench/versus-reference.sh [MODEL.onnx] [TOOLS_DIR]   (as bench/smollm2.sh)
# Environment: RATIO (default 0.25), ROUNDS (default 2), REFERENCE (the reference's run.sh,
# default ../shared/tools/reference/run.sh, set up once with its setup.sh), BEFORE (another
# onnx-slice binary, e.g. one built from an earlier commit: its point and global runs join every
# round, as "point (before)" and "global (before)", for a before/after in the same run).
# Writes bench/out/versus-reference.md.
set -euo pipefail
default_table=versus-reference
source "$(dirname "$0")/smollm2-common.sh"
ratio="${RATIO:-0.25}"
rounds="${ROUNDS:-2}"
reference="${REFERENCE:-../shared/tools/reference/run.sh}"
rows="$out/$table.rows"
: > "$rows"

onnx_slice_seconds() { # [--binary B] name flags… → appends a row
  local binary="$bin"
  if [ "$1" = --binary ]; then binary="$2"; shift 2; fi
  local name="$1" sliced="$out/versus-${1// /-}.onnx"
  shift
  rm -f "$sliced" "$sliced.data"
  python3 bench/peak_memory.py --json "$out/versus-${name// /-}.json" -- "$binary" "$model" -o "$sliced" \
    --ratio "$ratio" "$@" --calib-ids "$tools/calib_ids_n32.npy" --calib-batch 8 \
    --report "$out/versus-${name// /-}.report.json" --quiet
  python3 - "$out/versus-${name// /-}.json" "$out/versus-${name// /-}.report.json" "$round" "$name" >> "$rows" <<'PY'
import json, sys
memory, report, round_, name = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4]
phases = " / ".join(f"{v:.1f}" for k, v in report["seconds"].items() if k not in ("total_seconds",))
print(f"{round_}\t{name}\t{memory['wall_seconds']:.1f}\t{memory['peak_rss_bytes'] / 2**30:.2f}\t{phases}")
PY
  rm -f "$sliced" "$sliced.data"
}

reference_seconds() {
  local log="$out/versus-reference-$round.log"
  "$reference" --sparsity "$ratio" --out "$out/versus-reference-$round" > "$log" 2>&1
  python3 - "$log" "$round" >> "$rows" <<'PY'
import json, sys
line = [l for l in open(sys.argv[1]) if l.startswith("RESULT ")][-1]
result = json.loads(line[len("RESULT "):])
print(f"{sys.argv[2]}\treference\t{result['rotate_and_slice_s']:.1f}\t\t(rotate-and-slice step alone)")
PY
}

for round in $(seq 1 "$rounds"); do
  reference_seconds
  onnx_slice_seconds point --basis point
  onnx_slice_seconds global
  if [ -n "${BEFORE:-}" ]; then
    onnx_slice_seconds --binary "$BEFORE" "point (before)" --basis point
    onnx_slice_seconds --binary "$BEFORE" "global (before)"
  fi
done

python3 - "$rows" "$ratio" > "$out/$table.md" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"ratio {sys.argv[2]}; onnx-slice: the whole command (wall s), its phases fuse / session / runtime / pca / rotate / save (s)")
print()
print("| round | run | seconds | reference / this | peak RSS GiB | phases |")
print("|---|---|---|---|---|---|")
for r in rows:
    ref = next(float(x[2]) for x in rows if x[0] == r[0] and x[1] == "reference")
    speedup = "" if r[1] == "reference" else f"{ref / float(r[2]):.2f}×"
    print(f"| {r[0]} | {r[1]} | {float(r[2]):.1f} | {speedup} | {r[3]} | {r[4]} |")
PY
cat "$out/$table.md"
