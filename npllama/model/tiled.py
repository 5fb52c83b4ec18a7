"""Matmul against bf16 weights that stay bf16 (memory-mapped uint16): each weight is widened
to float32 a cache-sized tile at a time, so the full float32 matrix never exists.

The widening uses the pair layout: two adjacent bf16 values (columns 2j, 2j+1) are one
uint32 whose high half is column 2j+1 and low half column 2j (little-endian). Masking the low
half off gives column 2j+1 as float32, shifting left by 16 gives column 2j, both exactly and
each with one contiguous vectorised operation. So x @ W.T = [x[:, 1::2] | x[:, 0::2]] @
[W_odd | W_even].T, and no strided copies are needed.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from . import parallel

TILE_BYTES = 512 * 1024          # the widened tile for decode: it and its source fit in L2
PREFILL_TILE_BYTES = 8 * 1024**2 # for many rows of x: wider tiles make an efficient GEMM
DECODE_ROWS = 8                  # up to this many rows of x, a matmul is a GEMV in effect
HIGH = np.uint32(0xFFFF0000)
LOW_TO_HIGH = np.uint32(0x10000)
_local = threading.local()


def supported(w: np.ndarray) -> bool:
    return w.dtype == np.uint16 and w.ndim == 2 and w.shape[1] % 2 == 0 and sys.byteorder == "little"


def _buffer(rows: int, k: int) -> np.ndarray:
    # One per thread and shape, kept: a forward pass cycles through a few shapes per token.
    bufs = _local.__dict__.setdefault("bufs", {})
    if (rows, k) not in bufs:
        bufs[(rows, k)] = np.empty((rows, k), np.uint32)
    return bufs[(rows, k)]


def _rows(x_pairs: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    # out (M, r1 - r0) = x @ W[r0:r1].T, a tile of rows at a time. u: the rows as uint32
    # pairs (N, K/2); x_pairs: x's odd columns then its even columns, matching the tile
    # [odd | even] so one GEMM covers both.
    n, half = u.shape
    rows = max(1, min(n, (TILE_BYTES if x_pairs.shape[0] <= DECODE_ROWS else PREFILL_TILE_BYTES) // (8 * half)))
    buf = _buffer(rows, 2 * half)
    f = buf.view(np.float32)
    for r in range(0, n, rows):
        k = min(rows, n - r)
        np.bitwise_and(u[r:r + k], HIGH, out=buf[:k, :half])
        np.multiply(u[r:r + k], LOW_TO_HIGH, out=buf[:k, half:])  # == u << 16 (mod 2^32), faster
        np.matmul(x_pairs, f[:k].T, out=out[:, r:r + k])


def matmul(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """x (M, K) float32 @ concat(weights).T for bf16-bits weights (N_i, K) -> (M, sum N_i).

    Decoding (M <= DECODE_ROWS), the widening is most of the work and each numpy call runs on
    one core, so the weight rows are split between threads (npllama.parallel: BLAS on one
    thread each). Prefilling, the GEMMs are most of it and BLAS already runs them on every
    core: threads of ours on top would oversubscribe the cores (the 8B prefill runs
    1.15-1.27x faster without)."""
    x = np.asarray(x, dtype=np.float32)
    x_pairs = np.concatenate([x[:, 1::2], x[:, 0::2]], axis=1)
    total = sum(w.shape[0] for w in weights)
    out = np.empty((x.shape[0], total), np.float32)
    jobs, col = [], 0
    decoding = x.shape[0] <= DECODE_ROWS
    n_threads = parallel.threads() if decoding else 1
    for w in weights:
        u = w.view(np.uint32)                                   # (N, K/2)
        step = -(-w.shape[0] // n_threads)
        for r in range(0, w.shape[0], step):
            o = out[:, col + r:col + min(r + step, w.shape[0])]
            jobs.append(lambda u=u[r:r + step], o=o: _rows(x_pairs, u, o))
        col += w.shape[0]
    if decoding:
        parallel.run(jobs)
    else:
        for job in jobs:       # on this thread, BLAS threading each GEMM as it will
            job()
    return out
