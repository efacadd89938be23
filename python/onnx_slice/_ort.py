"""Which ONNX Runtime library onnx-slice loads: the one inside the installed ``onnxruntime`` (or
``onnxruntime-gpu``) package, found without importing it (importing it would load a second copy
of ONNX Runtime into the process).

Supported: ONNX Runtime 1.23 and newer. onnx-slice loads the library through the ``ort`` crate at
its API version 22: versions before 1.22 refuse that API, and 1.22.x aborts the process on its
first session (measured: see CHANGELOG.md, 0.1.0). Tested: 1.23.0, 1.23.2, 1.24.4, 1.26.0,
1.28.0, 1.31.1 and 1.32.0 slice the fixtures to the same widths and sizes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

#: The oldest ONNX Runtime onnx-slice loads.
MIN_VERSION: Tuple[int, int] = (1, 23)
#: The versions the project's checks ran with (CHANGELOG.md).
TESTED_VERSIONS = ("1.23.0", "1.23.2", "1.24.4", "1.26.0", "1.28.0", "1.31.1", "1.32.0")
#: The PyPI distributions that install the ``onnxruntime`` package with a library onnx-slice loads.
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")

SUPPORTED = (
    f"onnx-slice loads ONNX Runtime {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer "
    f"(tested {', '.join(TESTED_VERSIONS)})"
)

_LIBRARY = re.compile(r"^libonnxruntime\.so\.(\d+)\.(\d+)\.(\d+)$")


class OnnxRuntimeNotFound(RuntimeError):
    """No usable ONNX Runtime library: the message says why and what to install."""


class Library(NamedTuple):
    """An ONNX Runtime shared library and what it is."""

    path: str
    version: str
    #: Which distribution installed it ("onnxruntime", "onnxruntime-gpu"), when known.
    distribution: Optional[str]
    #: The CUDA execution provider's library sits beside it (onnxruntime-gpu).
    cuda: bool


def installed_distributions() -> List[Tuple[str, str]]:
    """(name, version) of each installed distribution that provides the ``onnxruntime`` package."""
    found = []
    for name in DISTRIBUTIONS:
        try:
            found.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def find_library() -> Library:
    """The library of the installed onnxruntime package, checked against the supported versions.

    Raises :class:`OnnxRuntimeNotFound` when no onnxruntime package is installed, when it holds
    no shared library, or when its version is one onnx-slice cannot load.
    """
    spec = importlib.util.find_spec("onnxruntime")
    locations = list(spec.submodule_search_locations or []) if spec else []
    installed = installed_distributions()
    if not locations:
        raise OnnxRuntimeNotFound(
            "no onnxruntime package is installed in this Python environment: "
            "install it with `pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` "
            f"(CUDA); {SUPPORTED}"
        )
    capi = Path(locations[0]) / "capi"
    libraries = []
    for entry in sorted(capi.iterdir()) if capi.is_dir() else []:
        match = _LIBRARY.match(entry.name)
        if match:
            libraries.append((tuple(int(x) for x in match.groups()), entry))
    distribution = installed[0][0] if len(installed) == 1 else None
    which = ", ".join(f"{n} {v}" for n, v in installed) or "onnxruntime"
    if not libraries:
        raise OnnxRuntimeNotFound(
            f"the installed {which} has no ONNX Runtime shared library (libonnxruntime.so.*) in "
            f"{capi}: reinstall it (`pip install --force-reinstall onnxruntime`); {SUPPORTED}"
        )
    version, path = max(libraries)
    shown = ".".join(map(str, version))
    if version[:2] < MIN_VERSION:
        raise OnnxRuntimeNotFound(
            f"the installed {which} has ONNX Runtime {shown} ({path}), which onnx-slice cannot "
            f"load: {SUPPORTED}. Upgrade it: `pip install -U onnxruntime` (or onnxruntime-gpu)"
        )
    cuda = (capi / "libonnxruntime_providers_cuda.so").is_file()
    return Library(str(path), shown, distribution, cuda)


def mixed_install_warning() -> Optional[str]:
    """A warning when onnxruntime and onnxruntime-gpu are both installed: they write one folder,
    so which library is there depends on the order they were installed in."""
    installed = installed_distributions()
    if len(installed) < 2:
        return None
    return (
        "onnxruntime and onnxruntime-gpu are both installed and share one folder: the library "
        "onnx-slice loads is whichever was installed last. For the CUDA execution provider, "
        "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`"
    )


def cuda_library_folders() -> List[str]:
    """The lib folders of the NVIDIA pip packages (nvidia-cuda-runtime, nvidia-cublas, nvidia-cudnn,
    ... which ``pip install onnxruntime-gpu[cuda,cudnn]`` installs), where ONNX Runtime's CUDA
    provider finds CUDA and cuDNN when the system has none."""
    spec = importlib.util.find_spec("nvidia")
    folders = []
    for root in list(spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(root).glob("*/lib")):
            if lib.is_dir():
                folders.append(str(lib))
    return folders


def environment_for_binary(env: "os._Environ[str] | dict[str, str]") -> dict:
    """``env`` with ORT_DYLIB_PATH set to the onnxruntime package's library (unless it is set
    already: an explicit choice wins), and the NVIDIA pip packages' lib folders on
    LD_LIBRARY_PATH when the library has the CUDA provider. Raises OnnxRuntimeNotFound."""
    env = dict(env)
    if env.get("ORT_DYLIB_PATH"):
        return env
    library = find_library()
    env["ORT_DYLIB_PATH"] = library.path
    if library.cuda:
        folders = cuda_library_folders()
        if folders:
            previous = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = os.pathsep.join(folders + ([previous] if previous else []))
    return env
