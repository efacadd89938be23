"""A LLaMA-architecture model with a given config.json and random weights, exported to ONNX.

For timing onnx-slice on a model of real size where the pretrained weights cannot be brought
(the GPU machine has PyTorch and transformers but no network). Perplexities of such a model mean
nothing; its graph and tensor shapes are those of the real export.

usage: python3 bench/random_llama_export.py CONFIG.json OUT.onnx [--seed 0]
Exporter: torch.onnx.export(dynamo=True), falling back to the TorchScript exporter.
"""
import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = LlamaConfig.from_json_file(args.config)
    config.use_cache = False
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    started = time.time()
    try:
        from torch.export import Dim
        batch, seq = Dim("batch_size", max=64), Dim("sequence_length", max=4096)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        program = torch.onnx.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask}, dynamo=True,
                                    optimize=True, dynamic_shapes=shapes,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"])
        program.save(args.out)
        exporter = "dynamo"
    except Exception as error:  # noqa: BLE001 - any exporter failure: try the other one
        print(f"dynamo export failed ({type(error).__name__}: {str(error)[:300]}); trying TorchScript")
        axes = {0: "batch_size", 1: "sequence_length"}

        def forward(input_ids, attention_mask):
            return LlamaForCausalLM.forward(model, input_ids=input_ids, attention_mask=attention_mask)

        model.forward = forward
        torch.onnx.export(model, (ids, mask), args.out, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes})
        exporter = "torchscript"
    params = sum(p.numel() for p in model.parameters())
    print(f"exported {params:,} parameters with {exporter} in {time.time() - started:.1f} s to {args.out}")


if __name__ == "__main__":
    main()
