"""onnx-slice: compress exported ONNX transformer language models (MLP neurons removed and refit,
SliceGPT, or both) into smaller, ordinary ONNX models that run in any ONNX runtime.

The API mirrors the command line ``onnx-slice``::

    import onnx_slice

    report = onnx_slice.slice("smollm2-onnx/", "smollm2-sliced/", target_size="80%")
    print(report["widths"], report["weight_bytes_after"])
    onnx_slice.plan("smollm2-onnx/", target_size="80%")["summary"]   # --dry-run
    onnx_slice.inspect("smollm2-onnx/")["transformer"]                  # inspect --json

Keyword arguments are the command line's flags with ``_`` for ``-`` (``calib_samples`` is
``--calib-samples``); what is not given takes the command line's default. A call fails as the
command line does, with its message (which names the flag): :class:`UsageError` (exit code 2),
:class:`NotSliceableError` (3), :class:`TargetUnreachableError` (4), else :class:`SliceError` (1,
the base class of all four). Ctrl-C stops the work and leaves no output; ``KeyboardInterrupt``
follows. Calibration runs on the ONNX Runtime library of the installed ``onnxruntime`` (or
``onnxruntime-gpu``) package, version 1.23 or newer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, TypedDict, TypeVar, Union

from . import _native, _ort

__version__: str = _native.__version__

__all__ = [
    "slice",
    "plan",
    "inspect",
    "SliceError",
    "UsageError",
    "NotSliceableError",
    "TargetUnreachableError",
    "SliceWarning",
    "Report",
    "DryRun",
    "onnxruntime_library",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
Method = Literal["slicegpt", "neurons", "combined"]
Basis = Literal["global", "block", "point"]
Orientation = Literal["pca", "random-basis", "identity"]
Ep = Literal["cpu", "cuda", "auto"]
Storage = Literal["auto", "inline", "external"]


class SliceError(Exception):
    """The work failed (exit code 1 of the command line: an unreadable model, ONNX Runtime,
    calibration data). The base class of every onnx-slice error; ``str(error)`` is what the
    command line prints after ``error:``, and ``exit_code`` the code it exits with."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(SliceError, ValueError):
    """The arguments are wrong (exit code 2): a value, a path that is missing, a folder that is not
    an export folder, an output that is the input. Found before any long work; nothing written."""

    exit_code = 2


class NotSliceableError(SliceError):
    """The model is not one onnx-slice can slice (exit code 3): no transformer found in it, it is
    quantized, or onnx-slice wrote it already (:func:`inspect` says which)."""

    exit_code = 3


class TargetUnreachableError(SliceError):
    """No slicing meets ``target_size`` / ``target_params`` (exit code 4); nothing was written."""

    exit_code = 4


class SliceWarning(UserWarning):
    """Something to know about the result (few calibration samples, text the tokenizer does not
    read, a CUDA fallback to the CPU), as the command line prints it on stderr."""


_ERRORS = {e.exit_code: e for e in (SliceError, UsageError, NotSliceableError, TargetUnreachableError)}


class Totals(TypedDict):
    parameters: int
    bytes: int


class Report(TypedDict, total=False):
    """What :func:`slice` did: the command line's ``--report`` JSON (``schema_version`` 2)."""

    schema_version: int
    tool: str
    input: str
    input_sha256: str
    input_files: List[Dict[str, Any]]
    output: str
    #: The method that compressed the model: ``"slicegpt"``, ``"neurons"`` or ``"combined"``.
    method: str
    external_data: Optional[str]
    external_data_bytes: Optional[int]
    ratio: float
    round_to: int
    slice_head: bool
    orientation: str
    basis: Optional[str]
    target: Any
    target_limit: Optional[int]
    centered_embeddings: bool
    #: D, the original residual stream width.
    stream_width: int
    #: k at every stream point (embeddings first, the head's input last).
    widths: List[int]
    blocks: int
    #: Every block's MLP width after the rewrite, when the method changed them (neurons, combined).
    mlp_widths: Optional[List[int]]
    parameters_before: int
    parameters_after: int
    shortcut_parameters: int
    #: The MatMuls to leave in float when quantizing the output (a quantizer's
    #: ``nodes_to_exclude``): ``{"node": name, "reason": why}`` each; also in the model's metadata.
    quantize_exclude: List[Dict[str, str]]
    weight_bytes_before: int
    weight_bytes_after: int
    file_bytes_after: int
    calibration_tokens: int
    calibration_source: Optional[str]
    onnx_runtime: Optional[str]
    execution_provider_requested: Optional[str]
    execution_provider: Optional[str]
    cuda_unavailable: Optional[str]
    warnings: List[str]
    seconds: Dict[str, float]


class DryRun(TypedDict):
    """What :func:`plan` predicts :func:`slice` would write (the command line's ``--dry-run``)."""

    method: str
    stream_width: int
    widths: List[int]
    blocks: int
    before: Totals
    after: Totals
    basis: Optional[str]
    shortcuts: int
    shortcut_parameters: int
    #: Every block's MLP width before and after (None when the method keeps the MLPs).
    mlp_widths_before: Optional[List[int]]
    mlp_widths: Optional[List[int]]
    #: The MLP widths are allocated per block at calibration, under the same total.
    mlp_widths_allocated: bool
    #: The text ``--dry-run`` prints.
    summary: str


def slice(
    model: PathLike,
    output: PathLike,
    *,
    ratio: Optional[float] = None,
    target_size: Union[str, int, None] = None,
    target_params: Optional[int] = None,
    method: Optional[Method] = None,
    basis: Optional[Basis] = None,
    orientation: Optional[Orientation] = None,
    seed: Optional[int] = None,
    allocate_widths: Optional[bool] = None,
    slice_head: Optional[bool] = None,
    center_embeddings: Optional[bool] = None,
    save_rotations: Optional[PathLike] = None,
    stream_ratio: Optional[float] = None,
    uniform_widths: Optional[bool] = None,
    round_to: Optional[int] = None,
    calib: Union[PathLike, Sequence[PathLike], None] = None,
    calib_ids: Any = None,
    tokenizer: Optional[PathLike] = None,
    calib_samples: Optional[int] = None,
    calib_seqlen: Optional[int] = None,
    calib_batch: Optional[int] = None,
    calib_seed: Optional[int] = None,
    ep: Optional[Ep] = None,
    ort_lib: Optional[PathLike] = None,
    storage: Optional[Storage] = None,
    report: Optional[PathLike] = None,
    verbose: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Report:
    """Slice ``model`` and write the result to ``output``: ``onnx-slice MODEL -o OUTPUT ...``.

    Args:
        model: an exported ``.onnx`` file (external data found beside it), or an optimum or
            onnxruntime-genai export folder.
        output: a new ``.onnx`` file (its folder must exist); for an export folder, a new (or
            empty) folder that the same client loads as it is. An output that exists is refused
            (:class:`UsageError`), never replaced.
        ratio: SliceGPT: the fraction of the residual stream WIDTH to remove (0 <= ratio < 1);
            not of the size. One of ``ratio``, ``target_size`` and ``target_params`` is required.
        target_size: the largest output's weight bytes: a number of bytes (an int, or a string
            such as ``"200MB"``), or a share of the input's such as ``"80%"``. The method's best
            result that fits is chosen; none fitting raises :class:`TargetUnreachableError` and
            writes nothing.
        target_params: the largest number of output parameters, instead.
        method: ``"neurons"`` (the stream keeps its width; every MLP keeps its most needed
            neurons and its down projection is refit; a target only), ``"slicegpt"`` (the
            residual stream rotated and cut; a ratio or a target; its own keywords are ``basis``
            to ``save_rotations``) or ``"combined"`` (SliceGPT on ``stream_ratio`` of the stream,
            then neurons; a target only). Default, as the command line's: ``"slicegpt"`` with
            ``ratio`` or any of SliceGPT's own keywords, else ``"neurons"`` (a target alone).
        basis: which stream points share a basis: ``"global"`` (default), ``"block"``, ``"point"``.
        orientation: ``"pca"`` (default, calibrated), ``"random-basis"`` or ``"identity"`` (no
            calibration: a model of the sliced shape for checking a deployment).
        seed: seed of ``orientation="random-basis"`` (default 0).
        allocate_widths: with a target, a width per stream point from the spectra (PCA only).
        slice_head: slice the head's input too (changes the head's width).
        center_embeddings: subtract every embedding row's mean first, as the reference does.
        save_rotations: write every basis and its eigenvalues to this ``.safetensors`` file.
        stream_ratio: with ``method="combined"``: the share of the stream's width SliceGPT
            removes before the MLPs lose neurons for the rest of the target (default 0.05).
        uniform_widths: with ``"neurons"`` or ``"combined"``: one MLP width in every block,
            instead of widths allocated per block from the unsliced model's errors (within 25 % of
            the mean; one more calibration pass).
        round_to: round sliced widths down to a multiple of this (default 8).
        calib: calibration text file(s) (UTF-8, documents separated by blank lines); default: the
            built-in English Wikipedia sample.
        calib_ids: calibration token ids instead of text: an int64 or int32 ``[N, L]`` numpy
            array, or the path of such a ``.npy`` file.
        tokenizer: ``tokenizer.json`` for the text (default: beside the model).
        calib_samples: number of calibration sequences (default 128).
        calib_seqlen: tokens per sequence (default 2048, capped by the model's position limit).
        calib_batch: sequences per ONNX Runtime run (default 4).
        calib_seed: seed for choosing calibration windows from text (default 42).
        ep: execution provider for calibration: ``"cpu"`` (default), ``"cuda"`` (needs
            onnxruntime-gpu) or ``"auto"`` (CUDA if it works, else the CPU).
        ort_lib: the ``libonnxruntime`` to load (default: the installed onnxruntime package's).
        storage: ``"auto"`` (default: external data only past protobuf's 2 GiB, or as the input
            folder had it), ``"inline"`` or ``"external"``.
        report: also write the report as JSON to this file (``--report``).
        verbose: 1 shows ONNX Runtime's warnings and says which execution provider calibration
            ran on; 2 and 3 more of ONNX Runtime's log.
        progress: show the calibration progress bar on stderr; default: only when stderr is a
            terminal.

    Returns:
        The report (``--report``'s JSON as a dict): widths, parameters and bytes before and after,
        calibration tokens, ONNX Runtime version and execution provider, seconds per phase.

    Raises:
        UsageError: an argument is wrong (nothing was read or written).
        NotSliceableError: no transformer found, a quantized model, or onnx-slice's own output.
        TargetUnreachableError: no slicing meets the target.
        SliceError: the work failed (the model, ONNX Runtime, the calibration data).
        KeyboardInterrupt: Ctrl-C stopped the work; nothing was written.
    """
    kwargs = _kwargs(locals(), ("model", "output", "method", "progress"))
    _check_method(method)
    if ort_lib is None and not os.environ.get("ORT_DYLIB_PATH"):
        library = _runtime_library(needed=orientation in (None, "pca"))
        if library is not None:
            kwargs["ort_lib"] = library.path
            if library.cuda and ep in ("cuda", "auto"):
                _preload_cuda()
    show = _terminal() if progress is None else bool(progress)
    with _ids_file(kwargs) as kwargs:
        result = _stoppable(
            lambda: _native.slice(
                os.fspath(model), os.fspath(output), method, json.dumps(kwargs), show
            ),
            cleanup=lambda result: _remove_written(output, report, result),
        )
    return _unpacked(result)


def plan(
    model: PathLike,
    *,
    ratio: Optional[float] = None,
    target_size: Union[str, int, None] = None,
    target_params: Optional[int] = None,
    method: Optional[Method] = None,
    basis: Optional[Basis] = None,
    orientation: Optional[Orientation] = None,
    slice_head: Optional[bool] = None,
    stream_ratio: Optional[float] = None,
    uniform_widths: Optional[bool] = None,
    round_to: Optional[int] = None,
    tokenizer: Optional[PathLike] = None,
) -> DryRun:
    """What :func:`slice` would write, without calibrating or writing: ``onnx-slice MODEL
    --dry-run``. The widths, parameters and weight bytes before and after, the shortcut matrices,
    and in ``"summary"`` the text ``--dry-run`` prints. Arguments as in :func:`slice` (a model
    without a tokenizer.json beside it needs ``tokenizer``, or an ``orientation`` that does not
    calibrate, as there); raises the same errors."""
    kwargs = _kwargs(locals(), ("model", "method"))
    _check_method(method)
    try:
        return _unpacked(_native.plan(os.fspath(model), method, json.dumps(kwargs)))
    except _native.NativeError as error:
        raise _error(error) from None


def inspect(model: PathLike, *, explain: bool = False) -> Dict[str, Any]:
    """Describe a model file or export folder: ``onnx-slice inspect MODEL --json``.

    Returns ``{"model": ..., "transformer": ..., "text": ...}``: the summary (producer, opsets,
    inputs and outputs, operators, parameters, what onnx-slice did to it if it wrote it), the
    transformer detection found (width, norms, blocks) or where it stopped, and the command's text
    output. ``explain`` adds every normalization candidate the matchers rejected, and why.
    """
    try:
        return json.loads(_native.inspect(os.fspath(model), bool(explain)))
    except _native.NativeError as error:
        raise _error(error) from None


def onnxruntime_library() -> _ort.Library:
    """The ONNX Runtime library onnx-slice loads from the installed onnxruntime package (path,
    version, distribution, whether the CUDA provider is beside it). Raises :class:`SliceError`
    when none is installed or its version is one onnx-slice cannot load (before 1.23)."""
    try:
        return _ort.find_library()
    except _ort.OnnxRuntimeNotFound as error:
        raise SliceError(str(error)) from None


# The implementation.

_T = TypeVar("_T")


def _check_method(method: Any) -> None:
    """``method`` is a name (or None): what the native side takes."""
    if method is not None and not isinstance(method, str):
        raise UsageError(
            f"invalid value '{method}' for '--method': expected {', '.join(_native.METHODS)}"
        )


def _kwargs(arguments: Dict[str, Any], positional: Sequence[str]) -> Dict[str, Any]:
    """The keyword arguments given (not None), with paths as strings: what the native side maps
    onto the library's options (python/src/options.rs)."""
    given = {}
    for key, value in arguments.items():
        if key in positional or value is None:
            continue
        if key == "calib" and not isinstance(value, (str, bytes, os.PathLike)):
            value = [os.fspath(v) for v in value]
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        given[key] = value
    return given


class _ids_file:
    """``calib_ids`` given as an array: written to a temporary .npy file for the call."""

    def __init__(self, kwargs: Dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.folder: Optional[str] = None

    def __enter__(self) -> Dict[str, Any]:
        ids = self.kwargs.get("calib_ids")
        if ids is None or isinstance(ids, str):
            return self.kwargs
        import numpy  # onnxruntime's dependency, so always there beside it

        array = numpy.asarray(ids)
        if array.ndim != 2 or array.dtype.kind not in "iu":
            raise UsageError(
                f"--calib-ids: expected token ids as an integer array of shape [N, L], got "
                f"{array.dtype} of shape {list(array.shape)}"
            )
        self.folder = tempfile.mkdtemp(prefix="onnx-slice-ids.")
        path = os.path.join(self.folder, "calib_ids.npy")
        numpy.save(path, array.astype(numpy.int64, copy=False))
        return {**self.kwargs, "calib_ids": path}

    def __exit__(self, *_: object) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _stoppable(call: Callable[[], _T], cleanup: Callable[[_T], None]) -> _T:
    """Runs ``call`` in a worker thread, so that Ctrl-C reaches this one: then the work is asked
    to stop (it ends at its next calibration batch, its staged output removed), and
    KeyboardInterrupt follows once it has. A call that finished anyway is undone by ``cleanup``.

    The worker and every thread it starts (ONNX Runtime's, the library's) block SIGINT, so that
    the signal interrupts no system call of theirs. The wait is on an Event, not Thread.join: a
    join interrupted by KeyboardInterrupt can mark a running thread as stopped (CPython 3.11)."""
    outcome: Dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            if hasattr(signal, "pthread_sigmask"):
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error
        finally:
            done.set()

    worker = threading.Thread(target=work, name="onnx-slice", daemon=True)
    try:
        worker.start()
        while not done.wait(0.25):
            pass
    except KeyboardInterrupt:
        _native.request_stop()
        try:
            while worker.ident is not None and not done.is_set():
                try:
                    done.wait()
                except KeyboardInterrupt:
                    pass
        finally:
            _native.clear_stop_request()
        if "value" in outcome:
            cleanup(outcome["value"])
        raise
    if "error" in outcome:
        error = outcome["error"]
        if isinstance(error, _native.NativeError):
            raise _error(error) from None
        raise error
    return outcome["value"]


def _remove_written(output: PathLike, report: Optional[PathLike], result: str) -> None:
    """Removes what a slice that finished despite a stop request wrote."""
    written = json.loads(result)["result"]
    paths = [os.fspath(output), written.get("external_data"), report and os.fspath(report)]
    for path in filter(None, paths):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def _unpacked(result: str) -> Any:
    """The native call's result; its notices as SliceWarnings."""
    decoded = json.loads(result)
    for line in decoded["notices"]:
        message = line[len("warning: ") :] if line.startswith("warning: ") else line
        warnings.warn(message, SliceWarning, stacklevel=3)
    return decoded["result"]


def _error(error: BaseException) -> SliceError:
    code, message = error.args
    return _ERRORS.get(code, SliceError)(message)


def _terminal() -> bool:
    """stderr is a terminal, as Python and the process see it (not in a notebook)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty() and os.isatty(2)
    except (AttributeError, ValueError, OSError):
        return False


def _runtime_library(needed: bool) -> Optional[_ort.Library]:
    """The installed onnxruntime package's library; when it is missing or too old, a SliceError if
    the call calibrates (``needed``), else None (the call loads no ONNX Runtime)."""
    mixed = _ort.mixed_install_warning()
    if mixed and needed:
        warnings.warn(mixed, SliceWarning, stacklevel=3)
    try:
        return _ort.find_library()
    except _ort.OnnxRuntimeNotFound as error:
        if needed:
            raise SliceError(str(error)) from None
        return None


_cuda_preloaded = False


def _preload_cuda() -> None:
    """Loads CUDA and cuDNN from the NVIDIA pip packages (``onnxruntime-gpu[cuda,cudnn]``) into the
    process, where ONNX Runtime's CUDA provider then finds them (as ``onnxruntime.preload_dlls``
    does; the command line sets LD_LIBRARY_PATH instead). Libraries that do not load are left to
    the system's search path; ONNX Runtime says what is missing."""
    global _cuda_preloaded
    if _cuda_preloaded:
        return
    _cuda_preloaded = True
    import ctypes
    import glob

    folders = _ort.cuda_library_folders()
    order = ("libcudart.so.*", "libcublasLt.so.*", "libcublas.so.*", "libcurand.so.*",
             "libcufft.so.*", "libnvrtc.so.*", "libcudnn*.so.*")
    for pattern in order:
        for folder in folders:
            for path in sorted(glob.glob(os.path.join(folder, pattern))):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
