"""Random small models, and the same models in implementations nobody here wrote:
HF transformers' LlamaForCausalLM and Meta's own llama_models.llama3.model.Transformer."""
from __future__ import annotations

import os
import sys
import types

import numpy as np

from npllama import ModelArgs
from npllama.testing import random_weights  # noqa: F401  (the strategies' weights, used by every test here)


def small_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


# --- HF transformers (the model builder is tools/trace_hf.py's, shared with its CLI) -------

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from trace_hf import hf_model, hf_trace  # noqa: E402,F401


def hf_logits(model, tokens) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0]
    return out.float().numpy()


# --- Meta's reference (llama-models) ---------------------------------------------------

def _install_fairscale_stub():
    """Meta's model.py imports fairscale's model-parallel layers. With one process they are
    exactly nn.Linear / nn.Embedding, so provide those; Meta's code itself runs unchanged."""
    if "fairscale.nn.model_parallel.layers" in sys.modules:
        return
    import torch.nn as nn

    class ColumnParallelLinear(nn.Linear):
        def __init__(self, in_f, out_f, bias=False, **_):
            super().__init__(in_f, out_f, bias=bias)

    class VocabParallelEmbedding(nn.Embedding):
        def __init__(self, n, d, **_):
            super().__init__(n, d)

    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = ColumnParallelLinear
    layers.RowParallelLinear = ColumnParallelLinear
    layers.VocabParallelEmbedding = VocabParallelEmbedding
    init = types.ModuleType("fairscale.nn.model_parallel.initialize")
    init.get_model_parallel_world_size = lambda: 1
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["fairscale.nn.model_parallel.layers"] = layers
    sys.modules["fairscale.nn.model_parallel.initialize"] = init
    sys.modules["fairscale.nn.model_parallel"].initialize = init


def meta_reference():
    """Meta's llama_models.llama3.model module (the reference forward pass)."""
    _install_fairscale_stub()
    from llama_models.llama3 import model
    return model


def meta_model(args: ModelArgs, weights: dict, torch_dtype=None, max_batch_size: int = 1):
    """Meta's llama3 reference Transformer holding `weights`. torch_dtype bf16 makes the
    whole model, its cache and its mask bf16, as Meta's generation does with
    torch.set_default_dtype."""
    import torch
    from llama_models.llama3.args import ModelArgs as MetaArgs
    MetaTransformer = meta_reference().Transformer

    # Meta hard-codes the 3.1 scaling constants; only test the scaled rope where they hold.
    if args.use_scaled_rope:
        assert (args.rope_scaling_factor, args.low_freq_factor, args.high_freq_factor,
                args.original_max_position_embeddings) == (8, 1, 4, 8192)
    margs = MetaArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                     vocab_size=args.vocab_size, multiple_of=args.multiple_of,
                     ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps,
                     rope_theta=args.rope_theta, use_scaled_rope=args.use_scaled_rope,
                     max_batch_size=max_batch_size, max_seq_len=args.max_seq_len)
    dtype = torch_dtype or torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = MetaTransformer(margs).eval()
    finally:
        torch.set_default_dtype(old)
    w = dict(weights)
    w.setdefault("output.weight", w["tok_embeddings.weight"])
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype) for k, v in w.items()}
    model.load_state_dict(state, strict=True)
    return model


def meta_logits(model, tokens, start_pos: int = 0) -> np.ndarray:
    import torch
    t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if t.ndim == 1:
        return model(t[None], start_pos)[0].float().numpy()
    return model(t, start_pos).float().numpy()


def meta_function(module: str, name: str):
    """One top-level function of a llama_models source file, run as Meta wrote it, without
    importing the rest of that module (e.g. generation.py needs fairscale's process groups)."""
    import ast
    import importlib.util
    import torch
    path = importlib.util.find_spec(module.rsplit(".", 1)[0]).submodule_search_locations[0]
    path = f"{path}/{module.rsplit('.', 1)[1]}.py"
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens) with Llama 3-style control tokens and chat
    format, for random models with a small vocabulary (vocab_size 256 + 4)."""
    from npllama.tokenizer import Tokenizer
    special = {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|eot_id|>": 258, "<|start_header_id|>": 259}
    return Tokenizer({bytes([i]): i for i in range(256)}, r".", special, bos="<|begin_of_text|>",
                     eos="<|end_of_text|>", stop=["<|end_of_text|>", "<|eot_id|>"], chat_format=None)


def meta_trace(model, tokens) -> dict:
    """What forward hooks can see of Meta's reference, under npllama's trace names."""
    import torch
    rec, hooks = {}, []
    arr = lambda t: t.detach().float().numpy()[0].copy()  # noqa: E731
    T, hd = len(tokens), model.params.dim // model.params.n_heads

    def put(name, fn=lambda x: x):
        return lambda mod, inp, out: rec.__setitem__(name, fn(arr(out)))

    hooks.append(model.tok_embeddings.register_forward_hook(put("token_embeddings")))
    for i, layer in enumerate(model.layers):
        p, a, f = f"layers.{i}.", layer.attention, layer.feed_forward
        hooks += [layer.attention_norm.register_forward_hook(put(p + "attention_norm")),
                  a.wq.register_forward_hook(put(p + "q", lambda x: x.reshape(T, -1, hd))),
                  a.wk.register_forward_hook(put(p + "k", lambda x: x.reshape(T, -1, hd))),
                  a.wv.register_forward_hook(put(p + "v", lambda x: x.reshape(T, -1, hd))),
                  a.wo.register_forward_pre_hook(lambda mod, inp, p=p: rec.__setitem__(p + "attention", arr(inp[0]))),
                  a.wo.register_forward_hook(put(p + "attention_out")),
                  layer.ffn_norm.register_forward_hook(put(p + "ffn_norm")),
                  f.w1.register_forward_hook(put(p + "w1")), f.w3.register_forward_hook(put(p + "w3")),
                  f.w2.register_forward_hook(put(p + "ffn_out")), layer.register_forward_hook(put(p + "out"))]
    hooks += [model.norm.register_forward_hook(put("norm")), model.output.register_forward_hook(put("logits"))]
    try:
        with torch.no_grad():
            model(torch.tensor([list(tokens)]), 0)
    finally:
        for h in hooks:
            h.remove()
    rec["tokens"] = np.asarray(tokens)
    rec["__meta__"] = {"source": "llama_models.llama3.model (Meta's reference)", "qk_layout": "interleaved"}
    return rec


def write_random_model(path: str, args: ModelArgs, tokenizer_model: str | None = None, seed: int = 0) -> str:
    """A converted npllama directory with random weights (and a tokenizer file, if given)."""
    from npllama import checkpoint
    w = random_weights(args, seed=seed)
    extra = {"tokenizer.model": tokenizer_model} if tokenizer_model else None
    checkpoint.write_checkpoint(path, args, iter(w.items()), 0, len(w), extra_files=extra, quiet=True)
    return path


def llama3_tokenizer_path() -> str:
    import llama_models.llama3
    return os.path.join(os.path.dirname(llama_models.llama3.__file__), "tokenizer.model")


def write_byte_model(path: str, args: ModelArgs, add_bos: bool = True, seed: int = 0) -> str:
    """A converted random model (vocab_size 260) whose tokenizer.json is byte_tokenizer()'s:
    a whole npllama directory with a small vocabulary, for fast command-line tests."""
    import base64
    import json
    assert args.vocab_size == 260
    write_random_model(path, args, seed=seed)
    spec = {"tokens": [base64.b64encode(bytes([i])).decode() for i in range(256)] + [None] * 4,
            "pat_str": r"[\s\S]", "special_tokens": {"<|begin_of_text|>": 256, "<|end_of_text|>": 257, "<|eot_id|>": 258,
                                                "<|start_header_id|>": 259},
            "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "stop": ["<|end_of_text|>", "<|eot_id|>"],
            "chat_format": None, "add_bos": add_bos}
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return path
