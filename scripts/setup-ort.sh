#!/usr/bin/env bash
# Fetches ONNX Runtime's shared library from the PyPI wheel onnxruntime==1.31.1 and puts it where
# onnx-slice looks by default: ${ONNX_SLICE_HOME:-$HOME/.cache/onnx-slice}/onnxruntime-1.31.1/.
# Idempotent: does nothing when the library is already there. Prints the library's path.
set -euo pipefail
version=1.31.1
home="${ONNX_SLICE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-slice}"
dest="$home/onnxruntime-$version"
lib="$dest/libonnxruntime.so.$version"
if [ ! -f "$lib" ]; then
  python=$(command -v python3 || command -v python) || { echo "setup-ort: python3 with pip is needed to fetch the onnxruntime wheel" >&2; exit 1; }
  echo "setup-ort: fetching ONNX Runtime $version's library from the PyPI wheel onnxruntime==$version into $dest (once; about 30 MB)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The shared library inside the wheel does not depend on the Python version; pin one so that
  # pip picks the same file on every machine.
  "$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 \
    "onnxruntime==$version" -d "$tmp" >&2
  "$python" - "$tmp" "$dest" "$version" <<'PY'
import glob, os, sys, zipfile
tmp, dest, version = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "onnxruntime-*.whl"))[0]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in (f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so"):
        part = dest + "/." + name + ".part"
        with z.open("onnxruntime/capi/" + name) as src, open(part, "wb") as out:
            out.write(src.read())
        os.replace(part, os.path.join(dest, name))
PY
  echo "setup-ort: done" >&2
fi
echo "$lib"
