#!/usr/bin/env bash
# Creates (once) the Python environment in which tests/clients.rs loads sliced export folders in
# their real clients: optimum's ORTModelForCausalLM and onnxruntime-genai, pinned in
# tests/clients/requirements.txt, in a venv at
# ${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}/venv-clients.
# optimum imports torch, and PyPI's torch is the CUDA build: the venv takes about 5.7 GB and the
# first install about 6 minutes (measured: 339 s on a 2-core machine, nothing cached). Idempotent:
# does nothing when the venv was completed from the same requirements (a half-made one, left by an
# interrupted run, was not, and is made again). Prints the venv's python path, which is what the
# tests use unless ONNX_SLICE_CLIENTS_PYTHON names another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=tests/clients/requirements.txt
home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
venv="$home/venv-clients"
python="$venv/bin/python"
stamp="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$python" ] || [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$stamp" ]; then
  base=$(command -v python3 || command -v python) || { echo "setup-clients: python3 (with the venv module) is needed" >&2; exit 1; }
  echo "setup-clients: creating the Python venv $venv with optimum, torch and onnxruntime-genai" \
       "($requirements; the clients tests/clients.rs loads sliced folders in; once; about 5.7 GB, 6 minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$home"
  "$base" -m venv "$venv" >&2
  # No pip cache: it would keep a second copy of the 4 GB of wheels.
  "$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$requirements" >&2
  "$python" -c "import optimum.onnxruntime, onnxruntime_genai" >&2 \
    || { echo "setup-clients: $venv does not import optimum.onnxruntime and onnxruntime_genai" >&2; exit 1; }
  echo "$stamp" > "$venv/.requirements.sha256"
fi
echo "$python"
