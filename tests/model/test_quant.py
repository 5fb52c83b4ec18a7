"""npllama.quant's dequantization against the gguf library's (the format's reference in
Python): raw blocks drawn by hypothesis, scales included (extreme, subnormal, zero,
negative float16), compared bit for bit. Both compute the same float32 operations in the
same order, so any difference is a bug, not rounding."""
import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama.errors import WeightError
from npllama.model import tiled
from npllama.model.quant import SCALE_OFFSETS, TYPES, QuantTensor, dequantize, pad_q8_0
from tools.random_gguf import random_blocks

QTYPES = sorted(TYPES)


def finite_f16_bits():
    # every finite float16: exponent field 0..30 (0 = zero and subnormals), any sign/mantissa
    return st.integers(0, 0xFFFF).filter(lambda b: (b & 0x7C00) != 0x7C00)


@st.composite
def blocks(draw, qtype):
    name, block, size = TYPES[qtype]
    n_blocks = draw(st.integers(1, 6))
    raw = np.frombuffer(draw(st.binary(min_size=n_blocks * size, max_size=n_blocks * size)), np.uint8).copy()
    raw = raw.reshape(n_blocks, size)
    for off in SCALE_OFFSETS.get(qtype, ()):
        for i in range(n_blocks):
            raw[i, off:off + 2] = np.array([draw(finite_f16_bits())], np.uint16).view(np.uint8)
    return raw.reshape(-1), n_blocks * block


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    # F32/F16/BF16 payloads may hold NaNs: equal means same values with NaNs in the same places
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("qtype", QTYPES, ids=[TYPES[q][0] for q in QTYPES])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dequantize_matches_gguf_bit_for_bit(qtype, data):
    raw, cols = data.draw(blocks(qtype))
    ours = dequantize(raw, qtype, cols, "t")
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(1, cols).astype(np.float32)
    assert ours.dtype == np.float32
    if qtype in SCALE_OFFSETS:   # finite scales: the values are finite, compare the bits
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    else:
        assert same_bits(ours, theirs)


@pytest.mark.parametrize("qtype", sorted(SCALE_OFFSETS), ids=[TYPES[q][0] for q in sorted(SCALE_OFFSETS)])
@pytest.mark.parametrize("bits", [0x7C00, 0xFC00, 0x7E00, 0x7C01])
def test_nan_or_inf_scale_refused_naming_the_tensor(qtype, bits):
    _, block, size = TYPES[qtype]
    raw = np.zeros((2, size), np.uint8)
    raw[1, SCALE_OFFSETS[qtype][-1]:SCALE_OFFSETS[qtype][-1] + 2] = np.array([bits], np.uint16).view(np.uint8)
    with pytest.raises(WeightError, match="layers.3.attention.wq.weight.*NaN or infinite scale"):
        dequantize(raw.reshape(-1), qtype, 2 * block, "layers.3.attention.wq.weight")


def test_quant_tensor_rows_and_take_match_whole_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    t = QuantTensor(raw.reshape(-1), 8, (6, 64), "w")
    full = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(t.widen(), full)
    assert np.array_equal(t.rows(2, 5), full[2:5])
    assert np.array_equal(t.take(np.array([[5, 0], [1, 1]])), full[[[5, 0], [1, 1]]])


def test_q8_0_widened_in_place_is_bit_identical_to_gguf():
    # the tiled matmul's path (rows into its buffer), on random bytes: every int8, and scales
    # drawn from every finite float16 (subnormals and 65504 included)
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (64, 8 * 34), dtype=np.uint8)
    blocks = raw.reshape(-1, 34)
    bits = rng.integers(0, 0x7C00, blocks.shape[0], dtype=np.uint16) | (rng.integers(0, 2, blocks.shape[0],
                                                                                  dtype=np.uint16) << 15)
    blocks[:, :2] = bits.reshape(-1, 1).view(np.uint8)
    t = QuantTensor(raw.reshape(-1), 8, (64, 256), "w")
    t.check()
    out = np.full((40, 256), np.nan, np.float32)
    got = t.rows(7, 47, out)
    assert got is out
    want = gguf.quants.dequantize(raw[7:47], gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # the tiled matmul's layout: the scale bytes left in each block, finite, x zero there
    padded = t.padded_rows(7, 47, np.full((40, 8 * 34), np.nan, np.float32)).reshape(40, 8, 34)
    assert np.array_equal(padded[:, :, 2:].reshape(40, 256).view(np.uint32), want.view(np.uint32))
    assert np.isfinite(padded).all()
    x = rng.standard_normal((3, 256)).astype(np.float32)
    xp = pad_q8_0(x).reshape(3, 8, 34)
    assert (xp[:, :, :2] == 0).all() and np.array_equal(xp[:, :, 2:].reshape(3, 256), x)


def test_bad_sizes_refused():
    with pytest.raises(WeightError, match="w: 40 columns"):
        QuantTensor(np.zeros(34, np.uint8), 8, (1, 40), "w")
    with pytest.raises(WeightError, match="w: 33 bytes"):
        QuantTensor(np.zeros(33, np.uint8), 8, (1, 32), "w")
    with pytest.raises(WeightError, match="ggml type 99"):
        QuantTensor(np.zeros(33, np.uint8), 99, (1, 32), "w")


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 17])     # decode block dots (<= 8), GEMMs, ops.matmul's few rows
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16"])
def test_the_tiled_matmul_of_every_block_type_is_the_product_of_gguf_s_values(qtype, rows, monkeypatch):
    # every path tiled.matmul takes (block dots when decoding, widened tiles for GEMMs, on 1-2
    # threads) against float64 products of gguf's own dequantization
    monkeypatch.setenv("NPLLAMA_THREADS", "2")
    rng = np.random.default_rng(rows)
    t = gguf.GGMLQuantizationType[qtype]
    n, k = 37, 512
    raw = random_blocks(rng, int(t), n, k, 1.0) if qtype.endswith("_K") else \
        gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), t)      # K-quants: gguf cannot
    w = QuantTensor(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), int(t), (n, k), "w")
    values = gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), t).astype(np.float64).reshape(n, k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    got = tiled.matmul(x, [w])
    # float32 sums of k products, each exact or rounded once: within (k + 2) eps32 of the sum of |terms|
    bound = (k + 2) * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(values).T)
    assert np.all(np.abs(got - x.astype(np.float64) @ values.T) <= bound)
