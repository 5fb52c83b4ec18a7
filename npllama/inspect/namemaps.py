"""Name maps: the names other implementations give the tensors of a forward pass, mapped onto
npllama's trace names (README, Trace format), so that their traces compare without renaming
by hand.

A map is a list of (pattern, trace name) pairs; `{i}` in a pattern is a layer number. A
pattern mapped to None is a name the map knows and deliberately leaves out: it holds a
tensor npllama's format has no place for (llama.cpp's un-weighted `norm-0`), or the same
tensor as another name already mapped (Meta's `layers.0.attention` module output is also its
`wo` output). Every other name is unknown, and strict comparison fails on it.

- "meta": the module paths of Meta's reference `Transformer` (llama-models,
  llama_models/llama3/model.py), as forward hooks on `named_modules()` see them; `path:input`
  is a module's input (a forward pre-hook), `path:1` its output's second element.
- "hf": HF transformers' `LlamaForCausalLM` module paths (modeling_llama.py). Its q/k are in
  the rotate-half layout (HF's checkpoints permute wq/wk), so the map says so.
- "llamacpp": llama.cpp's graph tensor names as `llama-eval-callback` prints them
  (src/models/llama.cpp and src/llama-graph.cpp at llama.cpp 0c1e570), `name-{layer}`, with
  the ggml op in brackets where one name is given to several nodes (`Qcur-0` is the wq
  product, its reshape and its RoPE). `kq` is q·k before the scale and mask (no trace name);
  `kq_soft_max` is the probabilities, over every slot of the KV cache (keys stored as f16).
  The embeddings are `embd` (`inp_embd` in older versions). The layer's output is `l_out`; `ffn_out` names both the
  w2 product and the residual sum after it.
- "transformerlens": TransformerLens hook names (`blocks.0.attn.hook_q` ...), rotate-half
  layout as TransformerLens loads HF's Llama checkpoints. Its `ln*.hook_normalized` are
  before the norm's weight (and the weights are usually folded into the next layer), so they
  have no trace name.
"""
from __future__ import annotations

import re

from ..errors import UsageError
from ..model.observer import forward_key

MAPS: dict[str, list[tuple[str, str | None]]] = {
    "meta": [
        ("tok_embeddings:input", "tokens"), ("tok_embeddings", "token_embeddings"), ("layers.{i}.attention_norm", "layers.{i}.attention_norm"),
        ("layers.{i}.attention.wq", "layers.{i}.q"), ("layers.{i}.attention.wk", "layers.{i}.k"),
        ("layers.{i}.attention.wv", "layers.{i}.v"), ("layers.{i}.attention.wo:input", "layers.{i}.attention"),
        ("layers.{i}.attention.wo", "layers.{i}.attention_out"), ("layers.{i}.attention", None),
        ("layers.{i}.ffn_norm:input", "layers.{i}.h"), ("layers.{i}.ffn_norm", "layers.{i}.ffn_norm"),
        ("layers.{i}.feed_forward.w1", "layers.{i}.w1"), ("layers.{i}.feed_forward.w3", "layers.{i}.w3"),
        ("layers.{i}.feed_forward.w2", "layers.{i}.ffn_out"), ("layers.{i}.feed_forward", None),
        ("layers.{i}", "layers.{i}.out"), ("norm", "norm"), ("output", "logits"), ("", None)],
    "hf": [
        ("model.embed_tokens:input", "tokens"), ("model.embed_tokens", "token_embeddings"), ("model.layers.{i}.input_layernorm", "layers.{i}.attention_norm"),
        ("model.layers.{i}.self_attn.q_proj", "layers.{i}.q"), ("model.layers.{i}.self_attn.k_proj", "layers.{i}.k"),
        ("model.layers.{i}.self_attn.v_proj", "layers.{i}.v"),
        ("model.layers.{i}.self_attn.o_proj:input", "layers.{i}.attention"),
        ("model.layers.{i}.self_attn.o_proj", "layers.{i}.attention_out"),
        ("model.layers.{i}.self_attn:1", "layers.{i}.probs"), ("model.layers.{i}.self_attn", None),
        ("model.layers.{i}.post_attention_layernorm:input", "layers.{i}.h"),
        ("model.layers.{i}.post_attention_layernorm", "layers.{i}.ffn_norm"),
        ("model.layers.{i}.mlp.gate_proj", "layers.{i}.w1"), ("model.layers.{i}.mlp.up_proj", "layers.{i}.w3"),
        ("model.layers.{i}.mlp.down_proj", "layers.{i}.ffn_out"), ("model.layers.{i}.mlp", None),
        ("model.layers.{i}.mlp.act_fn", None), ("model.layers.{i}", "layers.{i}.out"), ("model.norm", "norm"),
        ("lm_head", "logits"), ("model.rotary_emb", None), ("model", None), ("", None)],
    "llamacpp": [
        ("embd", "token_embeddings"), ("inp_embd", "token_embeddings"), ("norm-{i}", None), ("attn_norm-{i}", "layers.{i}.attention_norm"),
        ("Qcur-{i}[MUL_MAT]", "layers.{i}.q"), ("Kcur-{i}[MUL_MAT]", "layers.{i}.k"),
        ("Vcur-{i}[MUL_MAT]", "layers.{i}.v"), ("Qcur-{i}[RESHAPE]", None), ("Kcur-{i}[RESHAPE]", None),
        ("Vcur-{i}[RESHAPE]", None), ("Qcur-{i}[ROPE]", "layers.{i}.q_rotated"),
        ("Kcur-{i}[ROPE]", "layers.{i}.k_rotated"), ("kq-{i}", None), ("kq_soft_max-{i}", "layers.{i}.probs"),
        ("kqv-{i}", None), ("kqv_out-{i}", "layers.{i}.attention"), ("attn_out-{i}", "layers.{i}.attention_out"),
        ("ffn_inp-{i}", "layers.{i}.h"), ("ffn_norm-{i}", "layers.{i}.ffn_norm"), ("ffn_gate-{i}", "layers.{i}.w1"),
        ("ffn_up-{i}", "layers.{i}.w3"), ("ffn_swiglu-{i}", None), ("ffn_out-{i}[MUL_MAT]", "layers.{i}.ffn_out"),
        ("ffn_out-{i}[ADD]", None), ("l_out-{i}", "layers.{i}.out"), ("result_norm", "norm"),
        ("result_output", "logits"), ("norm", None),
        ("node_{i}", None)],     # ggml's name for an unnamed node (the GET_ROWS picking the output rows)
    "transformerlens": [
        ("hook_embed", "token_embeddings"), ("blocks.{i}.hook_resid_pre", None), ("blocks.{i}.ln1.hook_scale", None),
        ("blocks.{i}.ln1.hook_normalized", None), ("blocks.{i}.attn.hook_q", "layers.{i}.q"),
        ("blocks.{i}.attn.hook_k", "layers.{i}.k"), ("blocks.{i}.attn.hook_v", "layers.{i}.v"),
        ("blocks.{i}.attn.hook_rot_q", "layers.{i}.q_rotated"), ("blocks.{i}.attn.hook_rot_k", "layers.{i}.k_rotated"),
        ("blocks.{i}.attn.hook_attn_scores", "layers.{i}.scores"), ("blocks.{i}.attn.hook_pattern", "layers.{i}.probs"),
        ("blocks.{i}.attn.hook_z", "layers.{i}.attention"), ("blocks.{i}.hook_attn_out", "layers.{i}.attention_out"),
        ("blocks.{i}.hook_resid_mid", "layers.{i}.h"), ("blocks.{i}.ln2.hook_scale", None),
        ("blocks.{i}.ln2.hook_normalized", None), ("blocks.{i}.mlp.hook_pre", "layers.{i}.w1"),
        ("blocks.{i}.mlp.hook_pre_linear", "layers.{i}.w3"), ("blocks.{i}.mlp.hook_post", None),
        ("blocks.{i}.hook_mlp_out", "layers.{i}.ffn_out"), ("blocks.{i}.hook_resid_post", "layers.{i}.out"),
        ("ln_final.hook_scale", None), ("ln_final.hook_normalized", None)],
}
# What forward hooks cannot see of each implementation (it applies RoPE, and Meta's the
# softmax, as functions, not modules): declared in an adapter's trace as "omits".
HOOK_OMITS = {"meta": ["q_rotated", "k_rotated", "scores", "probs"], "hf": ["q_rotated", "k_rotated", "scores"]}
# The RoPE layout of the q/k each map's implementation records (README, Trace format).
QK_LAYOUT = {"meta": "interleaved", "hf": "rotate_half", "llamacpp": "interleaved", "transformerlens": "rotate_half"}


def compiled(names: str) -> list[tuple[re.Pattern, str | None]]:
    if names not in MAPS:
        raise UsageError(f"unknown name map {names!r} (one of: npllama, {', '.join(MAPS)})")
    out = []
    for pattern, target in MAPS[names]:
        rx = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(rx), target))
    return out


def map_name(name: str, table: list[tuple[re.Pattern, str | None]]) -> tuple[bool, str | None]:
    """(known, trace name or None) for one name under a compiled map."""
    for rx, target in table:
        m = rx.fullmatch(name)
        if m:
            if target is None:
                return True, None
            return True, target.replace("{i}", str(int(m.group("i")))) if "i" in rx.groupindex else target
    return False, None


def rename(tr: dict, names: str | None) -> tuple[dict, list[str], list[str]]:
    """tr under trace names -> (renamed trace, unknown names, names the map left out).
    names None (or "npllama"): trace names already, and anything else is unknown. Two names
    for one trace name is an error (the map would have to pick one silently)."""
    out, unknown, left_out = {}, [], []
    table = None if names in (None, "npllama") else compiled(names)
    origin: dict[str, str] = {}
    for name, x in tr.items():
        if name in ("__meta__", "tokens"):
            out[name] = x
            continue
        known, target = map_name(name, table) if table is not None else (False, None)
        if not known and forward_key(name) is not None:     # a trace name already
            known, target = True, name
        if not known:
            unknown.append(name)
        elif target is None:
            left_out.append(name)
        elif target in origin:
            raise UsageError(f"both {origin[target]!r} and {name!r} map to {target} under the {names} name map")
        else:
            origin[target], out[target] = name, x
    if table is not None:
        meta = dict(tr.get("__meta__", {}))
        meta.setdefault("qk_layout", QK_LAYOUT[names])
        out["__meta__"] = meta
    return out, unknown, left_out


def guess(unknown: list[str]) -> str | None:
    """The name map that knows most of these names (for the error that suggests one)."""
    best, score = None, 0
    for names in MAPS:
        table = compiled(names)
        n = sum(map_name(u, table)[0] for u in unknown)
        if n > score:
            best, score = names, n
    return best
