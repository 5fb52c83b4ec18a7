"""Where two tensors of a trace differ: the position, head and channel of the largest error,
the error of every attention head, and the diagnoses that patterns of those errors allow
(GQA heads paired the wrong way, RoPE applied in the other layout)."""
from __future__ import annotations

import numpy as np

from ..model.ops import precompute_freqs_cis

QK_HEADS = ("q", "k", "v", "q_rotated", "k_rotated")   # (T, heads, head_dim)
SCORES = ("scores", "probs")                           # (n_heads, T, S)
# Where KV heads repeated the wrong way show as a pattern over query heads: the scores, probs
# and attention each query head computes from the KV head it reads. q and q_rotated come
# before any KV head is read, and k/v have only KV heads.
QUERY_SIDE = ("scores", "probs", "attention")


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def axes(name: str, shape: tuple, head_dim: int | None) -> tuple[str, ...]:
    """The meaning of each axis of a canonical trace tensor."""
    k = kind(name)
    if k in QK_HEADS and len(shape) == 3:
        return ("pos", "head", "ch")
    if k in SCORES and len(shape) == 3:
        return ("head", "pos", "key")
    if k == "logits":
        return ("pos", "token")
    return ("pos", "ch")[:len(shape)]


def where(diff: np.ndarray, name: str, head_dim: int | None) -> dict:
    """{axis: index} of the largest error (layer, position, head, channel; the head of a
    stacked (T, dim) `attention` from its channel)."""
    if diff.size == 0:
        return {}
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    at = {"layer": layer_of(name)} if layer_of(name) is not None else {}
    at.update({a: int(i) for a, i in zip(axes(name, diff.shape, head_dim), idx)})
    if kind(name) == "attention" and head_dim and "ch" in at:
        at["head"], at["ch"] = divmod(at["ch"], head_dim)
    return at


def describe_where(at: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in at.items())


def per_head(diff: np.ndarray, name: str, head_dim: int | None) -> np.ndarray | None:
    """Largest error of each head, or None for a tensor without heads (or without entries)."""
    k = kind(name)
    if diff.size == 0:
        return None
    if k in QK_HEADS and diff.ndim == 3:
        return diff.max(axis=(0, 2))
    if k in SCORES and diff.ndim == 3:
        return diff.max(axis=(1, 2))
    if k == "attention" and head_dim and diff.ndim == 2 and diff.shape[1] % head_dim == 0:
        return diff.reshape(diff.shape[0], -1, head_dim).max(axis=(0, 2))
    return None


def head_summary(errors: np.ndarray, limit: float) -> str:
    bad = [h for h, e in enumerate(errors) if e > limit]
    good = [h for h, e in enumerate(errors) if e <= limit]
    return (f"heads outside tolerance: {' '.join(map(str, bad)) or 'none'} of {len(errors)}; "
            f"agree: {' '.join(map(str, good)) or 'none'}")


def gqa_hint(name: str, errors: np.ndarray, limit: float, n_kv_heads: int | None) -> str | None:
    """Query heads that agree exactly where h % n_kv_heads == h // n_rep: the signature of
    keys/values repeated whole (torch .repeat, np.tile) instead of per head
    (repeat_interleave), i.e. query head h reading KV head h % n_kv_heads."""
    n_heads = len(errors)
    if kind(name) not in QUERY_SIDE or not n_kv_heads or n_kv_heads in (1, n_heads) or n_heads % n_kv_heads:
        return None
    n_rep = n_heads // n_kv_heads
    same = {h for h in range(n_heads) if h % n_kv_heads == h // n_rep}
    good = {h for h, e in enumerate(errors) if e <= limit}
    if good != same:
        return None
    return (f"exactly the query heads h with h % {n_kv_heads} == h // {n_rep} agree: query head h reads KV head "
            f"h % n_kv_heads instead of h // n_rep (keys/values repeated with repeat/tile instead of "
            f"repeat_interleave)")


def freqs_for(params: dict, T: int) -> np.ndarray:
    """(T, head_dim // 2) e^{i t theta_j} for positions 0..T-1 of a trace's model."""
    head_dim = params["dim"] // params["n_heads"]
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = dict(factor=params["rope_scaling_factor"], low_freq_factor=params["low_freq_factor"],
                       high_freq_factor=params["high_freq_factor"],
                       original_max_position_embeddings=params["original_max_position_embeddings"])
    return precompute_freqs_cis(head_dim, T, params["rope_theta"], scaling)


def rotate_half_to_interleaved(x: np.ndarray) -> np.ndarray:
    # (..., head_dim) with all real parts then all imaginary parts (HF's permuted q/k)
    # -> Meta's consecutive (real, imaginary) pairs.
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(x.shape)


def to_rotate_half(x: np.ndarray) -> np.ndarray:
    # the inverse: interleaved (re, im) pairs -> all real parts then all imaginary parts
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def rope_rotate_half(x: np.ndarray, freqs_cis: np.ndarray) -> np.ndarray:
    # x (T, heads, head_dim): HF's rotate-half RoPE, pairing channel j with j + head_dim/2.
    half = x.shape[-1] // 2
    cos = np.concatenate([freqs_cis.real] * 2, -1)[:, None, :]
    sin = np.concatenate([freqs_cis.imag] * 2, -1)[:, None, :]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def rope_interleaved(x: np.ndarray, freqs_cis: np.ndarray) -> np.ndarray:
    # x (T, heads, head_dim): Meta's RoPE, pairing channels 2j and 2j+1.
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    out = xc * freqs_cis[:, None, :]
    return np.stack([out.real, out.imag], -1).reshape(x.shape)


def rope_hint(unrotated: np.ndarray, params: dict, close) -> str | None:
    """A's q_rotated (k_rotated) is what its own q (k) gives under the other RoPE pairing:
    rotate-half RoPE on interleaved (Meta-layout) q/k, or interleaved RoPE on rotate-half
    (HF-layout) q/k. Both in the canonical interleaved layout; close(x) says whether x
    matches A's rotated tensor within tolerance."""
    if unrotated.ndim != 3 or unrotated.shape[-1] % 2 or "rope_theta" not in params:
        return None
    x = unrotated.astype(np.float64)
    x = np.where(np.isfinite(x), x, 0)    # NaN/inf already fail the tensor; the diagnosis is of the rest
    f = freqs_for(params, x.shape[0])
    if close(rope_rotate_half(x, f)):
        return ("A's rotated q/k are rotate-half RoPE (HF's pairing of j with j + head_dim/2) applied to q/k in "
                "the interleaved layout (Meta's weights): use interleaved pairs (2j, 2j+1), or permute wq/wk "
                "as HF's converter does")
    if close(rotate_half_to_interleaved(rope_interleaved(to_rotate_half(x), f))):
        return ("A's rotated q/k are interleaved RoPE (pairs 2j, 2j+1) applied to q/k in the rotate-half layout "
                "(HF's permuted weights): use rotate-half RoPE with HF's weights")
    return None
