"""Loads export folders AS THEY ARE in their real clients and generates greedily from fixed prompt
ids: optimum's ORTModelForCausalLM (with or without the KV cache) and onnxruntime-genai's Model.

    python generate.py JOBS.json

JOBS.json is a list of {"client": "optimum" | "genai", "folder": DIR, "use_cache": bool (optimum
only), "prompt": [ids], "new_tokens": N}. Prints, as JSON on stdout, one list of generated ids (the
new tokens only) per job, in order. Nothing is downloaded: the hub is switched off.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def optimum_tokens(folder, use_cache, prompt, new_tokens):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=use_cache, provider="CPUExecutionProvider")
    ids = torch.tensor([prompt], dtype=torch.int64)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache)
    return out[0, len(prompt):].tolist()


def genai_tokens(folder, prompt, new_tokens):
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(do_sample=False, num_beams=1, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt):]]


def main():
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        if job["client"] == "optimum":
            tokens = optimum_tokens(job["folder"], job["use_cache"], job["prompt"], job["new_tokens"])
        elif job["client"] == "genai":
            tokens = genai_tokens(job["folder"], job["prompt"], job["new_tokens"])
        else:
            sys.exit(f"unknown client {job['client']!r}")
        print(f"{job['client']} {job['folder']}: {tokens}", file=sys.stderr)
        results.append(tokens)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
