"""The Llama 3 operations, one small function each, following Meta's reference model.py.

Every function takes `rnd`: the identity for float32 numerics, `bf16.round` for bfloat16
numerics, applied exactly where a PyTorch bf16 run of Meta's reference stores a bf16
tensor. Everything else is computed in float32.
"""
from __future__ import annotations

import math

import numpy as np


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray, w: np.ndarray, rnd=identity) -> np.ndarray:
    # x (..., in), w (out, in) as Meta stores it -> (..., out). Flattening the leading axes
    # makes this one BLAS GEMM instead of a loop of them.
    y = x.reshape(-1, x.shape[-1]) @ w.T
    return rnd(y.reshape(*x.shape[:-1], w.shape[0]))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, rnd=identity) -> np.ndarray:
    # x (..., dim). Meta: `self._norm(x.float()).type_as(x) * self.weight`.
    x = x.astype(np.float32, copy=False)
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    normed = x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps)))
    return rnd(rnd(normed) * weight)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The head_dim/2 rotation frequencies (float32), with Llama 3.1 scaling if given.

    `scaling` has keys factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings (Meta's apply_scaling, with the factor a parameter).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # torch's float32 pow is correctly rounded and numpy's is not (1 ulp off for ~1 in 5
    # exponents, which grows to 3e-4 rad by position 4096): take the pow in float64.
    freqs = np.float32(1.0) / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    if scaling is None:
        return freqs.astype(np.float32)
    f32 = np.float32
    factor, low, high = f32(scaling["factor"]), f32(scaling["low_freq_factor"]), f32(scaling["high_freq_factor"])
    old_context_len = f32(scaling["original_max_position_embeddings"])
    # float32 throughout, in Meta's order of operations (HF's agrees), so the frequencies
    # match theirs bit for bit.
    wavelen = f32(2 * math.pi) / freqs
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > old_context_len / low, freqs / factor, freqs)
    smooth = (old_context_len / wavelen - low) / (high - low)
    blended = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context_len / high) & (wavelen <= old_context_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    # -> (end, head_dim // 2) complex64: e^{i * t * freq}, torch.polar(ones, outer(t, freqs)).
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = np.outer(np.arange(end, dtype=np.float32), freqs)
    return (np.cos(angles) + 1j * np.sin(angles)).astype(np.complex64)


def apply_rotary_emb(x: np.ndarray, freqs_cis: np.ndarray, rnd=identity) -> np.ndarray:
    # x (B, T, n_heads, head_dim), freqs_cis (T, head_dim // 2). Consecutive pairs
    # (x[2i], x[2i+1]) are one complex number, as in Meta's interleaved layout (HF's
    # checkpoints permute q/k to a rotate-half layout instead).
    x = np.ascontiguousarray(x, dtype=np.float32)
    xc = x.view(np.complex64)                       # (B, T, n_heads, head_dim // 2)
    out = xc * freqs_cis[None, :, None, :]
    return rnd(out.view(np.float32).reshape(x.shape))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_mask(T: int, start_pos: int) -> np.ndarray:
    # (T, start_pos + T): row i is the token at position start_pos + i; it may see every
    # cached position and itself, and -inf hides the later ones.
    mask = np.zeros((T, start_pos + T), dtype=np.float32)
    mask[:, start_pos:] = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    return mask


def attention(xq: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int,
              rnd=identity, trace: dict | None = None) -> np.ndarray:
    """Grouped-query attention with a causal mask.

    xq (B, T, n_heads, head_dim); keys, values (B, S, n_kv_heads, head_dim) with
    S = start_pos + T (the cached positions followed by the new ones).
    Query head h uses key/value head h // n_rep; the keys are never repeated in memory:
    the query heads are grouped as (n_kv_heads, n_rep) instead.
    Returns (B, T, n_heads * head_dim).
    """
    B, T, n_heads, head_dim = xq.shape
    S, n_kv_heads = keys.shape[1], keys.shape[2]
    n_rep = n_heads // n_kv_heads
    q = xq.reshape(B, T, n_kv_heads, n_rep, head_dim).transpose(0, 2, 3, 1, 4)  # (B, n_kv, n_rep, T, hd)
    k = keys.transpose(0, 2, 3, 1)[:, :, None]                                # (B, n_kv, 1, hd, S)
    v = values.transpose(0, 2, 1, 3)[:, :, None]                              # (B, n_kv, 1, S, hd)
    # Divide (not multiply by the reciprocal) as Meta's `/ math.sqrt(head_dim)` does.
    scores = rnd(rnd(q @ k) / np.float32(math.sqrt(head_dim)))             # (B, n_kv, n_rep, T, S)
    scores = scores + causal_mask(T, start_pos)
    # Softmax in float32, then stored as bf16 before it weighs the values (bf16 numerics).
    probs = rnd(softmax(scores))
    out = rnd(probs @ v)                                                      # (B, n_kv, n_rep, T, hd)
    if trace is not None:
        trace["scores"] = scores.reshape(B, n_heads, T, S)
        trace["probs"] = probs.reshape(B, n_heads, T, S)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, n_heads * head_dim)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: silu -> -0
        return x / (np.float32(1.0) + np.exp(-x))


def swiglu(h1: np.ndarray, h3: np.ndarray, rnd=identity) -> np.ndarray:
    # silu(w1 x) * w3 x, given h1 = w1 x and h3 = w3 x: the gate of the feed-forward.
    return rnd(rnd(silu(h1)) * h3)


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, rnd=identity) -> np.ndarray:
    # SwiGLU: w2(silu(w1 x) * w3 x). x (..., dim), w1/w3 (hidden, dim), w2 (dim, hidden).
    return linear(swiglu(linear(x, w1, rnd), linear(x, w3, rnd), rnd), w2, rnd)
