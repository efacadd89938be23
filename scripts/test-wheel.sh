#!/usr/bin/env bash
# The wheel as a user gets it: builds it (scripts/build-wheel.sh), installs it into a fresh venv
# with nothing beside it but its dependencies from PyPI (onnxruntime, numpy), and there
#   1. runs python/tests/test_api.py on the fixtures: the API against the console script it
#      mirrors (options, each exception and its message, plan, inspect, ids, Ctrl-C, the
#      onnxruntime package's library found and checked);
#   2. checks that the API and the console script load the onnxruntime package's library (the
#      API: /proc/self/maps; the command: the dynamic loader's LD_DEBUG=files record);
#   3. slices an optimum export folder (KV cache) with the console script and with the API, with
#      a ratio (SliceGPT) and with a target alone (neurons): byte-identical folders, which
#      optimum's ORTModelForCausalLM loads and generates the same tokens from (the clients' venv
#      of scripts/setup-clients.sh).
# It prints the wheel's size and how long pip took to install it.
# ORT_DYLIB_PATH and ONNX_SLICE_HOME are cleared: the installed onnxruntime package's library is
# the one used. Last line: "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$SECONDS
wheel=$(scripts/build-wheel.sh)
built=$SECONDS
clients_python=$(scripts/setup-clients.sh)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
venv_made=$SECONDS
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel"
installed=$SECONDS
echo "test-wheel: $(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB, installed in $((installed - venv_made)) s beside:" \
  "$("$work/venv/bin/pip" list --format=freeze --disable-pip-version-check --exclude pip --exclude setuptools --exclude onnx-slice | tr '\n' ' ')" >&2

export PATH="$work/venv/bin:$PATH"
unset ORT_DYLIB_PATH
export ONNX_SLICE_HOME="$work/home"
cd "$work"
onnx-slice --help > "$work/help.txt"
grep -q "^Usage: onnx-slice" "$work/help.txt"
python "$root/python/tests/test_api.py" "$root/fixtures" | tee "$work/api.log"
tested=$SECONDS

# 2. The library both load is the onnxruntime package's: the API's, from the process's own memory
#    map; the command's, from the dynamic loader's record of what it opened (LD_DEBUG=files).
folder="$root/fixtures/llama/optimum_past"
text="$root/fixtures/calibration.txt"
capi=$(python -c "import onnxruntime, os; print(os.path.realpath(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi')))")
python - "$folder" "$work/maps" "$text" "$capi" <<'PY'
import os, sys
import onnx_slice
folder, out, text, capi = sys.argv[1:]
report = onnx_slice.slice(folder, out, ratio=0.25, calib=text)
mapped = {os.path.realpath(line.split()[-1]) for line in open("/proc/self/maps") if "libonnxruntime.so" in line}
assert len(mapped) == 1 and os.path.dirname(next(iter(mapped))) == capi, (mapped, capi)
print(f"ok     the API ran ONNX Runtime {report['onnx_runtime']} from {next(iter(mapped))} (/proc/self/maps)")
PY
LD_DEBUG=files onnx-slice "$folder" -o "$work/ld" --ratio 0.25 --calib "$text" -q 2> "$work/ld.log"
opened=$(sed -n 's/.*file=\([^ ]*libonnxruntime\.so[^ ]*\) .*dynamically loaded.*/\1/p' "$work/ld.log" | sort -u)
[ "$(dirname "$(realpath "$opened")")" = "$capi" ] || { echo "the command opened '$opened', not the library in $capi" >&2; exit 1; }
echo "ok     the command opened $opened (LD_DEBUG=files)"

# 3. The same command line and Python call write byte-identical folders (a ratio: SliceGPT; a
#    target alone: neurons), and optimum's loader generates the same tokens from each.
onnx-slice "$folder" -o "$work/cli" --ratio 0.25 --calib "$text" -q
python -c "import onnx_slice, sys; onnx_slice.slice(sys.argv[1], sys.argv[2], ratio=0.25, calib=sys.argv[3])" \
  "$folder" "$work/api" "$text"
onnx-slice "$folder" -o "$work/cli-neurons" --target-size 80% --calib "$text" -q
python -c "import onnx_slice, sys; onnx_slice.slice(sys.argv[1], sys.argv[2], target_size='80%', calib=sys.argv[3])" \
  "$folder" "$work/api-neurons" "$text"
for pair in "cli api" "cli-neurons api-neurons"; do
  set -- $pair
  diff -r "$work/$1" "$work/$2"
  echo "ok     $1/ and $2/ are byte-identical"
done
jobs=""
for out in cli api cli-neurons api-neurons; do
  jobs="$jobs${jobs:+,}{\"client\": \"optimum\", \"folder\": \"$work/$out\", \"use_cache\": true, \"prompt\": [74, 547, 12, 900, 3, 321], \"new_tokens\": 8}"
done
echo "[$jobs]" > "$work/jobs.json"
"$clients_python" "$root/tests/clients/generate.py" "$work/jobs.json" > "$work/tokens.json"
"$clients_python" - "$work/tokens.json" <<'PY'
import json, sys
cli, api, cli_neurons, api_neurons = json.load(open(sys.argv[1]))
assert len(cli) == 8 and cli == api, (cli, api)
assert len(cli_neurons) == 8 and cli_neurons == api_neurons, (cli_neurons, api_neurons)
print(f"ok     optimum's ORTModelForCausalLM loads the four folders: {cli} (slicegpt), {cli_neurons} (neurons)")
PY
loaded=$SECONDS
echo "test-wheel: build $((built - started)) s, venv $((venv_made - built)) s, install $((installed - venv_made)) s," \
  "API tests $((tested - installed)) s, library, identity and optimum checks $((loaded - tested)) s" >&2
tail -1 "$work/api.log" | awk '{ print $1 + 5 " passed, " $3 " failed" }'
