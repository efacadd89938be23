# Sourced by the SmolLM2 benchmarks (bench/smollm2.sh, bench/budgets.sh), which set default_table
# first; reads their arguments [MODEL.onnx] [TOOLS_DIR] and the environment's SLICE_FLAGS and
# TABLE. Builds the release binary; sets model, tools, out, table, slice_flags, bin, evaluate().
cd "$(dirname "$0")/.."
model="${1:-$HOME/.cache/onnx-slice-models/smollm2/smollm2-onnx/plain/model.onnx}"
tools="${2:-../shared/tools/smollm2}"
out=bench/out
table="${TABLE:-$default_table}"
read -r -a slice_flags <<< "${SLICE_FLAGS:-}"
mkdir -p "$out"
scripts/setup-ort.sh >/dev/null
cargo build --quiet --release --locked
# A copy: a rebuild while a long benchmark runs must not change the binary under it.
cp target/release/onnx-slice "$out/onnx-slice"
bin="$out/onnx-slice"

evaluate() { # model → JSON line with the perplexity
  "$bin" eval "$1" --ids "$tools/eval_ids_brown.npy" --ignore-id 2 --batch 4 --json
}
