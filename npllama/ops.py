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

    Meta's (and HF's) `1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))`,
    then Meta's apply_scaling with the factor a parameter. `scaling` has keys factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings.
    """
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    # torch casts theta to float32 and takes a float32 pow, which is not one function: Sleef's
    # powf in the vector lanes of its AVX2/AVX-512 kernels, glibc's elsewhere, each 1 ulp off
    # the correctly rounded power on some inputs (on none at Llama 3's and SmolLM2's shapes).
    # Take the correctly rounded power of the same float32 operands: float64 pow, rounded once.
    power = (np.float64(f32(theta)) ** exponents.astype(np.float64)).astype(f32)
    freqs = f32(1) / power
    if scaling is None:
        return freqs
    factor, low, high, old_context_len = (float(scaling[k]) for k in (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
    # Operation for operation as torch runs Meta's apply_scaling (HF's llama3 rope is the same),
    # so the result is theirs bit for bit: arithmetic between two Python numbers is float64, a
    # Python number meeting a float32 tensor is cast to float32, and `a / t` for a Python
    # number a is `t.reciprocal() * a` (torch's __rtruediv__): two roundings, not one quotient.
    low_freq_wavelen, high_freq_wavelen = f32(old_context_len / low), f32(old_context_len / high)
    wavelen = (f32(1) / freqs) * f32(2 * math.pi)
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = np.where(wavelen > low_freq_wavelen, freqs / f32(factor), freqs)
    smooth = ((f32(1) / wavelen) * f32(old_context_len) - f32(low)) / f32(high - low)
    blended = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    # -> (end, head_dim // 2) complex64: e^{i * t * freq}, torch.polar(ones, outer(t, freqs)).
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = np.outer(np.arange(end, dtype=np.float32), freqs).astype(np.float64)  # float32 products, as torch's
    # cos and sin of those float32 angles, correctly rounded (float64, rounded once). torch's
    # float32 cos/sin (glibc's) are 1 ulp off that on ~1% of them; numpy's float32 ones
    # differed from torch's on ~12% and change with the SIMD code numpy picks for the machine.
    freqs_cis = np.empty(angles.shape, np.complex64)
    freqs_cis.real = np.cos(angles)
    freqs_cis.imag = np.sin(angles)
    return freqs_cis


def apply_rotary_emb(x: np.ndarray, freqs_cis: np.ndarray, rnd=identity) -> np.ndarray:
    # x (B, T, n_heads, head_dim), freqs_cis (T, head_dim // 2). Consecutive pairs
    # (x[2i], x[2i+1]) are one complex number, as in Meta's interleaved layout (HF's
    # checkpoints permute q/k to a rotate-half layout instead).
    x = np.ascontiguousarray(x, dtype=np.float32)
    xc = x.view(np.complex64)                       # (B, T, n_heads, head_dim // 2)
    # x * e^{i t freq} as x * cos + x * (i sin). Each of the two multiplies has a zero part,
    # so it yields rounded single products (re cos, im cos) and (-im sin, re sin), and the sum
    # is (re cos - im sin, im cos + re sin) with every product rounded before it is added:
    # torch's vectorized complex64 multiply, bit for bit. numpy's complex multiply fuses one
    # product into the sum (an FMA) and differs in the last bit on ~25% of elements.
    cos = np.ascontiguousarray(freqs_cis.real)[None, :, None, :]
    i_sin = (1j * freqs_cis.imag).astype(np.complex64)[None, :, None, :]
    out = xc * cos
    out += xc * i_sin
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
