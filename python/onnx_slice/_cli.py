"""The ``onnx-slice`` command of the Python package: finds the installed onnxruntime package's
ONNX Runtime library, checks its version, and replaces this process with the ``onnx-slice``
binary shipped in the package (``onnx_slice/bin/onnx-slice``), the library's path in
ORT_DYLIB_PATH. Signals, exit codes, progress bars and the removal of unfinished outputs on
Ctrl-C are the binary's own. An ORT_DYLIB_PATH already set, or ``--ort-lib``, wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, NoReturn, Optional

from . import _ort

#: Command lines that load no ONNX Runtime: they run without an onnxruntime package.
_NO_RUNTIME_FLAGS = {"-h", "--help", "-V", "--version", "--dry-run"}
_NO_RUNTIME_COMMANDS = {"inspect", "convert", "help"}


def binary() -> Path:
    """The onnx-slice executable inside the package."""
    return Path(__file__).resolve().parent / "bin" / "onnx-slice"


def _needs_runtime(args: List[str]) -> bool:
    if args and args[0] in _NO_RUNTIME_COMMANDS:
        return False
    return not any(a in _NO_RUNTIME_FLAGS or a == "--ort-lib" or a.startswith("--ort-lib=") for a in args)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    executable = binary()
    if not os.access(executable, os.X_OK):
        print(
            f"error: this onnx-slice installation has no executable {executable}: reinstall the "
            "wheel (`pip install --force-reinstall onnx-slice`)",
            file=sys.stderr,
        )
        sys.exit(1)
    env = dict(os.environ)
    if _needs_runtime(args):
        try:
            env = _ort.environment_for_binary(env)
        except _ort.OnnxRuntimeNotFound as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        mixed = _ort.mixed_install_warning()
        if mixed:
            print(f"warning: {mixed}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(executable), ["onnx-slice", *args], env)


if __name__ == "__main__":
    main()
