#!/usr/bin/env python3
"""The same trace as `npllama trace`, produced by HF transformers' LlamaForCausalLM.

    python tools/trace_hf.py -m DIR "prompt" -o hf.npz       # DIR: a converted npllama model
    npllama trace -m DIR "prompt" -o np.npz
    npllama compare np.npz hf.npz

The model is built from the converted weights (q/k permuted into HF's rotate-half layout,
as HF's own converter does) and traced with forward hooks. HF's q/k are stored as they
are, in rotate-half layout, with "qk_layout": "rotate_half" in the trace's metadata: the
comparer converts them (README, Trace format). HF computes no separate `scores` tensor, so
the trace has none. Needs torch and transformers (the test extras).
"""
import argparse
import os
import sys

import numpy as np


def hf_model(args, weights: dict, torch_dtype=None, attn_implementation: str = "eager"):
    """LlamaForCausalLM holding npllama/Meta-named weights (npllama.testing's HF layout),
    copied in a tensor at a time: building it takes the model's own size plus one tensor (a
    1B model: ~5 GB, not three copies). eager attention records the probabilities a trace
    needs; "sdpa" is HF's fast path (tools/bench_long.py)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from npllama.testing import hf_config, hf_tensors
    config = hf_config(args, tied="output.weight" not in weights)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation=attn_implementation)).eval()
    state, loaded = model.state_dict(), set()
    with torch.no_grad():
        for name, x in hf_tensors(args, weights):
            if name not in state or tuple(state[name].shape) != x.shape:
                raise RuntimeError(f"weights did not map onto HF's model: {name} {x.shape}")
            # a memory-mapped float32 weight is read-only: copied (one tensor) for torch
            state[name].copy_(torch.from_numpy(np.require(x, requirements=["W"])))
            loaded.add(name)
    if set(state) - loaded:
        raise RuntimeError(f"weights did not map onto HF's model: missing {sorted(set(state) - loaded)}")
    return model.to(torch_dtype) if torch_dtype is not None else model


def hf_trace(model, tokens) -> dict:
    """Every intermediate HF computes, under npllama's trace names, for one sequence."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    T = len(tokens)
    rec, hooks = {}, []
    arr = lambda t: t.detach().float().numpy()[0].copy()  # noqa: E731  (drop the batch axis)

    def put(name, fn=lambda x: x):
        return lambda mod, inp, out: rec.__setitem__(name, fn(arr(out if torch.is_tensor(out) else out[0])))

    def put_input(name):
        return lambda mod, inp: rec.__setitem__(name, arr(inp[0]))

    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(put("token_embeddings")))
    for i, layer in enumerate(m.layers):
        p, a = f"layers.{i}.", layer.self_attn
        heads = lambda n: (lambda x: x.reshape(T, n, hd))  # noqa: E731
        hooks += [layer.input_layernorm.register_forward_hook(put(p + "attention_norm")),
                  a.q_proj.register_forward_hook(put(p + "q", heads(cfg.num_attention_heads))),
                  a.k_proj.register_forward_hook(put(p + "k", heads(cfg.num_key_value_heads))),
                  a.v_proj.register_forward_hook(put(p + "v", heads(cfg.num_key_value_heads))),
                  a.o_proj.register_forward_pre_hook(put_input(p + "attention")),
                  a.o_proj.register_forward_hook(put(p + "attention_out")),
                  layer.post_attention_layernorm.register_forward_pre_hook(put_input(p + "h")),
                  layer.post_attention_layernorm.register_forward_hook(put(p + "ffn_norm")),
                  layer.mlp.gate_proj.register_forward_hook(put(p + "w1")),
                  layer.mlp.up_proj.register_forward_hook(put(p + "w3")),
                  layer.mlp.down_proj.register_forward_hook(put(p + "ffn_out")),
                  layer.register_forward_hook(put(p + "out"))]

        def attn_hook(mod, args, kwargs, out, p=p):
            # HF's own RoPE on HF's own q/k, with the cos/sin the layer was given.
            cos, sin = kwargs["position_embeddings"]
            q = torch.tensor(rec[p + "q"])[None].transpose(1, 2)
            k = torch.tensor(rec[p + "k"])[None].transpose(1, 2)
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            rec[p + "q_rotated"] = arr(q_rot.transpose(1, 2))
            rec[p + "k_rotated"] = arr(k_rot.transpose(1, 2))
            rec[p + "probs"] = arr(out[1])             # eager attention's softmax output
        hooks.append(a.register_forward_hook(attn_hook, with_kwargs=True))
    hooks += [m.norm.register_forward_hook(put("norm")), model.lm_head.register_forward_hook(put("logits"))]
    try:
        with torch.no_grad():
            model(torch.tensor([list(tokens)]), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    rec["tokens"] = np.asarray(tokens)
    rec["__meta__"] = {"source": "transformers LlamaForCausalLM (tools/trace_hf.py)", "qk_layout": "rotate_half",
                       "omits": ["scores"], "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    return rec


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"trace_hf.py: needs torch and transformers, the test extras ({e}); "
                 "install them with: pip install -e '.[test]'")
    import npllama
    from npllama.io import checkpoint
    from npllama.inspect import tracefile as tracing
    from npllama.errors import NpllamaError, UsageError
    from npllama.text.tokenizer import load as load_tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("-m", "--model", help="converted model directory (default: npllama's default model)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    try:
        path = a.model or npllama.hub.default_model()
        args = npllama.ModelArgs.from_json(os.path.join(path, "params.json"))
        tok = load_tokenizer(path)
        tokens = tok.encode(a.prompt, bos=tok.add_bos)
        if not tokens:
            raise UsageError("the prompt is empty and this model adds no begin-of-text token")
        tr = hf_trace(hf_model(args, checkpoint.open_tensors(path)), tokens)
        tracing.save(a.output, tr)
    except NpllamaError as e:
        sys.exit(f"trace_hf.py: {e}")
    print(f"wrote {a.output}: {len(tr) - 1} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
