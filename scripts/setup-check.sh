#!/usr/bin/env bash
# Creates (once) the Python environment the tests use to run the ONNX checker on written models:
# a venv with onnx==1.23.2 from PyPI at
# ${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}/venv-check.
# Idempotent: does nothing when that venv already imports onnx 1.23.2 (a half-made one, left by an
# interrupted run, does not, and is made again). Prints the venv's python path, which is what the
# tests use unless ONNX_SLICE_CHECK_PYTHON names another interpreter.
set -euo pipefail
onnx_version=1.23.2
home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
venv="$home/venv-check"
python="$venv/bin/python"
ready() {
  [ -x "$python" ] && "$python" -c "import onnx, sys; sys.exit(onnx.__version__ != '$onnx_version')" 2>/dev/null
}
if ! ready; then
  base=$(command -v python3 || command -v python) || { echo "setup-check: python3 (with the venv module) is needed" >&2; exit 1; }
  echo "setup-check: creating the Python venv $venv with onnx==$onnx_version (the ONNX checker the tests run; once; about 130 MB)" >&2
  rm -rf "$venv"
  mkdir -p "$home"
  "$base" -m venv "$venv" >&2
  "$python" -m pip install --quiet --disable-pip-version-check "onnx==$onnx_version" >&2
  ready || { echo "setup-check: $venv does not import onnx $onnx_version" >&2; exit 1; }
fi
echo "$python"
