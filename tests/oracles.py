"""Random small models, and the same models in implementations nobody here wrote:
HF transformers' LlamaForCausalLM and Meta's own llama_models.llama3.model.Transformer."""
from __future__ import annotations

import sys
import types

import numpy as np

from npllama import ModelArgs
from npllama.model import expected_shapes


def random_weights(args: ModelArgs, seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """float32 weights scaled like a trained model (unit-variance activations), so every
    layer matters to the logits."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(args).items():
        if tied and name == "output.weight":
            continue
        if len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "tok_embeddings.weight":
            w[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            w[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return w


def small_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    base.update(kw)
    return ModelArgs(**base)


# --- HF transformers ---------------------------------------------------------------------

def meta_to_hf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's convert_llama_weights_to_hf `permute`: Meta's interleaved pairs -> rotate-half."""
    out_dim, dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out_dim, dim)


def hf_model(args: ModelArgs, weights: dict, torch_dtype=None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, "factor": args.rope_scaling_factor,
                "low_freq_factor": args.low_freq_factor, "high_freq_factor": args.high_freq_factor,
                "original_max_position_embeddings": args.original_max_position_embeddings}
    tied = "output.weight" not in weights
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                      max_position_embeddings=args.max_seq_len, rope_parameters=rope,
                      tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": weights["tok_embeddings.weight"], "model.norm.weight": weights["norm.weight"]}
    if not tied:
        sd["lm_head.weight"] = weights["output.weight"]
    for i in range(args.n_layers):
        m, p = f"model.layers.{i}.", f"layers.{i}."
        sd[m + "self_attn.q_proj.weight"] = meta_to_hf_qk(weights[p + "attention.wq.weight"], args.n_heads)
        sd[m + "self_attn.k_proj.weight"] = meta_to_hf_qk(weights[p + "attention.wk.weight"], args.n_kv_heads)
        sd[m + "self_attn.v_proj.weight"] = weights[p + "attention.wv.weight"]
        sd[m + "self_attn.o_proj.weight"] = weights[p + "attention.wo.weight"]
        sd[m + "mlp.gate_proj.weight"] = weights[p + "feed_forward.w1.weight"]
        sd[m + "mlp.down_proj.weight"] = weights[p + "feed_forward.w2.weight"]
        sd[m + "mlp.up_proj.weight"] = weights[p + "feed_forward.w3.weight"]
        sd[m + "input_layernorm.weight"] = weights[p + "attention_norm.weight"]
        sd[m + "post_attention_layernorm.weight"] = weights[p + "ffn_norm.weight"]
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model


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
