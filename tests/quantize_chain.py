#!/usr/bin/env python3
"""Quantize float ONNX language models the way a deployment pipeline does after onnx-slice, run
the float and the quantized models in ONNX Runtime on the same token ids, and print, as JSON, how
far each quantized model's logits are from its float model's.

    quantize_chain.py OUT_DIR NAME=MODEL.onnx [NAME=MODEL.onnx ...] [--ids IDS.npy] [--threads N]

(one process for many models: importing onnxruntime and its quantizers takes seconds). The
quantized models are written to OUT_DIR/NAME/model.int8.onnx and model.int4.onnx.

The two quantizers, called as a user calls them:
  int8  onnxruntime.quantization.quantize_dynamic(MODEL, OUT) with its defaults (weights int8, one
        scale per tensor; activations quantized at run time);
  int4  onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(MODEL, block_size=32,
        is_symmetric=True) (weight-only MatMulNBits; it imports the onnx_ir package).
Both get nodes_to_exclude = the node names the model's metadata lists under
`onnx_slice.quantize_exclude` (a JSON list of strings that onnx-slice writes: the MatMuls a
quantizer should leave in float). No key, or an empty list: nothing is excluded.

Token ids: --ids (an int [N, L] .npy file), else 8 rows of 128 fixed ids in 3..999 (valid for any
vocabulary of 1000 or more and 128 positions or more), no padding, positions from 0, empty cache.

Output (stdout, one JSON object, NAME → result):
  {"model": path, "exclude": [names], "exclude_missing": [listed names that are not nodes],
   "float": {"ok": true, "error": null, "seconds": s},
   "int8": {"ok": bool, "error": text or null, "relative_error": ‖q − f‖ / ‖f‖ over all logits,
            "max_abs_error": ..., "quantized_nodes": {op: count}, "exclude_not_kept": [listed
            names that the quantized model no longer has as a MatMul], "bytes": file size,
            "seconds": s},
   "int4": {...the same}}
A scheme that fails to quantize, load or run has ok false and the error, and a model whose float
run fails has float.ok false: the script still exits 0, so that the caller sees everything.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

import numpy as np
import onnx

METADATA_KEY = "onnx_slice.quantize_exclude"

# Nodes each quantizer writes in place of what it quantized: counted to show that it did something.
QUANTIZED_OPS = {
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "MatMulIntegerToFloat",
    "MatMulNBits",
    "GatherBlockQuantized",
    "DequantizeLinear",
}


def default_ids() -> np.ndarray:
    """8 rows of 128 fixed token ids in 3..999."""
    return np.random.default_rng(24).integers(3, 1000, size=(8, 128), dtype=np.int64)


def excluded_nodes(model: onnx.ModelProto) -> list[str]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            names = json.loads(prop.value) if prop.value.strip() else []
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise SystemExit(f"{METADATA_KEY} is not a JSON list of strings: {prop.value!r}")
            return names
    return []


def feeds(session, ids: np.ndarray) -> dict:
    """The model's inputs for these ids: no padding, positions from 0, an empty cache."""
    batch, length = ids.shape
    dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16}
    out = {}
    for inp in session.get_inputs():
        dtype = dtypes.get(inp.type)
        if dtype is None:
            raise SystemExit(f"input {inp.name}: type {inp.type} is not handled")
        name = inp.name
        if name == "input_ids":
            out[name] = ids.astype(dtype)
        elif name == "attention_mask":
            out[name] = np.ones((batch, length), dtype=dtype)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(length, dtype=dtype), (batch, length)).copy()
        elif name.startswith("past"):
            # [batch, heads, past_length, head_dim]: the symbolic batch first, the past empty.
            shape, seen_symbolic = [], False
            for dim in inp.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                else:
                    shape.append(batch if not seen_symbolic else 0)
                    seen_symbolic = True
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            raise SystemExit(f"input {name} is not one this script knows how to fill")
    return out


def run(path: str, ids: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    logits = "logits" if "logits" in names else names[0]
    (out,) = session.run([logits], feeds(session, ids))
    return out.astype(np.float64)


def quantize(scheme: str, src: str, dst: str, exclude: list[str]) -> None:
    if scheme == "int8":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(src, dst, nodes_to_exclude=exclude)
    elif scheme == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(src, block_size=32, is_symmetric=True,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, False)
    else:
        raise ValueError(scheme)


def chain(path: str, out_dir: str, ids: np.ndarray, threads: int) -> dict:
    model = onnx.load(path, load_external_data=False)
    exclude = excluded_nodes(model)
    node_names = {n.name for n in model.graph.node}
    result = {
        "model": path,
        "exclude": exclude,
        "exclude_missing": [n for n in exclude if n not in node_names],
    }
    del model

    started = time.perf_counter()
    try:
        reference = run(path, ids, threads)
        if not np.all(np.isfinite(reference)):
            raise RuntimeError("non-finite logits")
    except Exception as e:
        result["float"] = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        return result
    result["float"] = {"ok": True, "error": None, "seconds": time.perf_counter() - started}
    norm = float(np.linalg.norm(reference))

    os.makedirs(out_dir, exist_ok=True)
    for scheme in ("int8", "int4"):
        dst = os.path.join(out_dir, f"model.{scheme}.onnx")
        started = time.perf_counter()
        entry = {"ok": False, "error": None}
        try:
            quantize(scheme, path, dst, exclude)
            ops: dict[str, int] = {}
            matmuls = set()
            for node in onnx.load(dst, load_external_data=False).graph.node:
                if node.op_type in QUANTIZED_OPS:
                    ops[node.op_type] = ops.get(node.op_type, 0) + 1
                if node.op_type == "MatMul":
                    matmuls.add(node.name)
            entry["quantized_nodes"] = ops
            entry["exclude_not_kept"] = [n for n in exclude if n not in matmuls]
            entry["bytes"] = os.path.getsize(dst)
            got = run(dst, ids, threads)
            if got.shape != reference.shape:
                raise RuntimeError(f"logits {list(got.shape)}, float model {list(reference.shape)}")
            if not np.all(np.isfinite(got)):
                raise RuntimeError("non-finite logits")
            entry["relative_error"] = float(np.linalg.norm(got - reference)) / norm
            entry["max_abs_error"] = float(np.max(np.abs(got - reference)))
            entry["ok"] = True
        except Exception as e:  # every failure is reported, per scheme
            entry["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
            entry["traceback"] = traceback.format_exc(limit=4)
        entry["seconds"] = time.perf_counter() - started
        result[scheme] = entry
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    parser.add_argument("--ids", help="token ids, an int [N, L] .npy file (default: 8 × 128 fixed ids)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    # The quantizers log every node they visit.
    logging.disable(logging.WARNING)

    ids = np.load(args.ids).astype(np.int64) if args.ids else default_ids()
    results = {}
    for item in args.models:
        name, sep, path = item.partition("=")
        if not sep or not name or "/" in name or name in results:
            raise SystemExit(f"{item!r}: expected NAME=MODEL.onnx with a new NAME without '/'")
        results[name] = chain(path, os.path.join(args.out_dir, name), ids, args.threads)

    json.dump(results, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
