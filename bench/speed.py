"""Inference speed of sliced models against the dense one, in ONNX Runtime on the CPU, in one run.

    python bench/speed.py DENSE_DIR SLICED_DIR [SLICED_DIR ...] [--threads N] [--reps R]

Each DIR holds a `model.onnx` (with or without KV cache; decode needs the KV-cache export). For
every model, in interleaved rounds so that machine drift hits all models alike:
- prefill: one run over 1 x 512 and 4 x 128 token ids (empty past for KV-cache exports);
- decode: a 128-token prompt, then 32 single-token steps feeding back the present key/values.
It prints the median seconds per case and the speed-up against the first (dense) model, and the
operator counts of the graph ONNX Runtime actually runs (after its optimizer: fused norms and
attention), so that a sliced model that lost a fusion shows it.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort

FUSED = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization", "RMSNormalization", "GroupQueryAttention", "MultiHeadAttention",
         "Attention", "RotaryEmbedding", "MatMulNBits", "FusedMatMul")


def session(path, threads, optimized_to=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to:
        options.optimized_model_filepath = optimized_to
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def config_of(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    return {
        "kv_heads": config.get("num_key_value_heads", heads),
        "head_dim": config.get("head_dim", config["hidden_size"] // heads),
        "vocab": config["vocab_size"],
    }


def feeds(sess, ids, config, past_len=0, past=None):
    batch, length = ids.shape
    out = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            out[inp.name] = ids
        elif inp.name == "attention_mask":
            out[inp.name] = np.ones((batch, past_len + length), dtype=np.int64)
        elif inp.name == "position_ids":
            out[inp.name] = np.tile(np.arange(past_len, past_len + length, dtype=np.int64), (batch, 1))
        elif inp.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in inp.type else np.float32
            out[inp.name] = past[inp.name] if past is not None else np.zeros(
                (batch, config["kv_heads"], 0, config["head_dim"]), dtype=dtype)
    return out


def has_past(sess):
    return any(i.name.startswith("past_key_values") for i in sess.get_inputs())


def prefill(sess, config, batch, length, rng):
    ids = rng.integers(0, config["vocab"], size=(batch, length), dtype=np.int64)
    start = time.perf_counter()
    sess.run(None, feeds(sess, ids, config))
    return time.perf_counter() - start


def decode(sess, config, rng, prompt=128, steps=32):
    names = [o.name for o in sess.get_outputs()]
    ids = rng.integers(0, config["vocab"], size=(1, prompt), dtype=np.int64)
    outputs = dict(zip(names, sess.run(None, feeds(sess, ids, config))))
    start = time.perf_counter()
    for step in range(steps):
        past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        token = np.argmax(outputs["logits"][:, -1, :], axis=-1).astype(np.int64).reshape(1, 1)
        outputs = dict(zip(names, sess.run(None, feeds(sess, token, config, prompt + step, past))))
    return (time.perf_counter() - start) / steps


def fused_ops(path, threads):
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(path, threads, optimized)
        graph = onnx.load(optimized, load_external_data=False).graph
        counts = Counter(n.op_type for n in graph.node)
    return {op: counts[op] for op in FUSED if counts[op]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    models = []
    for d in args.dirs:
        path = os.path.join(d, "model.onnx")
        models.append((d, session(path, args.threads), config_of(d), fused_ops(path, args.threads)))
    cases = [("prefill 1x512", lambda s, c: prefill(s, c, 1, 512, rng)),
             ("prefill 4x128", lambda s, c: prefill(s, c, 4, 128, rng))]
    if all(has_past(s) for _, s, _, _ in models):
        cases.append(("decode step (after 128)", lambda s, c: decode(s, c, rng)))
    times = {(d, name): [] for d, _, _, _ in models for name, _ in cases}
    for _, sess, config, _ in models:
        for _, run in cases:
            run(sess, config)
    for _ in range(args.reps):
        for d, sess, config, _ in models:
            for name, run in cases:
                times[(d, name)].append(run(sess, config))
    dense = args.dirs[0]
    print(f"ONNX Runtime {ort.__version__}, CPU, {args.threads} threads, median of {args.reps}")
    print("| model | " + " | ".join(name for name, _ in cases) + " | fused ops after ORT's optimizer |")
    print("|---|" + "---|" * (len(cases) + 1))
    for d, _, _, fused in models:
        cells = []
        for name, _ in cases:
            t = statistics.median(times[(d, name)])
            base = statistics.median(times[(dense, name)])
            cells.append(f"{t * 1000:.1f} ms ({base / t:.2f}x)")
        print(f"| {d} | " + " | ".join(cells) + " | " + ", ".join(f"{k} {v}" for k, v in fused.items()) + " |")


if __name__ == "__main__":
    sys.exit(main())
