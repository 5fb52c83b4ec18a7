#!/usr/bin/env python3
"""The torch peer of `npllama bench --vs torch`: HF transformers' LlamaForCausalLM on the
same converted weights, measured the same way (pp128, tg32 with a KV cache, forward passes
only). Prints one JSON line. `npllama bench` runs it by module name from the repository's root:

    python -m tools.bench_torch DIR float32|bfloat16 REPS
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npllama.bench.peers import peak_rss, summary  # noqa: E402
from npllama.model.config import ModelArgs  # noqa: E402


def run_torch(path: str, dtype: str, reps: int, prompt_len: int = 128, gen_len: int = 32) -> dict:
    """HF transformers on the same weights (needs torch + transformers; run in a subprocess
    so its memory is its own)."""
    import torch
    from tools.trace_hf import hf_model

    from npllama.io.checkpoint import open_tensors
    torch.set_num_threads(os.cpu_count())
    args = ModelArgs.from_json(os.path.join(path, "params.json"))
    t0 = time.perf_counter()
    model = hf_model(args, open_tensors(path), torch_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    load_s = time.perf_counter() - t0
    from transformers import DynamicCache
    tokens = torch.tensor(np.random.default_rng(0).integers(0, args.vocab_size, prompt_len))[None]
    pp, tg = [], []
    with torch.inference_mode():
        model(tokens[:, :8])
        for _ in range(reps):
            cache = DynamicCache()
            t0 = time.perf_counter()
            out = model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
            pp.append(prompt_len / (time.perf_counter() - t0))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(gen_len):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            tg.append(gen_len / (time.perf_counter() - t0))
    return {"impl": f"torch {torch.__version__} {dtype} (HF LlamaForCausalLM)", "load_s": load_s,
            "pp": summary(pp), "tg": summary(tg), "peak_rss": peak_rss()}


if __name__ == "__main__":
    print(json.dumps(run_torch(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
