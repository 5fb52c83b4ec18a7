"""Matmul against weights that stay as stored (memory-mapped): bf16 bit patterns (uint16)
or a GGUF's quantized blocks (npllama.model.quant.QuantTensor). Each weight is widened to
float32 a cache-sized tile of rows at a time, so the full float32 matrix never exists; one
tiling loop (_tiles) serves every storage, only the widening differs.

bf16 uses the pair layout: two adjacent bf16 values (columns 2j, 2j+1) are one uint32 whose
high half is column 2j+1 and low half column 2j (little-endian). Masking the low half off
gives column 2j+1 as float32, shifting left by 16 gives column 2j, both exactly and each with
one contiguous vectorised operation. So x @ W.T = [x[:, 1::2] | x[:, 0::2]] @ [W_odd |
W_even].T, and no strided copies are needed. Quantized rows are widened by
QuantTensor.rows, bit-identical to the gguf library's dequantization, and multiply x as it is;
Q8_0's by QuantTensor.padded_rows (each block's scale bytes left in, junk), which multiply x
with zeros in their columns (pad_q8_0).
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from . import ops, parallel
from .quant import PARTS, QuantTensor, pad_q8_0

TILE_BYTES = 512 * 1024          # the widened tile for decode: it and its source fit in L2
PREFILL_TILE_BYTES = 8 * 1024**2 # for many rows of x: wider tiles make an efficient GEMM
DECODE_ROWS = 8                  # up to this many rows of x, a matmul is a GEMV in effect
Q8_DECODE_BYTES = 2 * TILE_BYTES # Q8_0's tile when decoding: its integers, as float32
HIGH = np.uint32(0xFFFF0000)
LOW_TO_HIGH = np.uint32(0x10000)
_local = threading.local()


def supported(w) -> bool:
    if isinstance(w, QuantTensor):
        return True
    return w.dtype == np.uint16 and w.ndim == 2 and w.shape[1] % 2 == 0 and sys.byteorder == "little"


def _buffer(rows: int, k: int) -> np.ndarray:
    # One per thread and shape, kept: a forward pass cycles through a few shapes per token.
    bufs = _local.__dict__.setdefault("bufs", {})
    if (rows, k) not in bufs:
        bufs[(rows, k)] = np.empty((rows, k), np.float32)
    return bufs[(rows, k)]


def _tiles(x: np.ndarray, widen, n: int, out: np.ndarray, in_place: bool = True) -> None:
    # out (M, n) = x @ W.T for n rows of W, a tile of rows at a time: widen(r0, r1, buf)
    # gives rows r0:r1 as float32 (k, K), in buf if in_place (else buf is None).
    k_dim = x.shape[1]
    rows = max(1, min(n, (TILE_BYTES if x.shape[0] <= DECODE_ROWS else PREFILL_TILE_BYTES) // (4 * k_dim)))
    buf = _buffer(rows, k_dim) if in_place else None
    for r in range(0, n, rows):
        k = min(rows, n - r)
        ops.matmul(x, widen(r, r + k, None if buf is None else buf[:k]), out=out[:, r:r + k])


def _bf16_pairs(u: np.ndarray):
    # u: rows of bf16 as uint32 pairs (N, K/2) -> a widen() giving rows as [odd | even] columns
    half = u.shape[1]

    def widen(r0: int, r1: int, f: np.ndarray) -> np.ndarray:
        b = f.view(np.uint32)
        np.bitwise_and(u[r0:r1], HIGH, out=b[:, :half])
        np.multiply(u[r0:r1], LOW_TO_HIGH, out=b[:, half:])  # == u << 16 (mod 2^32), faster
        return f
    return widen


def q8_0_decode_rows(padded_cols: int) -> int:
    """Q8_0 rows per decode tile: ~1 MB of float32 integers, and its source, in L2."""
    return max(1, Q8_DECODE_BYTES // (4 * padded_cols))


def q8_0_x_blocks(x_q8: np.ndarray) -> np.ndarray:
    """x padded by pad_q8_0, (M, K / 32 * 34) -> its blocks (K / 32, 34, M), as q8_0_dots reads them."""
    m = x_q8.shape[0]
    return np.ascontiguousarray(x_q8.reshape(m, -1, 34).transpose(1, 2, 0))


def q8_0_dots(q: np.ndarray, xb: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out (M, n) = x @ W.T for n Q8_0 rows given as their integers q (n, K / 32 * 34)
    (QuantTensor.block_integers) and scales (n, K / 32): each block's integers dotted with x's
    32 values (xb, q8_0_x_blocks), one batched GEMV over the blocks, then times the block's
    scale. Scaling the (rows, blocks) sums rather than every value halves the work: numpy's
    multiply by one scale per 34 values runs as slowly as the cast (tools/bench_quant.py
    budget). d * (q . x) for (d q) . x: only the rounding order differs."""
    n, nb = scales.shape
    np.einsum("bnm,nb->mn", np.matmul(q.reshape(n, nb, 34).transpose(1, 0, 2), xb), scales, out=out)


def _q8_0_decode(x_q8: np.ndarray, w: QuantTensor, r0: int, r1: int, out: np.ndarray) -> None:
    # out (M, r1 - r0) = x @ w[r0:r1].T for a Q8_0 w and few rows of x, a tile at a time
    xb = q8_0_x_blocks(x_q8)
    rows = q8_0_decode_rows(x_q8.shape[1])
    buf = _buffer(rows, x_q8.shape[1])
    for r in range(r0, r1, rows):
        n = min(rows, r1 - r)
        q8_0_dots(w.block_integers(r, r + n, buf[:n]), xb, w.block_scales(r, r + n), out[:, r - r0:r - r0 + n])


def block_dots(q: np.ndarray, d: np.ndarray, m, x: np.ndarray, x_sums: np.ndarray | None = None) -> np.ndarray:
    """x (M, K) @ W.T for n rows of a block type given as its parts (QuantTensor.parts: q
    (n, S, L), d and m (n, S)) -> (M, n): each sub-block's integers dotted with x's values
    there (one batched GEMV over the sub-blocks), times its scale, plus its offset times the
    sum of x there (x_sums (M, S), given or made). Decoding, this beats widening
    (tools/bench_quant.py budget): no pass of numpy's short-loop broadcasts over every value.
    Only the rounding order differs."""
    xs = x.reshape(x.shape[0], q.shape[1], q.shape[2])                        # (M, S, L)
    p = np.matmul(q.transpose(1, 0, 2).astype(np.float32), xs.transpose(1, 2, 0))   # (S, n, M)
    y = np.einsum("snm,ns->mn", p, d)
    if m is not None:
        y += (xs.sum(axis=-1) if x_sums is None else x_sums) @ m.T
    return y


def _parts_decode(x: np.ndarray, w: QuantTensor, r0: int, r1: int, out: np.ndarray) -> None:
    # out (M, r1 - r0) = x @ w[r0:r1].T for few rows of x, a tile of rows at a time
    rows = max(1, TILE_BYTES // (4 * w.shape[1]))
    sums = None
    for r in range(r0, r1, rows):
        q, d, m = w.parts(r, min(r + rows, r1))
        if m is not None and sums is None:                 # x's sums per sub-block, once
            sums = x.reshape(x.shape[0], q.shape[1], q.shape[2]).sum(axis=-1)
        out[:, r - r0:r - r0 + len(d)] = block_dots(q, d, m, x, sums)


def _job(x: np.ndarray, x_pairs, w, r0: int, r1: int, out: np.ndarray, x_q8=None):
    # out = x @ w[r0:r1].T, as a call for a thread
    if isinstance(w, QuantTensor) and w.qtype == 8 and x.shape[0] <= DECODE_ROWS:
        return lambda: _q8_0_decode(x_q8, w, r0, r1, out)
    if isinstance(w, QuantTensor) and w.qtype in PARTS and x.shape[0] <= DECODE_ROWS:
        return lambda: _parts_decode(x, w, r0, r1, out)
    if isinstance(w, QuantTensor) and w.qtype == 8:
        return lambda: _tiles(x_q8, lambda a, b, f: w.padded_rows(r0 + a, r0 + b, f), r1 - r0, out)
    if isinstance(w, QuantTensor):
        return lambda: _tiles(x, lambda a, b, f: w.rows(r0 + a, r0 + b, f), r1 - r0, out, w.in_place)
    return lambda: _tiles(x_pairs(), _bf16_pairs(w.view(np.uint32)[r0:r1]), r1 - r0, out)


def matmul(x: np.ndarray, weights: list) -> np.ndarray:
    """x (M, K) float32 @ concat(weights).T for bf16-bits (N_i, K) or quantized weights
    -> (M, sum N_i).

    Decoding (M <= DECODE_ROWS), the widening is most of the work and each numpy call runs on
    one core, so the weight rows are split between threads (npllama.parallel: BLAS on one
    thread each). Prefilling, the GEMMs are most of it and BLAS already runs them on every
    core: threads of ours on top would oversubscribe the cores (the 8B prefill runs
    1.15-1.27x faster without)."""
    x = np.asarray(x, dtype=np.float32)
    pairs = []     # x's odd columns then its even ones (bf16's layout), made once if needed

    def x_pairs():
        if not pairs:
            pairs.append(np.concatenate([x[:, 1::2], x[:, 0::2]], axis=1))
        return pairs[0]
    if any(not isinstance(w, QuantTensor) for w in weights):
        x_pairs()                # made here: threads must not race to make it
    x_q8 = pad_q8_0(x) if any(isinstance(w, QuantTensor) and w.qtype == 8 for w in weights) else None
    out = np.empty((x.shape[0], sum(w.shape[0] for w in weights)), np.float32)
    decoding = x.shape[0] <= DECODE_ROWS
    n_threads = parallel.threads() if decoding else 1
    jobs, col = [], 0
    for w in weights:
        if isinstance(w, QuantTensor):
            w.check()            # scales refused once, here, before any thread widens
        step = -(-w.shape[0] // n_threads)
        for r in range(0, w.shape[0], step):
            r1 = min(r + step, w.shape[0])
            jobs.append(_job(x, x_pairs, w, r, r1, out[:, col + r:col + r1], x_q8))
        col += w.shape[0]
    if decoding:
        parallel.run(jobs)
    else:
        for job in jobs:       # on this thread, BLAS threading each GEMM as it will
            job()
    return out
