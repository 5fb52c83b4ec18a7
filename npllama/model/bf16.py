"""bfloat16 emulation: NumPy has no bf16 dtype, so bf16 values live as uint16 bit patterns
(storage) or as float32 arrays whose low 16 bits are zero (compute)."""
from __future__ import annotations

import numpy as np


def round(x: np.ndarray) -> np.ndarray:  # noqa: A001 - mirrors np.round, for bf16
    """float32 -> float32 holding the nearest bf16 value (ties to even): what a torch op
    with a bf16 output stores.

    Overflow rounds to +-inf. NaN stays NaN (sign kept, quiet bit set); torch itself gives
    0x7FC0 on its scalar path and 0xFFFF on its vector path, so only NaN-ness is portable.
    """
    x = np.asarray(x, dtype=np.float32)
    b = x.view(np.uint32) if x.flags.c_contiguous else np.ascontiguousarray(x).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the
    # dropped half is above one half, or equal to it with an odd kept half (ties to even).
    r = b + (((b >> 16) & np.uint32(1)) + np.uint32(0x7FFF))
    r &= np.uint32(0xFFFF0000)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = (b[nan] & np.uint32(0xFFFF0000)) | np.uint32(0x00400000)
    return r.view(np.float32)


def to_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 as uint16 bits."""
    return (round(x).view(np.uint32) >> 16).astype(np.uint16)


def from_bits(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly (bf16 is the top half of a float32)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bf16 bits must be uint16, got {bits.dtype}")
    out = np.zeros(bits.shape + (2,), dtype=np.uint16)
    # Copying into the high halves of a zeroed buffer is ~3x faster than a uint32 shift.
    out[..., 1 if np.little_endian else 0] = bits
    return out.view(np.float32).reshape(bits.shape)
