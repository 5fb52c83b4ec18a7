"""Tensor names and q/k layouts of every format, in one place (the converters, tools/
trace_hf.py and tools/export_gguf.py all use these). npllama keeps Meta's names and
Meta's interleaved RoPE layout."""
from __future__ import annotations

import numpy as np

# HF transformers' LlamaForCausalLM module -> Meta's, inside layers.{i}.
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}

# llama.cpp's GGUF names -> Meta's, inside blk.{i} / layers.{i}.
GGUF_LAYER_NAMES = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}


def _layer_name(name: str, prefix: str, table: dict[str, str]) -> str | None:
    """layers.{i}.<Meta module>.weight for `<prefix>{i}.<module>.weight`, else None."""
    if not name.startswith(prefix) or not name.endswith(".weight"):
        return None
    i, _, module = name[len(prefix):-len(".weight")].partition(".")
    if not i.isdigit() or str(int(i)) != i or module not in table:
        return None
    return f"layers.{i}.{table[module]}.weight"


def hf_to_meta(name: str) -> str | None:
    """Meta's name for an HF tensor; None for an unknown one."""
    return HF_TOP_NAMES.get(name) or _layer_name(name, "model.layers.", HF_LAYER_NAMES)


def gguf_to_meta(name: str) -> str | None:
    """Meta's name for a llama.cpp GGUF tensor; None for an unknown one."""
    return GGUF_TOP_NAMES.get(name) or _layer_name(name, "blk.", GGUF_LAYER_NAMES)


def _inverse(top: dict[str, str], layer: dict[str, str], prefix: str):
    top_inv, layer_inv = {v: k for k, v in top.items()}, {v: k for k, v in layer.items()}

    def convert(name: str) -> str:
        if name in top_inv:
            return top_inv[name]
        i, module = name[len("layers."):-len(".weight")].split(".", 1)
        return f"{prefix}{i}.{layer_inv[module]}.weight"
    return convert


meta_to_hf = _inverse(HF_TOP_NAMES, HF_LAYER_NAMES, "model.layers.")
meta_to_gguf = _inverse(GGUF_TOP_NAMES, GGUF_LAYER_NAMES, "blk.")


def hf_to_meta_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo HF's q/k permutation: rotate-half layout -> Meta's interleaved pairs."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, dim).transpose(0, 2, 1, 3).reshape(out_dim, dim))


def meta_to_hf_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's convert_llama_weights_to_hf `permute`: Meta's interleaved pairs -> rotate-half."""
    out_dim, dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(out_dim, dim)
