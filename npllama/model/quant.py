"""GGUF's block-quantized weights, held as their raw blocks and widened exactly to float32.

A quantized tensor of shape (rows, cols) is rows * (cols / block) blocks of `type_size` bytes
each (ggml's layout: a row is a whole number of blocks). Each block holds one or two float16
scales and small integers; its values are scale * q (+ min), each product and sum rounded to
float32 in the order the `gguf` library's dequantize uses, so the result is bit-identical to
it (tests/model/test_quant.py checks every type against it). numpy has no fused multiply-add, so
the order written here is the order computed.

NaN or infinite scales are refused (WeightError naming the tensor) rather than widened: a
NaN scale turns a whole block into NaN, which would otherwise surface tokens later as NaN
logits. The scales are a few bytes per block, so checking them costs nothing next to the
widening.

The model core: imports only numpy and npllama.errors.
"""
from __future__ import annotations

import numpy as np

from ..errors import WeightError

QK_K = 256

# ggml type id -> (name, elements per block, bytes per block)
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
}
BY_NAME = {name: qtype for qtype, (name, _, _) in TYPES.items()}
# Byte offsets of each block's float16 scales (d, and m / dmin where there is one).
SCALE_OFFSETS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    # (n, 1) float32 from the float16 at `offset` of each block (exact: f16 -> f32 is exact),
    # cast straight from the strided bytes: a contiguous copy of them first cost a third of
    # Q8_0's widening (tools/bench_quant.py widen)
    return blocks[:, offset:offset + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    # (n, B) bytes -> (n, 2B) 4-bit values: each run of `group` bytes gives its low nibbles
    # then its high nibbles, as ggml packs them.
    # Two ufuncs writing each half in place: 2-3x faster than one shift broadcast over both
    # halves, whose inner loops are `group` long.
    n = qs.shape[0]
    q = qs.reshape(n, -1, group)
    out = np.empty((n, q.shape[1], 2, group), np.uint8)
    np.bitwise_and(q, np.uint8(0x0F), out=out[:, :, 0])
    np.right_shift(q, np.uint8(4), out=out[:, :, 1])
    return out.reshape(n, -1)


def _high_bits(qh: np.ndarray, n_bits: int, group: int) -> np.ndarray:
    # (n, B) bytes -> bit j of each byte for j < n_bits, each group of `group` bytes bit-major
    n = qh.shape[0]
    q = qh.reshape(n, -1, 1, group) >> np.arange(n_bits, dtype=np.uint8).reshape(1, 1, n_bits, 1)
    return (q & np.uint8(1)).reshape(n, -1)


# The arithmetic below runs in place on the one float32 array each decoder makes (the same
# operations in the same order: the results are unchanged), so widening a tile allocates
# one tile, not one per operation.

# A block type's parts: (integers q (n, S, L), scales d (n, S), offsets m (n, S) or None) for
# n blocks of S sub-blocks of L values, each value d * q (+ m). _decoded makes the values;
# the tiled matmul's decode path dots q with x first and scales the sums (tiled.block_dots).

def _decoded(parts) -> np.ndarray:
    # d * q (+ m), q's integers as float32, in place -> (n, S * L)
    q, d, m = parts
    r = q.astype(np.float32)
    np.multiply(d[:, :, None], r, out=r)
    if m is not None:
        np.add(r, m[:, :, None], out=r)
    return r.reshape(r.shape[0], -1)


def _one(q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None):
    # one sub-block per block: q (n, 32), d and m (n, 1)
    return q.reshape(q.shape[0], 1, -1), d, m


def _q4_0(b):
    return _one(_nibbles(b[:, 2:], 16).astype(np.int8) - np.int8(8), _f16(b, 0))


def _q4_1(b):
    return _one(_nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2))


def _q5_bits(qh4: np.ndarray, ql: np.ndarray) -> np.ndarray:
    # 32 high bits as one little-endian uint32, bit i for element i
    qh = np.ascontiguousarray(qh4).view(np.uint32) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return _nibbles(ql, 16) | ((qh & np.uint32(1)).astype(np.uint8) << np.uint8(4))


def _q5_0(b):
    return _one(_q5_bits(b[:, 2:6], b[:, 6:]).astype(np.int8) - np.int8(16), _f16(b, 0))


def _q5_1(b):
    return _one(_q5_bits(b[:, 4:8], b[:, 8:]), _f16(b, 0), _f16(b, 2))


def _q8_0(b):
    return _one(np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b, 0))


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # 12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4)
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_affine(b: np.ndarray, q: np.ndarray):
    # Q4_K/Q5_K: 8 sub-blocks of 32, each (d * scale) * q - (dmin * min); adding the negated
    # product is the subtraction, exactly
    sc, mn = _k_scales(b[:, 4:16])
    return q.reshape(-1, 8, 32), _f16(b, 0) * sc.astype(np.float32), -(_f16(b, 2) * mn.astype(np.float32))


def _q4_k(b):
    return _k_affine(b, _nibbles(b[:, 16:], 32))


def _q5_k(b):
    return _k_affine(b, _nibbles(b[:, 48:], 32) | (_high_bits(b[:, 16:48], 8, 32) << np.uint8(4)))


def _q6_k(b):
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (ql | (qh.reshape(n, 8, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
    return q.reshape(n, 16, 16), _f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32), None


def _f32(b):
    return np.ascontiguousarray(b).view(np.float32)


def _f16_values(b):
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _bf16(b):
    return (np.ascontiguousarray(b).view(np.int16).astype(np.int32) << 16).view(np.float32)


def pad_q8_0(x: np.ndarray) -> np.ndarray:
    """x (M, K) -> (M, K / 32 * 34): each run of 32 columns after two zeros, to multiply
    QuantTensor.padded_rows."""
    m, k = x.shape
    padded = np.zeros((m, k // 32, 34), np.float32)
    padded[:, :, 2:] = x.reshape(m, -1, 32)
    return padded.reshape(m, -1)


PARTS = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}
DECODERS = {0: _f32, 1: _f16_values, 30: _bf16} | {t: (lambda b, f=f: _decoded(f(b))) for t, f in PARTS.items()}


def row_bytes(qtype: int, cols: int, name: str = "tensor") -> int:
    """Bytes of one row of `cols` values of `qtype`; refuses a type or a width that is not
    a whole number of its blocks."""
    if qtype not in TYPES:
        raise WeightError(f"{name}: ggml type {qtype} is not supported (supported: {', '.join(BY_NAME)})")
    tname, block, size = TYPES[qtype]
    if cols % block:
        raise WeightError(f"{name}: {cols} columns are not a whole number of {tname} blocks of {block}")
    return cols // block * size


def check_scales(raw: np.ndarray, qtype: int, name: str) -> None:
    """Refuse blocks whose float16 scales are NaN or infinite (WeightError naming the tensor)."""
    offsets = SCALE_OFFSETS.get(qtype)
    if not offsets:
        return
    blocks = raw.reshape(-1, TYPES[qtype][2])
    for off in offsets:
        bits = np.ascontiguousarray(blocks[:, off:off + 2]).view(np.uint16)
        if ((bits & np.uint16(0x7C00)) == np.uint16(0x7C00)).any():
            raise WeightError(f"{name}: a {TYPES[qtype][0]} block has a NaN or infinite scale")


def dequantize(raw: np.ndarray, qtype: int, cols: int, name: str = "tensor") -> np.ndarray:
    """Raw GGUF bytes (rows, row_bytes) uint8 (or any shape of whole rows) -> (rows, cols)
    float32, bit-identical to gguf.quants.dequantize."""
    raw = np.asarray(raw, np.uint8)
    per_row = row_bytes(qtype, cols, name)
    if raw.size % per_row:
        raise WeightError(f"{name}: {raw.size} bytes are not whole rows of {per_row}")
    check_scales(raw, qtype, name)
    blocks = raw.reshape(-1, TYPES[qtype][2])
    return DECODERS[qtype](blocks).reshape(-1, cols)


class QuantTensor:
    """A (rows, cols) weight held as its raw GGUF blocks (a read-only memory map of the file,
    usually): rows are widened to float32 on request, never the whole matrix at once unless
    asked (widen()). The scales are checked once, when check() is first called (the tiled
    matmul calls it before its first tile), not on every tile."""

    def __init__(self, raw: np.ndarray, qtype: int, shape: tuple[int, int], name: str):
        rows, cols = shape
        per_row = row_bytes(qtype, cols, name)
        if raw.dtype != np.uint8 or raw.size != rows * per_row:
            raise WeightError(f"{name}: {raw.size} bytes of blocks, shape {shape} of {TYPES[qtype][0]} needs "
                              f"{rows * per_row}")
        self.raw = raw.reshape(rows, per_row)
        self.qtype, self.shape, self.name = qtype, (rows, cols), name
        self.ndim = 2
        self.checked = False
        self.in_place = qtype == 8      # rows(out=) writes into out (else: a new array)

    @property
    def type_name(self) -> str:
        return TYPES[self.qtype][0]

    @property
    def nbytes(self) -> int:
        return self.raw.size

    def check(self, chunk_rows: int = 4096) -> None:
        """Refuse NaN/inf scales anywhere in the tensor (once; a chunk of rows at a time)."""
        if not self.checked:
            for r in range(0, self.shape[0] if self.raw.size else 0, chunk_rows):   # no blocks: nothing to check
                check_scales(self.raw[r:r + chunk_rows], self.qtype, self.name)
            self.checked = True

    def rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows start:stop as float32 (stop - start, cols), in `out` when the type can be
        widened in place (Q8_0: one pass, int8 * scale, the product exact as gguf's is)."""
        if not self.checked:
            check_scales(self.raw[start:stop], self.qtype, self.name)
        if self.qtype == 8 and out is not None:
            # the cast, then the scaling in place: two passes, each faster than one mixed-type
            # ufunc (which casts through a small buffer)
            b, o = self.raw[start:stop].reshape(-1, 34), out.reshape(-1, 32)
            np.copyto(o, b[:, 2:].view(np.int8), casting="unsafe")
            np.multiply(o, _f16(b, 0), out=o)
            return out
        return DECODERS[self.qtype](self.raw[start:stop].reshape(-1, TYPES[self.qtype][2])).reshape(-1, self.shape[1])

    def padded_rows(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Q8_0 rows start:stop, widened with each block's two scale bytes left where they
        are: (stop - start, cols / 32 * 34) float32 in `out`, made by one contiguous cast of
        the blocks' bytes and one scaling in place (no gather of the 32 values of each block,
        whose short loops cost numpy more than the arithmetic). Columns 34b and 34b + 1 hold
        the scale's bytes times the scale (finite: the scales were checked); a matmul by
        pad_q8_0(x), zero there, adds exact zeros for them, so each product is the gguf
        value times x and only the summation order differs."""
        b = self.block_integers(start, stop, out).reshape(-1, 34)
        np.multiply(b, self.block_scales(start, stop).reshape(-1, 1), out=b)
        return out

    def parts(self, start: int, stop: int):
        """Rows start:stop of a block type as (integers q (n, S, L), scales d (n, S), offsets
        m (n, S) or None): each row S sub-blocks of L values d * q (+ m)."""
        n = stop - start
        q, d, m = PARTS[self.qtype](self.raw[start:stop].reshape(-1, TYPES[self.qtype][2]))
        return q.reshape(n, -1, q.shape[-1]), d.reshape(n, -1), None if m is None else m.reshape(n, -1)

    def block_integers(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Q8_0 rows start:stop as their blocks' bytes cast to float32, unscaled: (stop - start,
        cols / 32 * 34) in `out`, each block's int8 values after two junk columns (its scale's
        bytes), which pad_q8_0(x)'s zeros cancel."""
        np.copyto(out, self.raw[start:stop].view(np.int8), casting="unsafe")
        return out

    def block_scales(self, start: int, stop: int) -> np.ndarray:
        """Q8_0 rows start:stop's block scales, (stop - start, cols / 32) float32."""
        return _f16(self.raw[start:stop].reshape(-1, 34), 0).reshape(stop - start, -1)

    def block_mins(self) -> np.ndarray:
        """Q4_1's and Q5_1's mins, (rows, cols / 32) float32, made once and kept (1/8 of the
        float32 matrix's size): llama.cpp numerics read them every matmul."""
        if getattr(self, "_mins", None) is None:
            self._mins = _f16(self.raw.reshape(-1, TYPES[self.qtype][2]), 2).reshape(self.shape[0], -1)
        return self._mins

    def take(self, index) -> np.ndarray:
        """Rows by index (an embedding gather), float32 (..., cols)."""
        index = np.asarray(index)
        return dequantize(self.raw[index.reshape(-1)], self.qtype, self.shape[1], self.name).reshape(
            *index.shape, self.shape[1])

    __getitem__ = take

    def widen(self) -> np.ndarray:
        """The whole matrix as float32 (for the resident mode and for small vectors)."""
        return self.rows(0, self.shape[0])
