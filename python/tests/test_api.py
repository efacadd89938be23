"""Tests of the installed onnx_slice package: the Python API against the command line it mirrors.

Run in a venv that has the wheel installed (scripts/test-wheel.sh makes one), with the
repository's fixtures: ``python python/tests/test_api.py FIXTURES_DIR``. Plain asserts, no test
framework (the venv holds the wheel and what it depends on, nothing else); each test_* function
runs in turn and the last line says "N passed, N failed".
"""

from __future__ import annotations

import inspect as pyinspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy

import onnx_slice
from onnx_slice import _ort

FIXTURES = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures").resolve()
FOLDER = FIXTURES / "llama" / "optimum"  # an optimum export: config.json, tokenizer.json
MODEL = FOLDER / "model.onnx"
TEXT = FIXTURES / "calibration.txt"
CLI = shutil.which("onnx-slice") or str(Path(sys.executable).with_name("onnx-slice"))
SCRATCH = Path(tempfile.mkdtemp(prefix="onnx-slice-api-test."))


def scratch(name: str) -> Path:
    return SCRATCH / name


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env)


def cli_error(*args: str) -> tuple[int, str]:
    """The command line's exit code and its error message (after "error: ")."""
    done = cli(*args)
    assert done.stderr.startswith("error: "), done.stderr
    return done.returncode, done.stderr[len("error: ") :].rstrip("\n")


def raises(kind: type, call) -> BaseException:
    try:
        call()
    except kind as error:
        return error
    raise AssertionError(f"expected {kind.__name__}")


# The options mapping: every keyword reaches the library, as its flag does.


def test_keywords_reach_the_library_as_their_flags_do():
    out, report_file = scratch("kw.onnx"), scratch("kw.json")
    report = onnx_slice.slice(
        MODEL, out, ratio=0.25, basis="point", round_to=16, calib=TEXT, calib_samples=4,
        calib_seqlen=32, calib_batch=2, calib_seed=7, storage="external", report=report_file,
    )
    assert report["ratio"] == 0.25 and report["basis"] == "point" and report["round_to"] == 16
    assert report["widths"] == [48, 48, 48, 48, 64], report["widths"]
    assert report["calibration_tokens"] == 4 * 32, report["calibration_tokens"]
    assert report["external_data"] and Path(report["external_data"]).is_file()
    assert json.loads(report_file.read_text()) == report  # report= writes --report's JSON
    # The same flags on the command line write the same model.
    cli_out = scratch("kw-cli.onnx")
    done = cli(MODEL, "-o", cli_out, "--ratio", "0.25", "--basis", "point", "--round-to", "16",
               "--calib", TEXT, "--calib-samples", "4", "--calib-seqlen", "32", "--calib-batch", "2",
               "--calib-seed", "7", "--external-data", "-q")
    assert done.returncode == 0, done.stderr
    assert Path(str(cli_out) + ".data").read_bytes() == Path(report["external_data"]).read_bytes()


def test_report_fields():
    report = onnx_slice.slice(FOLDER, scratch("fields"), target_size="80%", calib=[TEXT], calib_samples=16)
    for key in ("schema_version", "tool", "input_sha256", "stream_width", "widths", "parameters_before", "method",
                "mlp_widths", "quantize_exclude",
                "parameters_after", "weight_bytes_before", "weight_bytes_after", "calibration_tokens",
                "onnx_runtime", "execution_provider", "warnings", "seconds"):
        assert key in report, key
    assert report["tool"] == f"onnx-slice {onnx_slice.__version__}"
    assert report["weight_bytes_after"] <= 0.8 * report["weight_bytes_before"]
    assert report["onnx_runtime"] == onnx_slice.onnxruntime_library().version
    assert report["execution_provider"] == "CPU"
    assert (scratch("fields") / "config.json").is_file()  # a folder in, a folder out


def test_orientation_and_seed():
    a = onnx_slice.slice(MODEL, scratch("rb1.onnx"), ratio=0.5, orientation="random-basis", seed=3)
    b = onnx_slice.slice(MODEL, scratch("rb2.onnx"), ratio=0.5, orientation="random-basis", seed=3)
    assert a["orientation"] == b["orientation"] and a["onnx_runtime"] is None  # no calibration
    assert scratch("rb1.onnx").read_bytes() == scratch("rb2.onnx").read_bytes()


def test_ids_as_an_array_and_as_a_path():
    ids = numpy.random.default_rng(0).integers(3, 999, size=(6, 24))
    path = scratch("ids.npy")
    numpy.save(path, ids)
    from_array = onnx_slice.slice(MODEL, scratch("ids-a.onnx"), ratio=0.25, calib_ids=ids)
    from_path = onnx_slice.slice(MODEL, scratch("ids-p.onnx"), ratio=0.25, calib_ids=path)
    assert from_array["calibration_tokens"] == from_path["calibration_tokens"] == 6 * 24
    assert from_array["widths"] == from_path["widths"]
    # The same ids either way: the same model.
    assert scratch("ids-a.onnx").read_bytes() == scratch("ids-p.onnx").read_bytes()
    error = raises(onnx_slice.UsageError, lambda: onnx_slice.slice(
        MODEL, scratch("ids-bad.onnx"), ratio=0.25, calib_ids=numpy.zeros((2, 3, 4), dtype=numpy.int64)))
    assert "[N, L]" in str(error)


def test_warnings_are_slice_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = numpy.random.default_rng(1).integers(3, 999, size=(3, 16))
        report = onnx_slice.slice(MODEL, scratch("warn.onnx"), ratio=0.25, calib_ids=ids, calib_samples=10)
    said = [str(w.message) for w in caught if issubclass(w.category, onnx_slice.SliceWarning)]
    assert said and said == report["warnings"], (said, report["warnings"])


# Each exception class, with the command line's message and exit code.


def same_as_cli(kind: type, call, *args: str) -> None:
    error = raises(kind, call)
    code, message = cli_error(*args)
    assert type(error) is kind, type(error)
    assert error.exit_code == code, (error.exit_code, code)
    assert str(error) == message, f"\napi: {error}\ncli: {message}"


def test_usage_errors_are_the_command_lines():
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, calib_samples=0),
                MODEL, "-o", scratch("u.onnx"), "--ratio", "0.2", "--calib-samples", "0")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(FIXTURES / "missing.onnx", scratch("u.onnx"), ratio=0.2),
                FIXTURES / "missing.onnx", "-o", scratch("u.onnx"), "--ratio", "0.2")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(FOLDER, FOLDER / "inside", ratio=0.2),
                FOLDER, "-o", FOLDER / "inside", "--ratio", "0.2")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, MODEL, ratio=0.2),
                MODEL, "-o", MODEL, "--ratio", "0.2")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=1.5),
                MODEL, "-o", scratch("u.onnx"), "--ratio", "1.5")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, calib=FIXTURES / "nope.txt"),
                MODEL, "-o", scratch("u.onnx"), "--ratio", "0.2", "--calib", FIXTURES / "nope.txt")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, orientation="identity", center_embeddings=True),
                MODEL, "-o", scratch("u.onnx"), "--ratio", "0.2", "--orientation", "identity", "--center-embeddings")
    existing = scratch("existing.onnx")
    existing.write_bytes(b"an earlier result")
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, existing, ratio=0.2),
                MODEL, "-o", existing, "--ratio", "0.2")
    assert existing.read_bytes() == b"an earlier result"
    ids = scratch("big-ids.npy")
    numpy.save(ids, numpy.full((2, 16), 4000, dtype=numpy.int64))
    same_as_cli(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, calib_ids=ids),
                MODEL, "-o", scratch("u.onnx"), "--ratio", "0.2", "--calib-ids", ids)
    # Values the command line's parser refuses: the same words, without clap's usage lines.
    for call, words in [
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, basis="all"), "invalid value 'all' for '--basis'"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), target_size="1x"), "invalid value '1x' for '--target-size'"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, ep="gpu"), "invalid value 'gpu' for '--ep'"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, target_size="50%"), "cannot be used with"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx")), "--ratio"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, calib=TEXT, calib_ids=scratch("ids.npy")), "cannot be used with"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio=0.2, method="nope"), "expected slicegpt, neurons, combined"),
        (lambda: onnx_slice.slice(MODEL, scratch("u.onnx"), ratio="a lot"), "'--ratio'"),
    ]:
        error = raises(onnx_slice.UsageError, call)
        assert words in str(error) and error.exit_code == 2 and isinstance(error, ValueError), str(error)
    assert not scratch("u.onnx").exists()


def test_not_sliceable_is_the_command_lines():
    sliced = scratch("once.onnx")
    onnx_slice.slice(MODEL, sliced, ratio=0.25, orientation="identity")
    same_as_cli(onnx_slice.NotSliceableError, lambda: onnx_slice.slice(sliced, scratch("twice.onnx"), ratio=0.25),
                sliced, "-o", scratch("twice.onnx"), "--ratio", "0.25")


def test_target_unreachable_is_the_command_lines():
    same_as_cli(onnx_slice.TargetUnreachableError,
                lambda: onnx_slice.slice(MODEL, scratch("t.onnx"), target_size="1%", calib=TEXT),
                MODEL, "-o", scratch("t.onnx"), "--target-size", "1%", "--calib", TEXT)
    same_as_cli(onnx_slice.TargetUnreachableError, lambda: onnx_slice.plan(MODEL, target_params=10),
                MODEL, "--dry-run", "--target-params", "10")
    assert not scratch("t.onnx").exists()


def test_failed_work_is_a_slice_error():
    garbage = scratch("garbage.onnx")
    garbage.write_bytes(b"\x08\x07not a model at all")
    same_as_cli(onnx_slice.SliceError, lambda: onnx_slice.slice(garbage, scratch("g.onnx"), ratio=0.25),
                garbage, "-o", scratch("g.onnx"), "--ratio", "0.25")
    assert issubclass(onnx_slice.UsageError, onnx_slice.SliceError)
    assert issubclass(onnx_slice.NotSliceableError, onnx_slice.SliceError)
    assert issubclass(onnx_slice.TargetUnreachableError, onnx_slice.SliceError)


# plan() and inspect(): what --dry-run and inspect --json say.


def test_plan_is_the_dry_run():
    for keywords, flags in [({"target_size": "80%"}, ["--target-size", "80%"]),
                            ({"target_size": "80%", "method": "combined", "stream_ratio": 0.1},
                             ["--target-size", "80%", "--method", "combined", "--stream-ratio", "0.1"]),
                            ({"ratio": 0.5, "basis": "point"}, ["--ratio", "0.5", "--basis", "point"])]:
        dry = onnx_slice.plan(FOLDER, **keywords)
        done = cli(FOLDER, "--dry-run", *flags)
        assert done.returncode == 0 and dry["summary"] == done.stdout, (dry["summary"], done.stdout)
    dry = onnx_slice.plan(FOLDER, target_size="80%")
    assert dry["method"] == "neurons" and dry["basis"] is None and dry["mlp_widths"], dry
    dry = onnx_slice.plan(FOLDER, target_size="80%", method="slicegpt")
    report = onnx_slice.slice(MODEL, scratch("planned.onnx"), target_size="80%", method="slicegpt", calib=TEXT)
    assert dry["widths"] == report["widths"] and dry["after"]["bytes"] == report["weight_bytes_after"]
    assert dry["method"] == "slicegpt" and dry["basis"] == "global"
    assert onnx_slice.plan(MODEL, ratio=0.5, basis="point")["shortcuts"] > 0


# The methods, chosen as the command line chooses them.


def test_methods_write_what_the_command_line_writes():
    short = ("--calib", TEXT, "--calib-samples", "8", "--calib-seqlen", "32")
    for name, keywords, flags, method in [
        ("alone", {"target_size": "80%"}, ["--target-size", "80%"], "neurons"),  # a target alone
        ("uniform", {"target_size": "75%", "uniform_widths": True},
         ["--target-size", "75%", "--uniform-widths"], "neurons"),
        ("combined", {"target_params": 190000, "method": "combined", "stream_ratio": 0.125},
         ["--target-params", "190000", "--method", "combined", "--stream-ratio", "0.125"], "combined"),
        ("basis", {"target_size": "80%", "basis": "block"}, ["--target-size", "80%", "--basis", "block"], "slicegpt"),
        ("ratio", {"ratio": 0.25}, ["--ratio", "0.25"], "slicegpt"),
    ]:
        api, command = scratch(f"m-{name}.onnx"), scratch(f"m-{name}-cli.onnx")
        report = onnx_slice.slice(MODEL, api, calib=TEXT, calib_samples=8, calib_seqlen=32, **keywords)
        done = cli(MODEL, "-o", command, *flags, *short, "-q")
        assert done.returncode == 0, done.stderr
        assert report["method"] == method, (name, report["method"])
        assert api.read_bytes() == command.read_bytes(), f"{name}: the API and the command line differ"
        if method == "slicegpt":
            assert report["mlp_widths"] is None
        else:
            assert report["mlp_widths"] and report["weight_bytes_after"] < report["weight_bytes_before"]
        if name == "uniform":
            assert len(set(report["mlp_widths"])) == 1, report["mlp_widths"]


def test_method_mistakes_are_the_command_lines():
    for keywords, flags in [
        ({"method": "neurons", "ratio": 0.2}, ["--method", "neurons", "--ratio", "0.2"]),
        ({"method": "neurons", "target_size": "80%", "basis": "block"},
         ["--method", "neurons", "--target-size", "80%", "--basis", "block"]),
        ({"method": "combined"}, ["--method", "combined"]),
        ({"ratio": 0.2, "uniform_widths": True}, ["--ratio", "0.2", "--uniform-widths"]),
        ({"target_size": "80"}, ["--target-size", "80"]),
    ]:
        out = scratch("method-mistake.onnx")
        error = raises(onnx_slice.UsageError, lambda: onnx_slice.slice(MODEL, out, **keywords))
        code, message = cli_error(MODEL, "-o", out, *flags)
        assert error.exit_code == code == 2, (keywords, code)
        if keywords != {"target_size": "80"}:
            assert str(error) == message, f"\napi: {error}\ncli: {message}"
        else:  # clap words its own parse errors; the reason is the same
            assert "did you mean 80%?" in str(error) and "did you mean 80%?" in message, (error, message)


def test_inspect_is_inspect_json():
    described = onnx_slice.inspect(FOLDER)
    done = cli("inspect", FOLDER, "--json")
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in described.items() if k != "text"} == json.loads(done.stdout)
    assert described["text"] == cli("inspect", FOLDER).stdout
    assert described["transformer"]["found"]["width"] == 64
    assert "rejected_norm_candidates" in onnx_slice.inspect(MODEL, explain=True)["transformer"]
    error = raises(onnx_slice.UsageError, lambda: onnx_slice.inspect(FIXTURES / "missing.onnx"))
    assert error.exit_code == cli("inspect", FIXTURES / "missing.onnx").returncode == 2


# Ctrl-C, progress, ONNX Runtime's library, the editor's view.


CHILD = """
import signal, sys, numpy, onnx_slice
signal.signal(signal.SIGINT, signal.default_int_handler)
ids = numpy.random.default_rng(0).integers(3, 999, size=(8000, 128))
print("started", flush=True)
try:
    onnx_slice.slice(sys.argv[1], sys.argv[2], ratio=0.25, basis="point", calib_ids=ids, calib_samples=8000)
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""


def test_ctrl_c_stops_the_work_and_leaves_no_output():
    folder = scratch("interrupted")
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(FOLDER), str(folder / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "started"
    time.sleep(1.5)  # loading and the first calibration runs
    child.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, (child.returncode, stderr)
    assert time.monotonic() - started < 30, "the work did not stop at its next calibration batch"
    assert list(folder.iterdir()) == [], list(folder.iterdir())
    # The process goes on after an interrupt: later calls work.
    assert onnx_slice.slice(MODEL, scratch("after.onnx"), ratio=0.25, calib=TEXT)["widths"]


def test_silent_when_stderr_is_not_a_terminal():
    code = ("import onnx_slice, sys; onnx_slice.slice(sys.argv[1], sys.argv[2], ratio=0.25, calib=sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", code, str(MODEL), str(scratch("quiet.onnx")), str(TEXT)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr


def fake_onnxruntime(version: str) -> Path:
    """A folder with an onnxruntime package whose library has this version (an empty file)."""
    root = scratch(f"fake-ort-{version}")
    capi = root / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (root / "onnxruntime" / "__init__.py").write_text("")
    if version:
        (capi / f"libonnxruntime.so.{version}").write_bytes(b"")
    return root


def test_an_onnxruntime_it_cannot_load_is_said_before_loading_it():
    for version, words in [("1.22.0", "ONNX Runtime 1.22.0"), ("", "no ONNX Runtime shared library")]:
        env = {**os.environ, "PYTHONPATH": str(fake_onnxruntime(version))}
        env.pop("ORT_DYLIB_PATH", None)
        done = cli(MODEL, "-o", scratch("o.onnx"), "--ratio", "0.25", env=env)
        assert done.returncode == 1 and words in done.stderr and "1.23 or newer" in done.stderr, done.stderr
        code = ("import onnx_slice, sys\ntry:\n onnx_slice.slice(sys.argv[1], sys.argv[2], ratio=0.25)\n"
                "except onnx_slice.SliceError as e:\n print(e.exit_code, e)")
        api = subprocess.run([sys.executable, "-c", code, str(MODEL), str(scratch("o.onnx"))],
                             capture_output=True, text=True, env=env)
        assert api.stdout.strip() == "1 " + done.stderr[len("error: "):].strip(), (api.stdout, api.stderr)
        # Commands that load no ONNX Runtime still run.
        assert cli("inspect", MODEL, env=env).returncode == 0
    real = importlib_find_spec = _ort.importlib.util.find_spec
    try:
        _ort.importlib.util.find_spec = lambda name: None
        error = raises(onnx_slice.SliceError, onnx_slice.onnxruntime_library)
        assert "no onnxruntime package is installed" in str(error) and "pip install onnxruntime" in str(error)
    finally:
        _ort.importlib.util.find_spec = real
    del importlib_find_spec


def test_the_console_script_uses_the_installed_onnxruntime():
    env = {k: v for k, v in os.environ.items() if k != "ORT_DYLIB_PATH"}
    env["ONNX_SLICE_HOME"] = str(scratch("no-cache"))  # not the setup-ort.sh copy
    report = scratch("console.json")
    done = cli(FOLDER, "-o", scratch("console"), "--ratio", "0.25", "--calib", TEXT, "--report", report, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text())["onnx_runtime"] == onnx_slice.onnxruntime_library().version
    assert cli("--version").stdout.strip() == f"onnx-slice {onnx_slice.__version__}"
    module = subprocess.run([sys.executable, "-m", "onnx_slice", "--version"], capture_output=True, text=True)
    assert module.stdout == cli("--version").stdout


def test_signatures_and_docstrings():
    for function in (onnx_slice.slice, onnx_slice.plan, onnx_slice.inspect):
        signature = pyinspect.signature(function)
        assert function.__doc__ and signature.return_annotation is not pyinspect.Signature.empty
        for name, parameter in signature.parameters.items():
            assert parameter.annotation is not pyinspect.Parameter.empty, name
            if function is onnx_slice.slice and name not in ("model", "output"):
                assert f"{name}:" in function.__doc__, f"slice's docstring does not say what {name} is"
    assert (Path(onnx_slice.__file__).parent / "py.typed").is_file()


def main() -> int:
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, test in tests:
        started = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", onnx_slice.SliceWarning)
                test()
            print(f"ok     {name} ({time.monotonic() - started:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
