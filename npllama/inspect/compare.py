"""The comparer: two traces (npllama's, HF's, Meta's, a port's) in one layout, and the first
operation in forward order where they diverge, with a report of each tensor's error."""
from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..model import bf16
from ..model.observer import QK_LAYOUTS, QK_NAMES, forward_key, forward_order

def rotate_half_to_interleaved(x: np.ndarray) -> np.ndarray:
    # (..., head_dim) with all real parts then all imaginary parts (HF's permuted q/k)
    # -> Meta's consecutive (real, imaginary) pairs.
    hd = x.shape[-1]
    return x.reshape(*x.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(x.shape)


def to_canonical(tr: dict) -> dict:
    """Apply the layout conversions the format allows (README, Trace format)."""
    meta = tr.get("__meta__", {})
    layout = meta.get("qk_layout", "interleaved")
    if layout not in QK_LAYOUTS:
        raise UsageError(f"unknown qk_layout {layout!r} (interleaved or rotate_half)")
    out = dict(tr)
    if layout == "rotate_half":
        for name, v in tr.items():
            if name.rsplit(".", 1)[-1] in QK_NAMES and name.startswith("layers."):
                if v.ndim == 0 or v.shape[-1] % 2:
                    raise UsageError(f"{name}: shape {v.shape} has no even head dimension to convert from rotate_half")
                out[name] = rotate_half_to_interleaved(v)
    return out


def bf16_ulp_at(scale: float) -> float:
    """One bf16 ulp at magnitude `scale` (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(scale)) - 7) if scale > 0 else 2.0 ** -133


def compare_arrays(a: np.ndarray, b: np.ndarray) -> dict:
    """max |a - b|, that relative to max |b|, and in bf16 ulps at that scale. Entries that
    are equal (masked -inf scores) count as no error."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    with np.errstate(invalid="ignore"):  # -inf - -inf where both are masked: counted as same
        diff = np.where(same, 0.0, np.abs(a64 - b64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite_b = np.abs(b64[np.isfinite(b64)])
    scale = float(finite_b.max()) if finite_b.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf),
            "ulps": max_abs / bf16_ulp_at(scale), "scale": scale, "ulp_dist": bf16_ulp_distance(a, b)}


def bf16_ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest elementwise distance between the bf16 values of a and b, in steps of the bf16
    number line (0: bit-identical as bf16; large near zero for values that diverged)."""
    ordered = []
    for x in (a, b):
        bits = bf16.to_bits(np.where(np.isfinite(x), x, 0).astype(np.float32)).astype(np.int64)
        ordered.append(np.where(bits & 0x8000, 0x8000 - bits, bits))  # sign-magnitude -> ordered integers
    return int(np.abs(ordered[0] - ordered[1]).max()) if a.size else 0


def compare(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6, ulps: float | None = None,
            out=None) -> tuple[bool, str | None, list[tuple]]:
    """Walk the shared names in forward order. A tensor passes when max |a - b| <= atol +
    rtol * max |b| (or, with ulps, <= ulps bf16 ulps at max |b|: ulps=0 asks for identical
    values). Returns (all passed, first failing name, rows) and prints a table to `out`."""
    a, b = to_canonical(a), to_canonical(b)
    rows, first = [], None
    for name in sorted((n for n in a if n in b and forward_key(n) is not None), key=forward_key):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            rows.append((name, None, f"shape {x.shape} vs {y.shape}", False))
            first = first or name
            continue
        if name == "tokens":
            ok = np.array_equal(x, y)
            rows.append((name, None, "identical" if ok else "DIFFERENT tokens", ok))
            first = first or (None if ok else name)
            continue
        s = compare_arrays(x, y)
        ok = s["ulps"] <= ulps if ulps is not None else s["max_abs"] <= atol + rtol * s["scale"]
        rows.append((name, s, None, ok))
        if not ok and first is None:
            first = name
    if out is not None:
        print(f"{'tensor':<28} {'max abs':>11} {'max rel':>11} {'bf16 ulps':>10} {'ulp dist':>9}", file=out)
        for name, s, msg, ok in rows:
            mark = "  <-- first outside tolerance" if name == first else ("  x" if not ok else "")
            if s is None:
                print(f"{name:<28} {msg}{mark}", file=out)
            else:
                print(f"{name:<28} {s['max_abs']:11.3e} {s['max_rel']:11.3e} {s['ulps']:10.2f} {s['ulp_dist']:9d}"
                      f"{mark}", file=out)
        shared = len(rows)
        print(f"{shared} shared tensors; " + ("all within tolerance" if first is None else f"first outside "
              f"tolerance: {first}"), file=out)
    if not rows:
        raise UsageError("the traces share no tensor names")
    return first is None, first, rows
