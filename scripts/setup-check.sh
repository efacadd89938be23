#!/usr/bin/env bash
# Creates (once) the Python environment the tests use to look at written models with the tools a
# user's pipeline runs on them: a venv at
# ${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}/venv-check with, from PyPI,
#   onnx==1.23.2         the ONNX checker on written models;
#   onnxruntime==1.31.1  ONNX Runtime's own quantizers (tests/quantize.rs, tests/quantize_chain.py),
#                        the same version whose library scripts/setup-ort.sh fetches;
#   onnx-ir==1.1.0       which onnxruntime's MatMulNBitsQuantizer imports;
#   numpy==2.4.6.
# Idempotent: does nothing when that venv already imports these versions. A venv made by an
# earlier version of this script (onnx alone) gets the missing packages added in place; a half-made
# one, left by an interrupted run, that cannot be completed so is made again. Prints the venv's
# python path, which is what the tests use unless ONNX_SLICE_CHECK_PYTHON names another
# interpreter. About 290 MB.
set -euo pipefail
pins=("onnx==1.23.2" "onnxruntime==1.31.1" "onnx-ir==1.1.0" "numpy==2.4.6")
home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
venv="$home/venv-check"
python="$venv/bin/python"
ready() {
  [ -x "$python" ] && "$python" - <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
# Installed metadata only (pip writes it after the package's files): importing onnxruntime takes
# seconds, and this runs before every test run.
want = {"onnx": "1.23.2", "onnxruntime": "1.31.1", "onnx-ir": "1.1.0", "numpy": "2.4.6"}
sys.exit(any(version(name) != v for name, v in want.items()))
PY
}
install() {
  "$python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
}
create() {
  base=$(command -v python3 || command -v python) || { echo "setup-check: python3 (with the venv module) is needed" >&2; exit 1; }
  rm -rf "$venv"
  mkdir -p "$home"
  "$base" -m venv "$venv" >&2
}
if ! ready; then
  echo "setup-check: making the Python venv $venv with ${pins[*]}" \
       "(the ONNX checker and ONNX Runtime's quantizers the tests run; once; about 290 MB)" >&2
  if [ -x "$python" ] && "$python" -m pip --version >/dev/null 2>&1 && install && ready; then
    :
  else
    create
    install
    ready || { echo "setup-check: $venv does not import ${pins[*]}" >&2; exit 1; }
  fi
fi
echo "$python"
