"""Inference speed of sliced models against the dense one, in ONNX Runtime on the CPU, in one run.

    python bench/speed.py DENSE_DIR SLICED_DIR [SLICED_DIR ...] [--threads N] [--reps R] [--profile]

Each DIR holds a `model.onnx` (with or without KV cache; decode needs the KV-cache export) and the
export's `config.json`. For every model, in interleaved rounds so that machine drift hits all
models alike:
- prefill: one run over 1 x 512 and 4 x 128 token ids (empty past for KV-cache exports);
- decode: a 128-token prompt, then 32 single-token steps feeding back the present key/values.
It prints the median time per case (wall, or with `--clock cpu` the process's CPU time) and the
speed-up against the first (dense) model, the
float weight bytes (share of the dense model's), and the fused operators of the graph ONNX Runtime
actually runs (after its optimizer: fused norms, GELU/SiLU, MatMul variants, attention), so that a
sliced model that lost a fusion shows it. `--profile` adds, per model, where one 1 x 512 prefill
spends its time by operator type (ONNX Runtime's own profiler), and the share of the LM head.
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

# Fused ops in the default domain; every com.microsoft op is a fusion (or a contrib kernel) too.
FUSED_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization")
FLOAT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
               onnx.TensorProto.DOUBLE: 8}


def session(path, threads, optimized_to=None, profile_to=None):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to:
        # The extended level holds every fusion; the full one adds layout changes for convolutions
        # and warns that its serialized graph is machine-specific.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = optimized_to
    if profile_to:
        options.enable_profiling = True
        options.profile_file_prefix = profile_to
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


# The clock the cases are timed with: wall time, or with --clock cpu the CPU time of this process
# (with one intra-op thread ONNX Runtime computes on the calling thread, so CPU time is the work
# done, and a machine shared with other jobs inflates it far less than wall time).
clock = time.perf_counter


def prefill(sess, config, batch, length, rng):
    ids = rng.integers(0, config["vocab"], size=(batch, length), dtype=np.int64)
    start = clock()
    sess.run(None, feeds(sess, ids, config))
    return clock() - start


def decode(sess, config, rng, prompt=128, steps=32):
    names = [o.name for o in sess.get_outputs()]
    ids = rng.integers(0, config["vocab"], size=(1, prompt), dtype=np.int64)
    outputs = dict(zip(names, sess.run(None, feeds(sess, ids, config))))
    start = clock()
    for step in range(steps):
        past = {n.replace("present", "past_key_values"): v for n, v in outputs.items() if n.startswith("present")}
        token = np.argmax(outputs["logits"][:, -1, :], axis=-1).astype(np.int64).reshape(1, 1)
        outputs = dict(zip(names, sess.run(None, feeds(sess, token, config, prompt + step, past))))
    return (clock() - start) / steps


def fused_ops(path, threads):
    """Fused operators ONNX Runtime runs, and the name of the node writing the logits (the head)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        session(path, threads, optimized)
        graph = onnx.load(optimized, load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node
                     if n.domain == "com.microsoft" or n.op_type in FUSED_DEFAULT_DOMAIN)
    head = next((n.name for n in graph.node if "logits" in n.output), None)
    return dict(sorted(counts.items())), head


def weight_bytes(path):
    """Bytes of the float initializers (weights, and the rewrite's constants), as stored."""
    graph = onnx.load(path, load_external_data=False).graph
    return sum(int(np.prod(t.dims, dtype=np.int64)) * FLOAT_BYTES[t.data_type]
               for t in graph.initializer if t.data_type in FLOAT_BYTES)


def profile(path, threads, config, head, rng):
    """Milliseconds per operator type of one 1 x 512 prefill (after a warm-up run), and the head's."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(path, threads, profile_to=os.path.join(tmp, "profile"))
        prefill(sess, config, 1, 512, rng)
        prefill(sess, config, 1, 512, rng)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last_run = runs[-1]["ts"]
    per_op, head_us = Counter(), 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_run:
            per_op[e["args"]["op_name"]] += e["dur"]
            if e["name"] == f"{head}_kernel_time":
                head_us += e["dur"]
    return {op: us / 1000 for op, us in per_op.items()}, head_us / 1000


def label(d, dense):
    return "dense" if d == dense else os.path.basename(os.path.normpath(d))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (meaningful with --threads 1)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one 1 x 512 prefill spends its time, per operator type")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rng = np.random.default_rng(0)
    models = []
    heads = {}
    sizes = {}
    for d in args.dirs:
        path = os.path.join(d, "model.onnx")
        fused, heads[d] = fused_ops(path, args.threads)
        sizes[d] = weight_bytes(path)
        models.append((d, session(path, args.threads), config_of(d), fused))
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
    print(f"ONNX Runtime {ort.__version__}, CPU, {args.threads} threads, {args.clock} time, median of {args.reps}")
    print("| model | weights | " + " | ".join(name for name, _ in cases) + " | fused ops after ORT's optimizer |")
    print("|---|---|" + "---|" * (len(cases) + 1))
    for d, _, _, fused in models:
        cells = [f"{sizes[d] / 1e6:.1f} MB ({100 * sizes[d] / sizes[dense]:.1f} %)"]
        for name, _ in cases:
            t = statistics.median(times[(d, name)])
            base = statistics.median(times[(dense, name)])
            cells.append(f"{t * 1000:.1f} ms ({base / t:.2f}x)")
        print(f"| {label(d, dense)} | " + " | ".join(cells) + " | "
              + ", ".join(f"{k} {v}" for k, v in fused.items()) + " |")
    if args.profile:
        print_profiles(args, models, heads, rng)


def print_profiles(args, models, heads, rng):
    """Per operator type: milliseconds of one 1 x 512 prefill, per model; the head on its own row."""
    profiles = {d: profile(os.path.join(d, "model.onnx"), args.threads, config, heads[d], rng)
                for d, _, config, _ in models}
    dense = args.dirs[0]
    ops = sorted({op for per_op, _ in profiles.values() for op in per_op},
                 key=lambda op: -profiles[dense][0].get(op, 0))
    print(f"\nONNX Runtime profile of one 1x512 prefill, ms per operator type ({args.threads} threads)")
    print("| operator | " + " | ".join(label(d, dense) for d, _, _, _ in models) + " |")
    print("|---|" + "---|" * len(models))
    rows = [("all", lambda p: sum(p[0].values())), ("LM head (MatMul writing the logits)", lambda p: p[1])]
    rows += [(op, lambda p, op=op: p[0].get(op, 0.0)) for op in ops]
    for row, value in rows:
        cells = []
        for d, _, _, _ in models:
            total = sum(profiles[d][0].values())
            cells.append(f"{value(profiles[d]):.1f} ({100 * value(profiles[d]) / total:.0f} %)")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
