"""A LLaMA-architecture model with a given config.json and random weights, exported to ONNX.

For timing onnx-slice on a model of real size where the pretrained weights cannot be brought
(the GPU machine has PyTorch and transformers but no network). Perplexities of such a model mean
nothing; its graph and tensor shapes are those of the real export.

usage: python3 bench/random_llama_export.py CONFIG.json OUT.onnx [--seed 0] [--dtype float32|float16]
                                            [--materialize]

Writes OUT.onnx, its weights in OUT.onnx.data (ONNX external data, in the same directory) and a copy
of CONFIG.json as config.json beside them (onnx-slice reads the position limit from it).

Default (bounded memory, any model size): torch builds the model with every weight larger than
64 Ki elements as a placeholder, a one-element tensor expanded to the weight's shape (no memory),
and torch.onnx.export(dynamo=True, optimize=True) exports it. The exporter's optimizer then runs as
it does on real weights: it folds each weight's Transpose into a new initializer (a view of the
placeholder, still no memory) and never reads a large weight's values otherwise (it deduplicates and
folds only small tensors, and those hold real values here). Then every placeholder initializer gets
seeded random values, normal(0, 0.02) as transformers initializes Linear and Embedding weights,
generated and written into OUT.onnx.data one tensor (in chunks) at a time, at 4 KiB-aligned
offsets; smaller weights have transformers' own init (norm weights 1). Peak memory is the exporter's
working set: about 1 GiB RSS for the TinyLlama-1.1B and LLaMA-2-7B shapes alike (configs in
bench/configs/; 2 and 5 minutes on 2 cores, for 4.4 GB fp32 and 13.5 GB fp16).

--dtype float16: the exported float32 graph converted as
onnxruntime.transformers.onnx_model.OnnxModel.convert_float_to_float16(keep_io_types=True) does (the
conversion the fp16 test fixtures use), run on the graph before the weights exist; the placeholder
weights are then written as float16.

--materialize: the plain path, a real LlamaForCausalLM with random weights exported and saved by
torch (falls back to the TorchScript exporter if dynamo fails). It holds the whole model in memory
(the export about 1.2 times the float32 model), so it is for small models and for checking the
default path against it.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Weights with more elements than this are placeholders; the exporter's optimizer looks at the
# values of initializers up to 8192 elements (constant folding) and 1024 (deduplication) only.
PLACEHOLDER_MIN_ELEMENTS = 1 << 16
INIT_STD = 0.02  # transformers' initializer_range default for LLaMA
ALIGNMENT = 4096  # offsets of external tensors of at least this many bytes
INLINE_MAX_BYTES = 256  # like the exporter's save: larger tensors go to the external data file
CHUNK_ELEMENTS = 1 << 24


def export_kwargs(config):
    from torch.export import Dim

    ids = torch.randint(0, config.vocab_size, (2, 16), dtype=torch.int64)
    batch, seq = Dim("batch_size", max=64), Dim("sequence_length", max=4096)
    return dict(args=(), kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, dynamo=True,
                optimize=True, dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                input_names=["input_ids", "attention_mask"], output_names=["logits"])


def placeholder_model(config, seed):
    """The model with small weights real (transformers' init) and large ones placeholders.
    Returns the model and the data pointers of the placeholders' one-element storages."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    pointers = set()
    replaced = {}
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in replaced:  # tied weights stay tied
                setattr(module, name, replaced[id(param)])
                continue
            if param.numel() > PLACEHOLDER_MIN_ELEMENTS:
                # Its own storage per weight: torch.export treats parameters that share a storage as tied.
                scalar = torch.full((1,) * param.dim(), INIT_STD, dtype=param.dtype)
                pointers.add(scalar.data_ptr())
                value = scalar.expand(param.shape)
            elif "norm" in f"{module_name}.{name}":
                value = torch.ones(param.shape, dtype=param.dtype)
            else:
                value = torch.randn(param.shape, generator=generator, dtype=param.dtype) * INIT_STD
            new = torch.nn.Parameter(value, requires_grad=False)
            replaced[id(param)] = new
            setattr(module, name, new)
    # Buffers (the rotary inv_freq) are computed, not learned: take them from a real module.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            raise RuntimeError(f"buffer {name} is still on the meta device")
    return model, pointers


def placeholder_names(graph, pointers):
    """Initializers whose value is (a view of) a placeholder: they get random values at write time."""
    names = []
    for name, value in graph.initializers.items():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, torch.Tensor):
            pointer = raw.data_ptr()
        elif isinstance(raw, np.ndarray):
            pointer = raw.__array_interface__["data"][0]
        else:
            continue
        if pointer in pointers:
            names.append(name)
    return names


def graph_without_weights(program, names, location):
    """The exported model as a ModelProto, the placeholder initializers as external data stubs."""
    import onnx_ir as ir

    graph = program.model.graph
    for name in names:
        value = graph.initializers[name]
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(location, 0, 0, tensor.dtype, shape=tensor.shape, name=name)
    return ir.serde.serialize_model(program.model)


def convert_to_float16(model):
    """onnxruntime's float16 conversion with keep_io_types=True, as the fp16 fixtures were made. The
    converter reads each converted initializer's values only to learn its shape; here the shape
    comes from its dims (the same value info) since the placeholders have no values yet."""
    import sys

    from onnx import helper
    from onnxruntime.transformers.onnx_model import OnnxModel

    # onnx_model imports the converter as the top-level module float16 (it puts its own directory on
    # sys.path), so that is the module whose global the converter looks up.
    sys.modules["float16"].make_value_info_from_tensor = lambda tensor: helper.make_tensor_value_info(
        tensor.name, tensor.data_type, list(tensor.dims))
    wrapper = OnnxModel(model)
    wrapper.convert_float_to_float16(keep_io_types=True)
    return wrapper.model


def write_random(out, tensor, rng):
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    remaining = int(np.prod(tensor.dims, dtype=np.int64))
    while remaining:
        count = min(remaining, CHUNK_ELEMENTS)
        chunk = rng.standard_normal(count, dtype=np.float32)
        chunk *= INIT_STD
        out.write(chunk.astype(dtype, copy=False).data)
        remaining -= count


def write_weights(model, placeholders, data_path, seed):
    """Every placeholder gets seeded random values; every other initializer over INLINE_MAX_BYTES
    moves to the data file as it is. One tensor at a time."""
    placeholders = set(placeholders)
    location = data_path.name
    with open(data_path, "wb") as out:
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.name in placeholders:
                itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
                length = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
                data = None
            elif tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) > INLINE_MAX_BYTES:
                data = tensor.raw_data
                length = len(data)
            else:
                continue
            offset = out.tell()
            if length >= ALIGNMENT and offset % ALIGNMENT:
                out.write(b"\0" * (ALIGNMENT - offset % ALIGNMENT))
                offset = out.tell()
            if data is None:
                write_random(out, tensor, np.random.default_rng([seed, index]))
            else:
                out.write(data)
                tensor.ClearField("raw_data")
            assert out.tell() - offset == length, tensor.name
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


def export_bounded(config, out, seed, dtype):
    model, pointers = placeholder_model(config, seed)
    program = torch.onnx.export(model, **export_kwargs(config))
    names = placeholder_names(program.model.graph, pointers)
    data_path = out.with_name(out.name + ".data")
    proto = graph_without_weights(program, names, data_path.name)
    del program, model
    if dtype == "float16":
        proto = convert_to_float16(proto)
    write_weights(proto, names, data_path, seed)
    onnx.save_model(proto, str(out))
    return len(names)


def export_materialized(config, out, seed, dtype):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    kwargs = export_kwargs(config)
    try:
        program = torch.onnx.export(model, **kwargs)
        program.save(str(out), external_data=True)
    except Exception as error:  # noqa: BLE001 - any exporter failure: try the other one
        print(f"dynamo export failed ({type(error).__name__}: {str(error)[:300]}); trying TorchScript")
        axes = {0: "batch_size", 1: "sequence_length"}
        inputs = kwargs["kwargs"]

        def forward(input_ids, attention_mask):
            return LlamaForCausalLM.forward(model, input_ids=input_ids, attention_mask=attention_mask)

        model.forward = forward
        torch.onnx.export(model, (inputs["input_ids"], inputs["attention_mask"]), str(out),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                          dynamo=False, dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes})
    if dtype == "float16":
        from onnxruntime.transformers.onnx_model import OnnxModel

        wrapper = OnnxModel(onnx.load(str(out), load_external_data=True))
        wrapper.convert_float_to_float16(keep_io_types=True)
        data_path = out.with_name(out.name + ".data")
        data_path.unlink(missing_ok=True)
        onnx.save_model(wrapper.model, str(out), save_as_external_data=True, location=data_path.name)
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--materialize", action="store_true",
                        help="export a real torch model with random weights (memory grows with the model)")
    args = parser.parse_args()

    config = LlamaConfig.from_json_file(args.config)
    config.use_cache = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.materialize:
        params = export_materialized(config, out, args.seed, args.dtype)
        print(f"exported {params:,} parameters (materialized) in {time.time() - started:.1f} s to {out}")
    else:
        count = export_bounded(config, out, args.seed, args.dtype)
        print(f"exported with {count} random weight tensors in {time.time() - started:.1f} s to {out}")
    shutil.copyfile(args.config, out.with_name("config.json"))


if __name__ == "__main__":
    main()
