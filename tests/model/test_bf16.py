"""bf16 rounding against torch's own float32 -> bfloat16 conversion, bit for bit."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from npllama.model import bf16

pytestmark = pytest.mark.torch


def torch_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def check_against_torch(bits: np.ndarray) -> None:
    x = bits.astype(np.uint32).view(np.float32)
    ours, theirs = bf16.to_bits(x), torch_bits(x)
    nan = np.isnan(x)
    # torch's NaN bits differ between its scalar (0x7FC0) and vector (0xFFFF) paths; only
    # NaN-ness is a contract. Every other value must agree bit for bit.
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16.from_bits(ours[nan])).all()


def test_exhaustive_high_halves():
    # Every bf16 value, with low halves at 0, just below/at/above the tie, and all ones:
    # the rounding boundary and carry into the exponent for every high half.
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF], dtype=np.uint32)
    check_against_torch((high[:, None] | lows[None, :]).ravel())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_arbitrary_float32_bit_patterns(bits):
    check_against_torch(np.array(bits, dtype=np.uint32))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=1))
def test_arbitrary_floats_and_roundtrip(xs):
    x = np.array(xs, dtype=np.float32)
    check_against_torch(x.view(np.uint32))
    r = bf16.round(x)
    # Rounding is idempotent and widening is exact.
    assert np.array_equal(bf16.round(r).view(np.uint32), r.view(np.uint32))
    assert np.array_equal(bf16.to_bits(bf16.from_bits(bf16.to_bits(x))), bf16.to_bits(x))


def test_specials():
    x = np.array([np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 0.0, -0.0, np.nan, -np.nan], dtype=np.float32)
    r = bf16.round(x)
    assert r[0] == np.inf and r[1] == -np.inf
    assert r[2] == np.inf and r[3] == -np.inf  # overflow past the largest bf16 rounds to inf
    assert r[4].view(np.uint32) == 0 and r[5].view(np.uint32) == 0x80000000
    assert np.isnan(r[6]) and np.isnan(r[7]) and np.signbit(r[7])


def test_ties_to_even():
    # 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: goes to the even (1); 1 + 3*2^-8 up.
    assert bf16.round(np.float32(1 + 2**-8)) == 1.0
    assert bf16.round(np.float32(1 + 3 * 2**-8)) == np.float32(1 + 2**-6)


def test_from_bits_rejects_other_dtypes():
    import pytest
    with pytest.raises(TypeError, match="uint16"):
        bf16.from_bits(np.zeros(3, dtype=np.int32))
