#!/usr/bin/env bash
# The wheel as a user gets it: builds it (scripts/build-wheel.sh), installs it into a fresh venv
# with nothing beside it but its dependencies from PyPI (onnxruntime, numpy), and there
#   1. runs python/tests/test_api.py on the fixtures: the API against the console script it
#      mirrors (options, each exception and its message, plan, inspect, ids, Ctrl-C, the
#      onnxruntime package's library found and checked);
#   2. slices an optimum export folder (KV cache) with the console script and with the API, and
#      loads both outputs in optimum's ORTModelForCausalLM, which must generate the same tokens
#      from each (the clients' venv of scripts/setup-clients.sh).
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
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel"
echo "test-wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) installed beside:" \
  "$("$work/venv/bin/pip" list --format=freeze --disable-pip-version-check --exclude pip --exclude setuptools --exclude onnx-slice | tr '\n' ' ')" >&2
installed=$SECONDS

export PATH="$work/venv/bin:$PATH"
unset ORT_DYLIB_PATH
export ONNX_SLICE_HOME="$work/home"
cd "$work"
python "$root/python/tests/test_api.py" "$root/fixtures" | tee "$work/api.log"
tested=$SECONDS

# 2. optimum loads what the console script and the API write.
folder="$root/fixtures/llama/optimum_past"
onnx-slice "$folder" -o "$work/cli" --ratio 0.25 --calib "$root/fixtures/calibration.txt" -q
python -c "import onnx_slice, sys; onnx_slice.slice(sys.argv[1], sys.argv[2], ratio=0.25, calib=sys.argv[3])" \
  "$folder" "$work/api" "$root/fixtures/calibration.txt"
cmp "$work/cli/model.onnx" "$work/api/model.onnx"
cat > "$work/jobs.json" <<EOF
[{"client": "optimum", "folder": "$work/cli", "use_cache": true, "prompt": [74, 547, 12, 900, 3, 321], "new_tokens": 8},
 {"client": "optimum", "folder": "$work/api", "use_cache": true, "prompt": [74, 547, 12, 900, 3, 321], "new_tokens": 8}]
EOF
"$clients_python" "$root/tests/clients/generate.py" "$work/jobs.json" > "$work/tokens.json"
"$clients_python" - "$work/tokens.json" <<'PY'
import json, sys
cli, api = json.load(open(sys.argv[1]))
assert len(cli) == 8 and cli == api, (cli, api)
print(f"ok     optimum's ORTModelForCausalLM loads the console script's and the API's output: {cli}")
PY
loaded=$SECONDS
echo "test-wheel: build $((built - started)) s, venv and install $((installed - built)) s," \
  "API tests $((tested - installed)) s, optimum $((loaded - tested)) s" >&2
tail -1 "$work/api.log" | awk '{ print $1 + 1 " passed, " $3 " failed" }'
