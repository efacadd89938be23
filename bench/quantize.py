#!/usr/bin/env python3
"""Quantize dense and sliced models with ONNX Runtime's own quantizers, measure what it costs, and
find where the cost comes from (issue 24: slice, then quantize).

The two quantizers a deployment pipeline runs after slicing, as they come:
  int8  onnxruntime.quantization.quantize_dynamic(model, out) with its defaults: weights int8,
        symmetric, ONE scale per tensor; activations uint8, asymmetric, one scale per tensor,
        computed at run time (DynamicQuantizeLinear); MatMuls with a constant B and Gathers of a
        constant table (the embedding; a tied head's Transpose of that table follows it).
  int4  onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer(model,
        block_size=32, is_symmetric=True): weight-only, one scale per block of 32 input rows of
        each output column (MatMulNBits), MatMuls with a constant B only.

Subcommands (perplexity always from `onnx-slice eval`, the tool's own evaluator; see --bin):
  quantize MODEL OUT --scheme int8|int4 [--only SEL] [--exclude SEL]
  table NAME=MODEL ...          float / int8 / int4 perplexity and bytes, side by side
  diagnose MODEL --scheme S     quantize each group of MatMuls alone (the rest float), and all
                                but each group, and rank the groups by the perplexity they cost
  nodes MODEL                   the quantizable nodes and their group
  rotate MODEL OUT              an orthogonal rotation inside every basis group of a sliced model
                                (random orthogonal or randomized Hadamard), exact in float
  fakequant MODEL OUT           int8 weights alone or int8 activations alone (the two halves of
                                quantize_dynamic), to tell which half costs
  stats MODEL ...               weight and activation ranges of the quantized nodes, by group
  smooth MODEL OUT              per-channel gains in the rewritten norms, moved into the readers

Selectors (SEL): comma-separated groups: a kind (q k v o gate up down head emb_adapter
head_adapter shortcut embed head_table), `kind@L` for one layer, `@L` for every kind of a layer.

Every perplexity is cached in bench/out/quant/results.jsonl (key: model bytes and mtime, variant,
windows), so an interrupted run keeps what it measured and a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quant"
RESULTS = OUT / "results.jsonl"
TOOLS = HERE.parent.parent / "shared" / "tools" / "smollm2"
KINDS = ["q", "k", "v", "o", "gate", "up", "down", "head", "emb_adapter", "head_adapter",
         "shortcut", "embed", "head_table"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The graph: which nodes the quantizers touch, and what they are


def load(path):
    return onnx.load(str(path))


class Graph:
    def __init__(self, model):
        self.model = model
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {}
        self.consumers = {}
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def arr(self, name):
        return numpy_helper.to_array(self.inits[name])

    def set(self, name, a):
        t = numpy_helper.from_array(np.ascontiguousarray(a.astype(np.float32)), name)
        self.inits[name].CopyFrom(t)


LAYER_RX = re.compile(r"/layers\.(\d+)/")
PROJ_RX = re.compile(r"/layers\.(\d+)/(?:self_attn|mlp)/(q|k|v|o|gate|up|down)_proj/MatMul$")


def residual_layer(gr, node):
    """The layer of the residual Add a shortcut's output goes into."""
    seen = [node]
    while seen:
        n = seen.pop()
        for c in gr.consumers.get(n.output[0], []):
            m = LAYER_RX.search(c.name)
            if m:
                return int(m.group(1))
            seen.append(c)
    return None


def quantizable(model):
    """[(node name, op, kind, layer)] for every node either quantizer may touch."""
    gr = Graph(model)
    out = []
    tables = set()
    for n in model.graph.node:
        if n.op_type == "Gather" and n.input[0] in gr.inits and len(gr.inits[n.input[0]].dims) == 2:
            out.append((n.name, n.op_type, "embed", None))
            tables.add(n.input[0])
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.input[0] in tables:
            out.append((n.name, n.op_type, "head_table", None))
        if n.op_type != "MatMul":
            continue
        const_b = n.input[1] in gr.inits
        m = PROJ_RX.search(n.name)
        if m:
            kind, layer = m.group(2), int(m.group(1))
        elif n.name.startswith("onnx_slice/EmbeddingAdapter"):
            kind, layer = "emb_adapter", None
        elif n.name.startswith("onnx_slice/HeadAdapter"):
            kind, layer = "head_adapter", None
        elif n.name.startswith("onnx_slice/shortcut"):
            kind, layer = "shortcut", residual_layer(gr, n)
        elif "lm_head" in n.name:
            kind, layer = "head", None
        elif const_b:
            kind, layer = "other", None
        else:
            continue  # activation × activation (attention) or rotary: no quantizer touches it
        if not const_b:
            continue  # the tied head reads the table through a Transpose: see head_table
        out.append((n.name, n.op_type, kind, layer))
    return out


def select(nodes, sel):
    """The node names a selector string picks (see the module doc)."""
    if not sel:
        return []
    names = []
    for part in sel.split(","):
        part = part.strip()
        kind, _, layer = part.partition("@")
        for name, _op, k, l in nodes:
            if (not kind or k == kind) and (not layer or l == int(layer)):
                names.append(name)
    return sorted(set(names))


# ----------------------------------------------------------------------------------------------
# Quantizing


def recipe_exclusions(model):
    """The nodes onnx-slice asks quantizers to leave in float (its metadata
    onnx_slice.quantize_exclude, a JSON list; none for a model it did not write)."""
    for prop in model.metadata_props:
        if prop.key == "onnx_slice.quantize_exclude":
            return json.loads(prop.value)
    return []


def quantize_as_recipe(model, dst, scheme):
    """The README's recipe: the quantizer's defaults, with nodes_to_exclude from the model."""
    exclude = recipe_exclusions(model)
    if scheme == "int8":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(model, str(dst), nodes_to_exclude=exclude)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, nodes_to_exclude=exclude)
        q.process()
        q.model.save_model_to_file(str(dst), False)
    return exclude


def quantize(src, dst, scheme, only=None, exclude=None):
    """Quantize src into dst with ONNX Runtime's quantizer for the scheme. only / exclude:
    selectors; only=None quantizes everything the quantizer takes by default; exclude="recipe"
    excludes what the model's metadata names (quantize_as_recipe)."""
    logging.getLogger().setLevel(logging.ERROR)
    model = load(src)
    if exclude == "recipe" and only is None:
        excluded = set(quantize_as_recipe(model, dst, scheme))
        return [n for n, *_ in quantizable(model) if n not in excluded]
    nodes = quantizable(model)
    everything = [n for n, *_ in nodes]
    keep = select(nodes, only) if only else everything
    keep = [n for n in keep if n not in set(select(nodes, exclude))]
    if not keep:
        raise SystemExit(f"quantize: the selection {only!r} minus {exclude!r} is empty")
    if scheme == "int8":
        from onnxruntime.quantization import quantize_dynamic

        if only is None and exclude is None:
            quantize_dynamic(model, str(dst))  # defaults, exactly what a pipeline runs
        else:
            # nodes_to_quantize restricts quantization to these nodes (a tied head's Transpose is
            # quantized only when its table is, through the Gather)
            quantize_dynamic(model, str(dst), nodes_to_quantize=keep,
                             nodes_to_exclude=[n for n in everything if n not in keep])
    elif scheme == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # the module logs every node it visits at INFO
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)

        # nodes_to_include ADDS to the MatMuls quantized by type; exclusion is what restricts
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True,
                                 nodes_to_exclude=[n for n in everything if n not in keep])
        q.process()
        q.model.save_model_to_file(str(dst), False)
    else:
        raise SystemExit(f"unknown scheme {scheme}")
    return keep


# ----------------------------------------------------------------------------------------------
# Perplexity through onnx-slice eval, cached


def model_key(path):
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{int(st.st_mtime)}"


def cached(key):
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            r = json.loads(line)
            if r["key"] == key:
                return r
    return None


def record(r):
    OUT.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(r) + "\n")


def evaluate(args, path, windows):
    cmd = [args.bin, "eval", str(path), "--ids", str(args.ids), "--ignore-id", "2", "--batch", "4",
           "--json"]
    if windows < 64:
        cmd += ["--max-windows", str(windows)]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"eval failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    j = json.loads(p.stdout)
    return {"perplexity": j["perplexity"], "mean_nll": j["mean_nll"], "windows": j["windows"],
            "eval_s": round(time.time() - t, 1)}


def measure(args, model, variant, windows, make=None):
    """Perplexity of `model` transformed by `make(src, dst)` (None: the model itself), cached
    under (model, variant, windows). Returns the record (with the written bytes)."""
    key = f"{model_key(model)}|{variant}|{windows}"
    r = cached(key)
    if r:
        return r
    t = time.time()
    if make is None:
        path, nbytes, tmp = model, os.path.getsize(model), None
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "tmp").mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=OUT / "tmp")
        os.close(fd)
        extra = make(model, tmp) or {}
        path, nbytes = tmp, os.path.getsize(tmp)
    make_s = round(time.time() - t, 1)
    try:
        e = evaluate(args, path, windows)
    finally:
        if tmp and not args.keep:
            os.unlink(tmp)
    r = {"key": key, "model": str(model), "variant": variant, "bytes": nbytes, "make_s": make_s, **e}
    if make is not None and isinstance(extra, dict):
        r.update(extra)
    record(r)
    log(f"  {Path(model).name} {variant} w{windows}: ppl {r['perplexity']:.3f} ({nbytes:,} B, "
        f"{make_s}+{e['eval_s']} s)")
    return r


def quant_maker(scheme, only=None, exclude=None):
    def make(src, dst):
        keep = quantize(src, dst, scheme, only, exclude)
        return {"quantized_nodes": len(keep)}
    return make


def variant_name(scheme, only=None, exclude=None, path=None):
    if exclude == "recipe" and path is not None and not recipe_exclusions(load(path)):
        exclude = None  # nothing to exclude: the quantizer's defaults, the same variant
    v = scheme
    if only:
        v += f" only={only}"
    if exclude:
        v += f" exclude={exclude}"
    return v


# ----------------------------------------------------------------------------------------------
# Subcommands


def cmd_nodes(args):
    nodes = quantizable(load(args.model))
    by = {}
    for name, op, kind, layer in nodes:
        by.setdefault(kind, []).append((layer, name))
    for kind, v in by.items():
        print(f"{kind}: {len(v)}  e.g. {v[0][1]}")


def cmd_quantize(args):
    keep = quantize(args.model, args.out, args.scheme, args.only, args.exclude)
    log(f"quantized {len(keep)} nodes → {args.out} ({os.path.getsize(args.out):,} bytes)")


def parse_models(specs):
    out = []
    for s in specs:
        name, _, path = s.partition("=")
        out.append((name, Path(path)))
    return out


def cmd_table(args):
    """NAME=MODEL[:EXCLUDE]: EXCLUDE (a selector) is left float by both quantizers."""
    rows = []
    for name, spec in parse_models(args.models):
        path, _, ex = str(spec).partition(":")
        ex = ex or None
        f = measure(args, path, "float", args.windows)
        q8 = measure(args, path, variant_name("int8", exclude=ex, path=path), args.windows,
                     quant_maker("int8", exclude=ex))
        q4 = measure(args, path, variant_name("int4", exclude=ex, path=path), args.windows,
                     quant_maker("int4", exclude=ex))
        rows.append((name, f, q8, q4))
    print(f"\nBrown, {args.windows} windows × 512 tokens (id 2 ignored), onnx-slice eval, CPU\n")
    print("| model | float ppl | int8 ppl | int8 / float | int4 ppl | int4 / float | float bytes |"
          " int8 bytes | int4 bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f, q8, q4 in rows:
        print(f"| {name} | {f['perplexity']:.2f} | {q8['perplexity']:.2f} | "
              f"{q8['perplexity'] / f['perplexity']:.2f}× | {q4['perplexity']:.2f} | "
              f"{q4['perplexity'] / f['perplexity']:.2f}× | {f['bytes']:,} | {q8['bytes']:,} | "
              f"{q4['bytes']:,} |")


def cmd_diagnose(args):
    nodes = quantizable(load(args.model))
    kinds = [k for k in KINDS if any(n[2] == k for n in nodes)]
    if args.scheme == "int4":
        kinds = [k for k in kinds if k not in ("embed", "head_table")]
    if args.scheme == "int8" and "head_table" in kinds:
        # the tied head's table is quantized only with the embedding's (one quantized table)
        kinds.remove("head_table")
    if args.layers:
        groups = []
        for kind in args.layers.split(","):
            layers = sorted({n[3] for n in nodes if n[2] == kind and n[3] is not None})
            groups += [f"{kind}@{l}" for l in layers]
    else:
        groups = kinds
    f = measure(args, args.model, "float", args.windows)
    full = measure(args, args.model, args.scheme, args.windows, quant_maker(args.scheme))
    rows = []
    for g in groups:
        n = len(select(nodes, g))
        alone = measure(args, args.model, variant_name(args.scheme, only=g), args.windows,
                        quant_maker(args.scheme, only=g)) if "alone" in args.modes else None
        kind = g.partition("@")[0]
        without = measure(args, args.model, variant_name(args.scheme, exclude=g), args.windows,
                          quant_maker(args.scheme, exclude=g)) if (
            "without" in args.modes and kind in args.without_kinds.split(",")) else None
        rows.append((g, n, alone, without))
    fp, qp = f["perplexity"], full["perplexity"]
    print(f"\n{Path(args.model).name}, {args.scheme}, {args.windows} windows: float {fp:.2f}, "
          f"all quantized {qp:.2f} ({qp / fp:.2f}×)\n")
    print("| group | nodes | alone: ppl | alone / float | all but it: ppl | all but it / float |"
          " share of the loss recovered |")
    print("|---|---|---|---|---|---|---|")
    key = (lambda r: -(r[2]["perplexity"] if r[2] else 0)) if "alone" in args.modes else (
        lambda r: r[3]["perplexity"] if r[3] else float("inf"))
    for g, n, alone, without in sorted(rows, key=key):
        a = f"{alone['perplexity']:.2f} | {alone['perplexity'] / fp:.3f}×" if alone else "– | –"
        if without:
            w = without["perplexity"]
            rec = (np.log(qp) - np.log(w)) / (np.log(qp) - np.log(fp)) if qp != fp else 0
            b = f"{w:.2f} | {w / fp:.3f}× | {100 * rec:.0f} %"
        else:
            b = "– | – | –"
        print(f"| {g} | {n} | {a} | {b} |")


def cmd_measure(args):
    """One perplexity: the model, or the model quantized with a selection."""
    if args.scheme == "float":
        r = measure(args, args.model, "float", args.windows)
    else:
        r = measure(args, args.model, variant_name(args.scheme, args.only, args.exclude),
                    args.windows, quant_maker(args.scheme, args.only, args.exclude))
    print(json.dumps({k: r[k] for k in ("variant", "perplexity", "bytes", "windows")}))


# ----------------------------------------------------------------------------------------------
# The stream: points, the basis groups that share a rotation, readers and writers


def stream_structure(model):
    """Find the residual stream of a model written by onnx-slice (or the dense export): its
    points (tensors between blocks), which MatMuls read each point through a norm (readers),
    read it directly (shortcuts), and write into it (writers), and which points share a basis
    (joined by an identity skip). Returns (points, groups, readers, writers, shortcuts, gains)."""
    gr = Graph(model)
    adds = [n for n in model.graph.node if n.op_type == "Add" and re.search(
        r"/layers\.\d+/Add(_1)?$", n.name)]
    emb = [n for n in model.graph.node if n.name.startswith("onnx_slice/EmbeddingAdapter")]
    points = [emb[0].output[0]] if emb else []
    points += [a.output[0] for a in adds]
    pset = set(points)

    def matmul_const(n):
        return n.op_type == "MatMul" and n.input[1] in gr.inits

    writers = {}  # MatMul name → point it writes
    shortcuts = {}  # MatMul name → (point it reads, point it writes)
    skips = []  # (point, point) joined by an identity skip
    if emb:
        writers[emb[0].name] = points[0]
    def alias(t):  # a Cast or Identity of a point is the point (the export casts the stream)
        p = gr.producer.get(t)
        while p is not None and p.op_type in ("Cast", "Identity") and t not in pset:
            t = p.input[0]
            p = gr.producer.get(t)
        return t

    for a in adds:
        for i in a.input:
            if alias(i) in pset:
                continue
            p = gr.producer.get(i)
            if p is None or not matmul_const(p):
                raise SystemExit(f"stream: {a.name} input {i} is not a point or a MatMul")
            if alias(p.input[0]) in pset:
                shortcuts[p.name] = (alias(p.input[0]), a.output[0])
            else:
                writers[p.name] = a.output[0]
        for i in a.input:
            if alias(i) in pset:
                skips.append((alias(i), a.output[0]))
    # readers: MatMuls fed by the norm of a point
    readers = {}
    gains = {}
    for p in points:
        for c in gr.consumers.get(p, []):
            if c.op_type == "Div":  # the norm: x / rms(x), then its gain
                (mul,) = gr.consumers[c.output[0]]
                assert mul.op_type == "Mul", mul.name
                gains[p] = mul
                for r in gr.consumers[mul.output[0]]:
                    if matmul_const(r):
                        readers[r.name] = p
    # basis groups: union of points joined by identity skips
    parent = {p: p for p in points}

    def root(p):
        while parent[p] != p:
            p = parent[p]
        return p
    for a, b in skips:
        parent[root(a)] = root(b)
    groups = {}
    for p in points:
        groups.setdefault(root(p), []).append(p)
    return gr, points, groups, readers, writers, shortcuts, gains


def hadamard(n):
    """A Hadamard matrix of order n (entries ±1), from Sylvester doubling of a Paley I matrix
    (q + 1 for a prime q ≡ 3 mod 4), or None."""
    def is_prime(q):
        return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))

    def paley(q):
        m = q + 1
        chi = np.zeros(q, dtype=np.int64)
        squares = {(x * x) % q for x in range(1, q)}
        for x in range(1, q):
            chi[x] = 1 if x in squares else -1
        Q = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
        S = np.zeros((m, m), dtype=np.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = Q
        return S + np.eye(m, dtype=np.int64)

    base, a = n, 0
    while True:
        if base == 1:
            H = np.ones((1, 1), dtype=np.int64)
            break
        if base % 4 == 0 and is_prime(base - 1) and (base - 1) % 4 == 3:
            H = paley(base - 1)
            break
        if base % 2:
            return None
        base //= 2
        a += 1
    for _ in range(a):
        H = np.block([[H, H], [H, -H]])
    assert (H @ H.T == n * np.eye(n)).all()
    return H


def rotation(k, kind, rng):
    if kind == "random":
        q, r = np.linalg.qr(rng.standard_normal((k, k)))
        return q * np.sign(np.diag(r))
    if kind == "hadamard":
        H = hadamard(k)
        if H is None:
            raise SystemExit(f"no Hadamard matrix of order {k} here (Sylvester × Paley I)")
        signs = rng.choice([-1.0, 1.0], size=k)
        return (signs[:, None] * H) / np.sqrt(k)
    raise SystemExit(f"unknown rotation {kind}")


def cmd_rotate(args):
    model = load(args.model)
    gr, points, groups, readers, writers, shortcuts, gains = stream_structure(model)
    rng = np.random.default_rng(args.seed)
    width = {p: gr.arr(_b(gr, name)).shape[1] for name, p in writers.items()}
    R = {}
    for rootp, members in groups.items():
        k = width.get(rootp) or next(width[m] for m in members if m in width)
        if args.skip_width and k in args.skip_width:
            continue
        Rg = rotation(k, args.rotation, rng)
        for m in members:
            R[m] = Rg
    # the norms' gains must be uniform within a rotated group (they commute with R then)
    for p, mul in gains.items():
        if p in R:
            g = [gr.arr(i) for i in mul.input if i in gr.inits][0]
            if np.ptp(g) > 1e-6 * np.abs(g).max():
                raise SystemExit(f"norm gain at {p} is not uniform: a rotation would change it")
    done = 0
    for name, p in readers.items():
        if p in R:
            b = _b(gr, name)
            gr.set(b, R[p].T @ gr.arr(b).astype(np.float64))
            done += 1
    for name, p in writers.items():
        if p in R:
            b = _b(gr, name)
            gr.set(b, gr.arr(b).astype(np.float64) @ R[p])
            done += 1
    for name, (pa, pb) in shortcuts.items():
        b = _b(gr, name)
        w = gr.arr(b).astype(np.float64)
        if pa in R:
            w = R[pa].T @ w
        if pb in R:
            w = w @ R[pb]
        gr.set(b, w)
        done += 1
    onnx.save(model, str(args.out))
    log(f"rotate: {len(groups)} basis groups ({sum(1 for g in groups if g in R)} rotated), "
        f"{done} weights rewritten → {args.out}")
    if args.check:
        check_same(args.model, args.out)


def cmd_padskip(args):
    """Choose the unsliced last point's basis (free: it keeps full width) so that each skip into
    it becomes [I 0], and write that skip as a zero Pad instead of a MatMul. Exact in float."""
    model = load(args.model)
    gr, points, groups, readers, writers, shortcuts, gains = stream_structure(model)
    final = points[-1]
    (sc,) = [n for n, (pa, pb) in shortcuts.items() if pb == final]
    S = gr.arr(_b(gr, sc)).astype(np.float64)  # k × D, orthonormal rows
    k, D = S.shape
    assert np.abs(S @ S.T - np.eye(k)).max() < 1e-4, "the last skip is not a partial isometry"
    # R = [Sᵀ | N]: N an orthonormal basis of the complement of S's rows
    u, _, _ = np.linalg.svd(S.T, full_matrices=True)
    R = np.concatenate([S.T, u[:, k:]], axis=1)
    for name, p in readers.items():
        if p == final:
            b = _b(gr, name)
            gr.set(b, R.T @ gr.arr(b).astype(np.float64))
    for name, p in writers.items():
        if p == final:
            b = _b(gr, name)
            gr.set(b, gr.arr(b).astype(np.float64) @ R)
    node = next(n for n in model.graph.node if n.name == sc)
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, D - k], np.int64), f"{sc}/pads")
    model.graph.initializer.append(pads)
    pad = helper.make_node("Pad", [node.input[0], pads.name], list(node.output), name=f"{sc}/Pad")
    idx = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(idx, pad)
    old = node.input[1]
    if not any(old in n.input for n in model.graph.node):
        model.graph.initializer.remove(gr.inits[old])
    onnx.save(model, str(args.out))
    log(f"padskip: {sc} ({k}×{D}) → Pad; the last point's readers and writers rotated → "
        f"{args.out}")
    if args.check:
        check_same(args.model, args.out)


def _b(gr, node_name):
    for n in gr.model.graph.node:
        if n.name == node_name:
            return n.input[1]
    raise KeyError(node_name)


def ort_session(path, outputs=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if outputs:
        m = load(path)
        have = {o.name for o in m.graph.output}
        for o in outputs:
            if o not in have:
                m.graph.output.append(helper.make_empty_tensor_value_info(o))
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(ids):
    b, s = ids.shape
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1))}


def check_same(a, b, windows=2, tokens=128):
    ids = np.load(TOOLS / "eval_ids_brown.npy")[:windows, :tokens]
    la = ort_session(a).run(["logits"], feeds(ids))[0]
    lb = ort_session(b).run(["logits"], feeds(ids))[0]
    d = np.abs(la - lb).max()
    rel = d / np.abs(la).max()
    log(f"check: max |Δlogits| = {d:.3g} (logits up to {np.abs(la).max():.3g}; relative {rel:.3g})")
    return d, rel


# ----------------------------------------------------------------------------------------------
# Halves of int8: weights alone (per-tensor symmetric int8, the formula quantize_dynamic uses) or
# activations alone (DynamicQuantizeLinear → DequantizeLinear before the MatMul: what
# quantize_dynamic does to the activation, with the float weights)


def fakequant(src, dst, part, only=None, exclude=None):
    model = load(src)
    nodes = quantizable(model)
    names = set(select(nodes, only) if only else [n for n, _, k, _ in nodes])
    names -= set(select(nodes, exclude))
    gr = Graph(model)
    matmuls = {n.name for n in model.graph.node if n.name in names and n.op_type == "MatMul"}
    if part == "weights":
        for n in model.graph.node:
            if n.name in matmuls:
                gr.set(n.input[1], int8_q(gr.arr(n.input[1]).astype(np.float64)))
    elif part == "acts":
        done = {}
        new_nodes = []
        for n in model.graph.node:
            if n.name in matmuls:
                x = n.input[0]
                if x not in done:
                    q, s, z, d = (f"{x}/fq_q", f"{x}/fq_s", f"{x}/fq_z", f"{x}/fq")
                    new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [q, s, z],
                                                      name=f"{x}/FqQuant"))
                    new_nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [d],
                                                      name=f"{x}/FqDequant"))
                    done[x] = d
                n.input[0] = done[x]
            new_nodes.append(n)
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
    else:
        raise SystemExit(f"unknown part {part}")
    onnx.save(model, str(dst))
    return {"quantized_nodes": len(matmuls)}


def cmd_fakequant(args):
    r = fakequant(args.model, args.out, args.part, args.only, args.exclude)
    log(f"fakequant {args.part}: {r['quantized_nodes']} MatMuls → {args.out}")


def cmd_split(args):
    """int8 taken apart: quantize_dynamic's MatMuls with only their weights quantized (int8 per
    tensor, activations float) or only their activations (DynamicQuantizeLinear → Dequantize,
    weights float); the embedding Gather and the tied head's table stay float in both."""
    rows = []
    for name, path in parse_models(args.models):
        f = measure(args, path, "float", args.windows)
        q8 = measure(args, path, "int8", args.windows, quant_maker("int8"))
        ex = measure(args, path, "int8 exclude=embed", args.windows,
                     quant_maker("int8", exclude="embed"))
        w = measure(args, path, "fake int8 weights", args.windows,
                    lambda a, b: fakequant(a, b, "weights"))
        x = measure(args, path, "fake uint8 activations", args.windows,
                    lambda a, b: fakequant(a, b, "acts"))
        rows.append((name, f, q8, ex, w, x))
    print(f"\nBrown, {args.windows} windows × 512 tokens; ppl (ratio to float)\n")
    print("| model | float | int8 (quantize_dynamic) | int8, table float | weights only |"
          " activations only |")
    print("|---|---|---|---|---|---|")
    for name, f, *rs in rows:
        fp = f["perplexity"]
        cells = " | ".join(f"{r['perplexity']:.2f} ({r['perplexity'] / fp:.2f}×)" for r in rs)
        print(f"| {name} | {fp:.2f} | {cells} |")


# ----------------------------------------------------------------------------------------------
# Statistics: weights (per tensor and per int4 block) and the activations quantize_dynamic sees


def weight_stats(w):
    a = np.abs(w.astype(np.float64))
    k = a.shape[0] - a.shape[0] % 32
    blocks = a[:k].reshape(k // 32, 32, a.shape[1])
    bmax = blocks.max(axis=1)
    bmean = blocks.mean(axis=1)
    return {
        "tensor_max/absmean": a.max() / a.mean(),
        "block32_max/absmean": float(np.mean(bmax / np.maximum(bmean, 1e-30))),
        # mean squared int4 rounding error relative to the weights' energy: what RTN costs
        "int4_rel_err": float(int4_err(w)),
        "int8_rel_err": float(int8_err(w)),
    }


def int8_q(w):
    """quantize_dynamic's weights: int8, symmetric, one scale per tensor, absmax / 127 (checked
    against onnxruntime.quantization.quant_utils.quantize_data)."""
    s = np.abs(w).max() / 127.0
    return np.clip(np.round(w / s), -127, 127) * s


def int4_q(w):
    """MatMulNBits' symmetric int4 (the quantizer's C++ kernel, checked against it): blocks of
    32 input rows per output column (the last one zero-padded), scale = the block's largest-magnitude
    value / -8 (it maps to -8 exactly), round to nearest, clip to [-8, 7]."""
    n = w.shape[0]
    k = -(-n // 32) * 32
    p = np.zeros((k, w.shape[1]), w.dtype)
    p[:n] = w
    b = p.reshape(k // 32, 32, w.shape[1])
    idx = np.abs(b).argmax(axis=1)[:, None, :]
    s = np.take_along_axis(b, idx, axis=1) / -8.0
    s = np.where(s == 0, 1, s)
    return (np.clip(np.round(b / s), -8, 7) * s).reshape(k, w.shape[1])[:n]


def int8_err(w):
    w = w.astype(np.float64)
    return np.sum((int8_q(w) - w) ** 2) / np.sum(w ** 2)


def int4_err(w):
    w = w.astype(np.float64)
    return np.sum((int4_q(w) - w) ** 2) / np.sum(w ** 2)


def cmd_stats(args):
    ids = np.load(TOOLS / "eval_ids_brown.npy")[:args.windows]
    out = {}
    for name, path in parse_models(args.models):
        model = load(path)
        nodes = quantizable(model)
        gr = Graph(model)
        by_name = {n.name: n for n in model.graph.node}
        acts = sorted({by_name[n].input[0] for n, op, _, _ in nodes if op == "MatMul"})
        sess = ort_session(path, acts)
        vals = {}
        cov = {}
        for i in range(len(ids)):
            res = sess.run(acts, feeds(ids[i:i + 1]))
            for a, v in zip(acts, res):
                v = v.reshape(-1, v.shape[-1]).astype(np.float64)
                s = vals.setdefault(a, [0.0, 0.0, 0, None, 0.0, 0.0])
                s[0] = max(s[0], np.abs(v).max())
                s[4] = min(s[4], v.min())  # the per-window range DynamicQuantizeLinear takes
                s[5] = max(s[5], v.max())
                s[1] += np.sum(v ** 2)
                s[2] += v.size
                ch = np.abs(v).max(axis=0)
                s[3] = ch if s[3] is None else np.maximum(s[3], ch)
                cov[a] = cov.get(a, 0) + v.T @ v
        rows = {}
        for n, op, kind, layer in nodes:
            if op != "MatMul":
                continue
            node = by_name[n]
            w = gr.arr(node.input[1]).astype(np.float64)
            ws = weight_stats(w)
            # the error of the product the quantized weight makes, relative to the product, on
            # these activations: tr(ΔWᵀ C ΔW) / tr(Wᵀ C W), C = Σ xᵀx
            C = cov[node.input[0]]
            base = np.sum(w * (C @ w))
            for label, q in (("int8w_out_err", int8_q(w)), ("int4_out_err", int4_q(w))):
                d = q - w
                ws[label] = float(np.sum(d * (C @ d)) / base)
            amax, sq, cnt, ch, vmin, vmax = vals[node.input[0]]
            rms = np.sqrt(sq / cnt)
            # uint8 per-tensor dynamic quantization: step = (max(x, 0) − min(x, 0)) / 255 over
            # the whole tensor; relative error of the activation's energy ≈ step² / 12 / rms²
            act_err = (((vmax - vmin) / 255) ** 2 / 12) / rms ** 2
            top = np.sort(ch)[::-1]
            rows[n] = {"kind": kind, "layer": layer, **ws, "act_max/rms": amax / rms,
                       "act_int8_rel_err": act_err,
                       "act_top_channel/median_channel": float(top[0] / np.median(ch)),
                       "act_argmax_channel": int(np.argmax(ch))}
        out[name] = rows
        log(f"stats: {name} done")
    Path(args.json).write_text(json.dumps(out, indent=1))
    # summary by kind: medians over layers
    cols = ["tensor_max/absmean", "int8_rel_err", "int8w_out_err", "int4_rel_err", "int4_out_err",
            "act_max/rms", "act_int8_rel_err"]
    print("| model | kind | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, rows in out.items():
        kinds = []
        for r in rows.values():
            if r["kind"] not in kinds:
                kinds.append(r["kind"])
        for k in kinds:
            rs = [r for r in rows.values() if r["kind"] == k]
            cells = [f"{np.median([r[c] for r in rs]):.3g}" for c in cols]
            print(f"| {name} | {k} ({len(rs)}) | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------------------------
# SmoothQuant-style gains: the rewritten norm's gain vector g (uniform sqrt(D/k) as written) times
# a per-channel s, each reader's rows divided by s. Exact in float.


def cmd_smooth(args):
    model = load(args.model)
    gr, points, groups, readers, writers, shortcuts, gains = stream_structure(model)
    ids = np.load(TOOLS / "calib_ids_n32.npy")[:args.calib]  # calibration text, not Brown
    normed = {p: mul.output[0] for p, mul in gains.items()}
    sess = ort_session(args.model, list(normed.values()))
    amax = {}
    for i in range(len(ids)):
        res = sess.run(list(normed.values()), feeds(ids[i:i + 1]))
        for (p, t), v in zip(normed.items(), res):
            ch = np.abs(v.reshape(-1, v.shape[-1])).max(axis=0).astype(np.float64)
            amax[p] = ch if p not in amax else np.maximum(amax[p], ch)
    by_point = {}
    for name, p in readers.items():
        by_point.setdefault(p, []).append(name)
    for p, mul in gains.items():
        if p not in by_point:
            continue
        ws = [gr.arr(_b(gr, r)).astype(np.float64) for r in by_point[p]]
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        a = args.alpha
        s = np.maximum(amax[p], 1e-5) ** a / np.maximum(wmax, 1e-8) ** (1 - a)
        s = s / np.exp(np.mean(np.log(s)))  # geometric mean 1
        gname = [i for i in mul.input if i in gr.inits][0]
        gr.set(gname, gr.arr(gname).astype(np.float64) / s)
        for r in by_point[p]:
            b = _b(gr, r)
            gr.set(b, s[:, None] * gr.arr(b).astype(np.float64))
    onnx.save(model, str(args.out))
    log(f"smooth: alpha {args.alpha}, {len(by_point)} norms → {args.out}")
    if args.check:
        check_same(args.model, args.out)


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("ONNX_SLICE_BIN", str(
        HERE.parent / "target" / "release" / "onnx-slice")), help="the onnx-slice binary")
    ap.add_argument("--ids", default=str(TOOLS / "eval_ids_brown.npy"))
    ap.add_argument("--keep", action="store_true", help="keep the quantized models written")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("nodes")
    p.add_argument("model")
    p.set_defaults(fn=cmd_nodes)

    p = sub.add_parser("quantize")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--scheme", choices=["int8", "int4"], required=True)
    p.add_argument("--only")
    p.add_argument("--exclude")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("measure")
    p.add_argument("model")
    p.add_argument("--scheme", choices=["float", "int8", "int4"], required=True)
    p.add_argument("--only")
    p.add_argument("--exclude")
    p.add_argument("--windows", type=int, default=64)
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("table")
    p.add_argument("models", nargs="+", help="NAME=MODEL.onnx")
    p.add_argument("--windows", type=int, default=64)
    p.set_defaults(fn=cmd_table)

    p = sub.add_parser("diagnose")
    p.add_argument("model")
    p.add_argument("--scheme", choices=["int8", "int4"], required=True)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--modes", default="alone,without", help="alone, without or both")
    p.add_argument("--layers", help="KIND[,KIND]: one group per layer of these kinds")
    p.add_argument("--without-kinds", default="shortcut,emb_adapter,head_adapter,embed,down",
                   help="kinds measured 'all but it' too (the others only alone)")
    p.set_defaults(fn=cmd_diagnose)

    p = sub.add_parser("rotate")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--rotation", choices=["random", "hadamard"], default="hadamard")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-width", type=int, action="append",
                   help="leave basis groups of this width unrotated")
    p.add_argument("--check", action="store_true", help="compare float logits with the input's")
    p.set_defaults(fn=cmd_rotate)

    p = sub.add_parser("padskip")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--check", action="store_true")
    p.set_defaults(fn=cmd_padskip)

    p = sub.add_parser("fakequant")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--part", choices=["weights", "acts"], required=True)
    p.add_argument("--only")
    p.add_argument("--exclude")
    p.set_defaults(fn=cmd_fakequant)

    p = sub.add_parser("split")
    p.add_argument("models", nargs="+", help="NAME=MODEL.onnx")
    p.add_argument("--windows", type=int, default=16)
    p.set_defaults(fn=cmd_split)

    p = sub.add_parser("stats")
    p.add_argument("models", nargs="+", help="NAME=MODEL.onnx")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--json", default=str(OUT / "stats.json"))
    p.set_defaults(fn=cmd_stats)

    p = sub.add_parser("smooth")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--calib", type=int, default=4,
                   help="calibration sequences (calib_ids_n32.npy) to take activation ranges from")
    p.add_argument("--check", action="store_true")
    p.set_defaults(fn=cmd_smooth)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
