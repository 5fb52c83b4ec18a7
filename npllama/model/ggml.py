"""llama.cpp's CPU numerics (`--numerics llama.cpp`): what ggml's CPU backend does to the
activations of every matmul, reproduced for a model whose weights are a GGUF's blocks.

ggml multiplies a weight row by an activation row with the weight type's `vec_dot`, whose
second operand must be in the type's `vec_dot_type`; the float32 activations are converted
to it first (ggml-cpu.c, type_traits_cpu):
- Q4_0, Q5_0, Q8_0 weights: Q8_0 activations. Blocks of 32 values: amax = max |x|, the
  stored scale d = fp16(amax / 127), each value rint(x * 127 / amax) (ties to even), an int8.
  (x86's quantize_row_q8_0: 127 / amax, not 1 / d, and _mm256_round_ps, so not the
  reference C version's roundf.)
- Q4_1, Q5_1: Q8_1 activations: the same values and scale, and per block s = fp16(amax / 127
  * sum q), the block's sum, which the dot multiplies by the weight block's min.
- Q4_K, Q5_K, Q6_K: Q8_K activations (quantize_row_q8_K_ref on x86 as well): blocks of 256,
  m = the first value of largest magnitude, iscale = -127 / m, q = min(127, rint(iscale * x)),
  d = 1 / iscale, kept in float32; the dot uses exact integer block sums.
- F16, BF16: the activations rounded to f16 or bf16; F32: as they are.

Within a block the dot products are integers (int8 times small ints), exact; each block's sum
is then scaled in float32. Every value involved (a scale times an integer) is exact in float32,
so x̃ @ W̃.T, with x̃ the activations' dequantized blocks (d * q) and W̃ the weights'
(gguf's dequantization), is llama.cpp's dot in real arithmetic; computed in float32 the two
differ only in summation order, ~1e-7 relative. Q8_1's s is the exception: fp16(d * sum q)
is not sum(fp16(d) * q), and the difference times the min is added as llama.cpp's dot has it.

The KV cache is f16 (llama.cpp's default -ctk/-ctv f16). Attention (flash attention, the
default) on 64 query rows or more (a prompt, a perplexity chunk) reads the f16 keys and
values widened to float32 and computes in float32 (ggml's tiled flash-attention path); on
fewer (decoding) ggml rounds the queries to f16, done here too, and accumulates the weighted
values in f16, which is not reproduced (float32 here).

The model core: imports only numpy and the model's own modules.
"""
from __future__ import annotations

import numpy as np

from . import bf16
from .quant import QK_K, QuantTensor

FA_TILE_Q = 64   # ggml's GGML_FA_TILE_Q: from this many query rows on, the tiled float32 path
KINDS = {2: "q8_0", 6: "q8_0", 8: "q8_0", 3: "q8_1", 7: "q8_1", 12: "q8_k", 13: "q8_k", 14: "q8_k",
         0: "f32", 1: "f16", 30: "bf16"}


def activation_kind(w) -> str:
    """What a matmul by weight w turns its activations into: q8_0, q8_1, q8_k, f16, bf16 or
    f32 (ggml's vec_dot_type; float arrays by their dtype, uint16 being bf16 bits)."""
    if isinstance(w, QuantTensor):
        return KINDS[w.qtype]
    return {"float16": "f16", "uint16": "bf16", "bfloat16": "bf16"}.get(w.dtype.name, "f32")


def _blocks_q8(x: np.ndarray):
    # x (M, K) -> the unrounded scale amax / 127 of each block of 32 (M, K / 32, 1) and the
    # int8 values q (M, K / 32, 32), as float32
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
    return amax / np.float32(127), np.rint(b * iscale)


def quantize_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (M, K) float32 -> (the values of its Q8_1 blocks, fp16(d) * q, (M, K), their stored
    sums s (M, K / 32), each fp16(d * sum q) as float32). Q8_0's values are the same."""
    d, q = _blocks_q8(x)
    s = (d[..., 0] * q.sum(axis=-1, dtype=np.float32)).astype(np.float16).astype(np.float32)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape), s


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """x (M, K) float32 -> the values of its Q8_0 blocks, fp16(d) * q, (M, K) float32."""
    return quantize_q8_1(x)[0]


def quantize_q8_k(x: np.ndarray) -> np.ndarray:
    """x (M, K) float32 -> the values of its Q8_K blocks of 256, d * q, (M, K) float32."""
    b = x.reshape(x.shape[0], -1, QK_K)
    m = np.take_along_axis(b, np.abs(b).argmax(axis=-1)[..., None], axis=-1)   # the first largest
    with np.errstate(divide="ignore"):
        iscale = np.where(m != 0, np.float32(-127) / m, np.float32(0))
        d = np.where(m != 0, np.float32(1) / iscale, np.float32(0))
    q = np.minimum(np.rint(iscale * b), np.float32(127))
    return (d * q).reshape(x.shape)


def activations(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """x (M, K) float32 as a matmul of `kind` sees it -> (x̃ (M, K), Q8_1's block sums s or None)."""
    if kind == "q8_0":
        return quantize_q8_0(x), None
    if kind == "q8_1":
        return quantize_q8_1(x)
    if kind == "q8_k":
        return quantize_q8_k(x), None
    if kind == "f16":
        return x.astype(np.float16).astype(np.float32), None
    if kind == "bf16":
        return bf16.round(x), None
    return x, None


def matmul(x: np.ndarray, weights: list, float_matmul) -> np.ndarray:
    """x (M, K) float32 @ concat(weights).T -> (M, sum N_i) as llama.cpp computes it: each run
    weights[i:j] of one activation kind multiplies those activations (float_matmul(x̃, i, j):
    the weight store's own matmul of the dequantized weights); Q8_1's runs add
    (s - x̃'s block sums) @ mins.T, the part of llama.cpp's min term that x̃ @ W̃.T lacks."""
    out, i = [], 0
    while i < len(weights):
        kind = activation_kind(weights[i])
        j = i + 1
        while j < len(weights) and activation_kind(weights[j]) == kind:
            j += 1
        xt, s = activations(x, kind)
        y = float_matmul(xt, i, j)
        if s is not None:
            # exact: the 32 values of a block are multiples of its fp16 scale, 19 bits each
            block_sums = xt.reshape(x.shape[0], -1, 32).sum(axis=-1, dtype=np.float32)
            y += (s - block_sums) @ np.concatenate([w.block_mins() for w in weights[i:j]]).T
        out.append(y)
        i = j
    return out[0] if len(out) == 1 else np.concatenate(out, axis=1)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, rnd=None) -> np.ndarray:
    """ggml's RMS_NORM then MUL: the mean of the float32 squares summed in double (ggml_float),
    rounded to float32, then x * (1 / sqrt(mean + eps)) * weight in float32 (ops.rms_norm's
    signature; rnd unused). The double sum makes the result independent of summation order:
    the next quantization then rounds the same values as llama.cpp's."""
    x = x.astype(np.float32, copy=False)
    mean = (x * x).astype(np.float64).mean(axis=-1, keepdims=True).astype(np.float32)
    return x * (np.float32(1.0) / np.sqrt(mean + np.float32(eps))) * weight


def queries(xq: np.ndarray) -> np.ndarray:
    """The queries attention reads, xq (B, T, n_heads, head_dim): under FA_TILE_Q query rows
    in the batch (B * T: ggml counts a batch's tokens), ggml rounds them to f16."""
    return xq.astype(np.float16).astype(np.float32) if xq.shape[0] * xq.shape[1] < FA_TILE_Q else xq
