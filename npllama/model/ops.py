"""The Llama 3 operations, one small function each, following Meta's reference model.py.

Every function takes `rnd`: the identity for float32 numerics, `bf16.round` for bfloat16
numerics, applied exactly where a PyTorch bf16 run of Meta's reference stores a bf16
tensor. Everything else is computed in float32.
"""
from __future__ import annotations

import math

import numpy as np

from . import parallel


def identity(x: np.ndarray) -> np.ndarray:
    return x


FEW_ROWS = 16   # up to this many rows of x, x @ w.T runs as (w @ x.T).T (matmul)


def matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x (M, K) @ w.T for w (N, K) -> (M, N). For 2..FEW_ROWS rows, as (w @ x.T).T: OpenBLAS
    runs x @ w.T of 2 to 16 rows through a small-M GEMM path that took 5-12x one row's time,
    and w @ x.T 2.2-2.5x less than that (SmolLM2's projections, one thread); one row is its
    GEMV either way, many rows an efficient GEMM. Only the summation order differs."""
    if not 1 < x.shape[0] <= FEW_ROWS:
        return np.matmul(x, w.T, out=out)
    y = np.matmul(w, x.T).T             # assigned, not written through out.T (a strided slice: 2x slower)
    if out is None:
        return np.ascontiguousarray(y)  # C order, as callers (and .npy) expect
    out[...] = y
    return out


def linear(x: np.ndarray, w: np.ndarray, rnd=identity) -> np.ndarray:
    # x (..., in), w (out, in) as Meta stores it -> (..., out). Flattening the leading axes
    # makes this one BLAS GEMM instead of a loop of them.
    y = matmul(x.reshape(-1, x.shape[-1]), w)
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


ROPE_BLOCK = 1 << 14   # positions per block of the RoPE table's float64 temporaries (a few MB)


def precompute_freqs_cis(head_dim: int, end: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    # -> (end, head_dim // 2) complex64: e^{i * t * freq}, torch.polar(ones, outer(t, freqs)).
    freqs = rope_frequencies(head_dim, theta, scaling)
    freqs_cis = np.empty((end, len(freqs)), np.complex64)
    # A block of positions at a time: the float64 angles and cos/sin temporaries stay a few
    # MB whatever the context (the memory model counts the complex64 table, 8 bytes an entry,
    # and nothing more). Elementwise, so the table is the same as computed in one piece.
    for start in range(0, end, ROPE_BLOCK):
        t = np.arange(start, min(start + ROPE_BLOCK, end), dtype=np.float32)
        angles = np.outer(t, freqs).astype(np.float64)  # float32 products, as torch's
        # cos and sin of those float32 angles, correctly rounded (float64, rounded once). torch's
        # float32 cos/sin (glibc's) are 1 ulp off that on ~1% of them; numpy's float32 ones
        # differed from torch's on ~12% and change with the SIMD code numpy picks for the machine.
        freqs_cis.real[start:start + len(t)] = np.cos(angles)
        freqs_cis.imag[start:start + len(t)] = np.sin(angles)
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
    # freqs_cis (B, T, head_dim // 2) gives each row its own positions (continuous batching).
    B, T, half = (1, *freqs_cis.shape) if freqs_cis.ndim == 2 else freqs_cis.shape
    cos = np.ascontiguousarray(freqs_cis.real).reshape(B, T, 1, half)
    i_sin = (1j * freqs_cis.imag).astype(np.complex64).reshape(B, T, 1, half)
    out = xc * cos
    out += xc * i_sin
    return rnd(out.view(np.float32).reshape(x.shape))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_mask(T: int, start_pos: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
    # (T, c1 - c0), keys c0..c1-1 (default: all start_pos + T): row i is the token at
    # position start_pos + i; it may see every cached position and itself, and -inf hides
    # the later ones.
    c1 = start_pos + T if c1 is None else c1
    later = np.arange(c0, c1)[None, :] > start_pos + np.arange(T)[:, None]
    return np.where(later, np.float32(-np.inf), np.float32(0))


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



# --- attention in bounded memory ----------------------------------------------------------
# `attention` holds the (B, n_heads, T, S) scores several times over: ~24 GiB for an
# 8,192-token prompt on a 32-head model. The functions below compute the same attention a
# block at a time, so that its scratch is O(block * S) however long the prompt.

ROWS_SCRATCH_BYTES = 64 << 20  # one block of the reference's intermediates (attention_rows)
FLASH_BLOCK_Q = 64             # query rows per tile (times n_rep: the rows of each GEMM)
FLASH_BLOCK_BYTES = 8 << 20    # float32 scores of one tile, all heads (split between threads)
PARALLEL_SCORES = 1 << 20      # below this many scores, threads cost more than they save


def attention_rows(xq: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int, rnd=identity,
                   trace: dict | None = None, scratch_bytes: int = ROWS_SCRATCH_BYTES) -> np.ndarray:
    """`attention` a block of query rows at a time, and exactly `attention`: every row of
    the scores is masked, normalised and rounded on its own. A block sees only the keys up
    to its last row's position (later ones are masked for all its rows). trace receives
    the whole (B, n_heads, T, S) scores and probs, filled block by block."""
    B, T, n_heads, head_dim = xq.shape
    S = keys.shape[1]
    # `attention` keeps up to ~4 float32 (B, n_heads, rows, S) arrays alive at once.
    rows = max(1, scratch_bytes // (16 * B * n_heads * S))
    out = np.empty((B, T, n_heads * head_dim), np.float32)
    if trace is not None:
        scores = np.full((B, n_heads, T, S), -np.inf, np.float32)
        probs = np.zeros((B, n_heads, T, S), np.float32)
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        end = start_pos + r1
        inner = {} if trace is not None else None
        out[:, r0:r1] = attention(xq[:, r0:r1], keys[:, :end], values[:, :end], start_pos + r0, rnd, inner)
        if trace is not None:
            scores[:, :, r0:r1, :end] = inner["scores"]
            probs[:, :, r0:r1, :end] = inner["probs"]
    if trace is not None:
        trace["scores"], trace["probs"] = scores, probs
    return out


def flash_attention(xq: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int, block_q: int,
                    block_k: int) -> np.ndarray:
    """float32 `attention` a tile (block of queries x block of keys) at a time, with
    FlashAttention's online softmax (Milakov & Gimelshein 2018; Dao et al. 2022): each query
    row keeps the largest score m seen so far, the sum l of exp(score - m) and the output o
    weighted the same way; a key block that raises m rescales l and o by exp(m_old - m_new).
    The result is the exact softmax-weighted sum; only the float32 rounding differs from
    `attention` (tests/model/test_long.py says by how much). Key blocks wholly after a query
    block's last position are skipped: the causal mask would zero them."""
    B, T, n_heads, head_dim = xq.shape
    n_kv_heads = keys.shape[2]
    n_rep = n_heads // n_kv_heads
    q = xq.reshape(B, T, n_kv_heads, n_rep, head_dim)
    sqrt_hd = math.sqrt(head_dim)
    # Dividing every tile of scores by sqrt(head_dim) is a pass over them; when it is a
    # power of two (head_dim 16, 64, 256) dividing q instead gives the same scores exactly.
    fold = sqrt_hd == 2.0 ** round(math.log2(sqrt_hd))
    if fold:
        q = q / np.float32(sqrt_hd)
    k = keys.transpose(0, 2, 3, 1)                                  # (B, n_kv, hd, S)
    v = values.transpose(0, 2, 1, 3)                                # (B, n_kv, S, hd)
    out = np.empty((B, T, n_kv_heads, n_rep, head_dim), np.float32)
    for r0 in range(0, T, block_q):
        r1 = min(T, r0 + block_q)
        n = r1 - r0
        # The block's query heads grouped by the KV head they read: one GEMM per KV head.
        qb = q[:, r0:r1].transpose(0, 2, 3, 1, 4).reshape(B, n_kv_heads, n_rep * n, head_dim)
        m = l = o = None
        # Key 0 comes first and every row sees it, so m is finite from the first block on.
        for c0 in range(0, start_pos + r1, block_k):
            c1 = min(start_pos + r1, c0 + block_k)
            s = qb @ k[..., c0:c1]                                  # (B, n_kv, n_rep * n, c1 - c0)
            if not fold:
                s /= np.float32(sqrt_hd)                            # as `attention` (and Meta) divide
            if c1 - 1 > start_pos + r0:                             # a key after the first row's position
                s5 = s.reshape(B, n_kv_heads, n_rep, n, c1 - c0)
                s5 += causal_mask(n, start_pos + r0, c0, c1)
            m_new = s.max(axis=-1, keepdims=True)                   # (B, n_kv, n_rep * n, 1)
            if m is not None:
                m_new = np.maximum(m, m_new)
            p = np.exp(np.subtract(s, m_new, out=s), out=s)
            if m is None:
                l, o = p.sum(axis=-1, keepdims=True), p @ v[:, :, c0:c1]
            else:
                alpha = np.exp(m - m_new)
                l = l * alpha + p.sum(axis=-1, keepdims=True)
                o = o * alpha + p @ v[:, :, c0:c1]
            m = m_new
        out[:, r0:r1] = (o / l).reshape(B, n_kv_heads, n_rep, n, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(B, T, n_heads * head_dim)


def blocked_attention(xq: np.ndarray, keys: np.ndarray, values: np.ndarray, start_pos: int, rnd=identity,
                      trace: dict | None = None) -> np.ndarray:
    """`attention` in O(block * S) memory. float32: FlashAttention tiles. bfloat16 numerics:
    blocks of query rows, keeping every rounding point of the reference (the probabilities
    are rounded once normalised, so each row's softmax sees its whole row at once).
    The KV heads (each with its query heads) are independent: they are split between
    threads (npllama.parallel) when there is enough work.
    trace: as `attention`'s. In float32 the scores and probs are the reference's, computed
    beside the tiles, whose output is returned either way: tracing changes no result."""
    if trace is not None:
        traced = attention_rows(xq, keys, values, start_pos, rnd, trace)
        if rnd is not identity:
            return traced
    B, T, n_heads, head_dim = xq.shape
    S, n_kv_heads = keys.shape[1], keys.shape[2]
    n_rep = n_heads // n_kv_heads
    groups = min(parallel.threads(), n_kv_heads) if B * n_heads * T * S >= PARALLEL_SCORES else 1
    if rnd is identity:
        block_q = min(T, FLASH_BLOCK_Q)
        block_k = max(64, FLASH_BLOCK_BYTES // (4 * B * n_heads * block_q))
        part = lambda q, k, v: flash_attention(q, k, v, start_pos, block_q, block_k)  # noqa: E731
    else:
        part = lambda q, k, v: attention_rows(q, k, v, start_pos, rnd,  # noqa: E731
                                              scratch_bytes=ROWS_SCRATCH_BYTES // groups)
    out = np.empty((B, T, n_heads * head_dim), np.float32)
    bounds = [n_kv_heads * g // groups for g in range(groups + 1)]

    def job(h0, h1):  # KV heads h0..h1-1 and their query heads
        out[..., h0 * n_rep * head_dim:h1 * n_rep * head_dim] = part(
            xq[:, :, h0 * n_rep:h1 * n_rep], keys[:, :, h0:h1], values[:, :, h0:h1])
    parallel.run([lambda h0=h0, h1=h1: job(h0, h1) for h0, h1 in zip(bounds, bounds[1:])])
    return out

def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88: silu -> -0
        return x / (np.float32(1.0) + np.exp(-x))


def swiglu(h1: np.ndarray, h3: np.ndarray, rnd=identity) -> np.ndarray:
    # silu(w1 x) * w3 x, given h1 = w1 x and h3 = w3 x: the gate of the feed-forward.
    return rnd(rnd(silu(h1)) * h3)


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, rnd=identity) -> np.ndarray:
    # SwiGLU: w2(silu(w1 x) * w3 x). x (..., dim), w1/w3 (hidden, dim), w2 (dim, hidden).
    return linear(swiglu(linear(x, w1, rnd), linear(x, w3, rnd), rnd), w2, rnd)
