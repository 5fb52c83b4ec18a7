"""The comparer: two traces (npllama's, HF's, Meta's, llama.cpp's, a port's) in one layout, and
the first operation in forward order where they diverge, with a report of each tensor's
error and where it is largest.

Strict by default: a comparison that skipped what it could not match is not a pass. Every
tensor of the reference (B) must be in A, and every name of either trace must be a trace
name (after its name map, npllama.inspect.namemaps); allow_missing / allow_unknown relax
that explicitly, and the report always says how many of the reference's tensors it compared.
Tensors a trace's writer declares it does not compute (`"omits": ["scores"]` in its
__meta__, as HF's eager attention has no separate scores) are listed, not failed.

Conventions that differ without being errors are normalised, each said in the row: a kept
batch axis (1, T, D), heads split ((T, n_heads, head_dim) vs (T, dim)) or head-major
((n_heads, T, head_dim)), a finite mask constant (finfo.min, HF's) instead of -inf."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError, printable
from ..model import bf16
from ..model.observer import QK_LAYOUTS, QK_NAMES, forward_key
from . import locate
from .locate import rotate_half_to_interleaved, to_rotate_half
from .namemaps import HOOK_OMITS, guess, rename
from .tracefile import check_meta

# A score at least this far below 0 is a mask, whatever its constant: exp(-1e4) underflows
# to exactly 0 in float32 (below ~exp(-104)), so -1e4, finfo.min and -inf give the same probs.
MASKED = -1e4
# What an "omits" may excuse: the kinds a forward hook cannot see (namemaps.HOOK_OMITS). Any
# other tensor a trace lacks is missing, whatever its __meta__ says.
OMITTABLE = frozenset(k for kinds in HOOK_OMITS.values() for k in kinds)


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


def error_of(a: np.ndarray, b: np.ndarray, masked: bool = False) -> np.ndarray:
    """|a - b| elementwise in float64. A NaN on either side is an infinite error (never
    agreement), and so is any infinity, except, where masked (scores: the causal mask), the
    same infinity on both sides, which is no error."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: replaced below
        diff = np.abs(a64 - b64)
    bad = ~np.isfinite(a64) | ~np.isfinite(b64)
    same_inf = np.isinf(a64) & (a64 == b64) if masked else False
    return np.where(same_inf, 0.0, np.where(bad, np.inf, diff))


def nonfinite_notes(x: np.ndarray, y: np.ndarray, masked: bool) -> list[str]:
    """What makes a tensor fail whatever the tolerance: NaN, or an infinity the other side
    does not share as a mask."""
    notes = [f"NaN in {side}" for side, v in (("A", x), ("B", y)) if np.isnan(v).any()]
    unshared = np.isinf(x) | np.isinf(y)
    if masked:
        unshared &= ~(np.isinf(x) & (x == y))
    return notes + (["an infinity not shared as a mask"] if unshared.any() else [])


def compare_arrays(a: np.ndarray, b: np.ndarray, masked: bool = False) -> dict:
    """max |a - b|, that relative to max |b|, and in bf16 ulps at that scale; `diff`, the
    elementwise error (error_of; masked: scores)."""
    diff = error_of(a, b, masked)
    finite_b = np.abs(b[np.isfinite(b)].astype(np.float64))
    scale = float(finite_b.max()) if finite_b.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else np.inf),
            "ulps": max_abs / bf16_ulp_at(scale), "scale": scale, "ulp_dist": bf16_ulp_distance(a, b), "diff": diff}


def bf16_ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Largest elementwise distance between the bf16 values of a and b, in steps of the bf16
    number line (0: bit-identical as bf16; large near zero for values that diverged)."""
    ordered = []
    for x in (a, b):
        bits = bf16.to_bits(np.where(np.isfinite(x), x, 0).astype(np.float32)).astype(np.int64)
        ordered.append(np.where(bits & 0x8000, 0x8000 - bits, bits))  # sign-magnitude -> ordered integers
    return int(np.abs(ordered[0] - ordered[1]).max()) if a.size else 0


def normalise(x: np.ndarray, ref: np.ndarray, name: str) -> tuple[np.ndarray, list[str]]:
    """A's tensor in the reference's layout where they differ only by convention, and what
    was changed. Anything else is left for the shape check to report."""
    notes = []
    if x.ndim >= 2 and x.shape[0] == 1 and x.shape != ref.shape and (x.ndim > ref.ndim or ref.shape[0] != 1):
        x, notes = x[0], ["batch axis dropped"]
    if x.shape != ref.shape and x.size == ref.size and ref.ndim in (2, 3) and x.ndim in (2, 3):
        T = ref.shape[0]
        if x.ndim == 3 and x.shape[1] == T and x.shape[0] != T:       # (heads, T, head_dim)
            x, notes = x.transpose(1, 0, 2), notes + ["head-major"]
        if x.shape[0] == T:
            x, notes = x.reshape(ref.shape), notes + ["heads " + ("split" if ref.ndim == 3 else "stacked")]
    if locate.kind(name) == "scores" and x.shape == ref.shape:
        finite_mask = (x <= MASKED) & np.isfinite(x) & np.isneginf(ref)
        if finite_mask.any():
            x, notes = np.where(finite_mask, -np.inf, x), notes + ["finite mask read as -inf"]
    return x, notes


def finite_masks_as_inf(x: np.ndarray, y: np.ndarray, notes: list[str]) -> tuple:
    """Scores with a finite mask (finfo.min, HF's) on either side read as -inf on both: the
    scale is then the unmasked scores' (finfo.min's 3.4e38 would excuse any error) and a
    position masked on one side only is an infinite error."""
    fx, fy = ((v <= MASKED) & np.isfinite(v) for v in (x, y))
    if not (fx.any() or fy.any()):
        return x, y, notes
    return np.where(fx, -np.inf, x), np.where(fy, -np.inf, y), notes + ["finite mask read as -inf"] * (
        "finite mask read as -inf" not in notes)


@dataclass
class Report:
    """What compare found; unpacks as (ok, first, rows) for callers that want only those."""
    ok: bool
    first: str | None
    rows: list = field(default_factory=list)
    expected: int = 0
    missing: list = field(default_factory=list)
    declared: list = field(default_factory=list)
    unknown: dict = field(default_factory=dict)
    extra: int = 0

    def __iter__(self):
        return iter((self.ok, self.first, self.rows))


@dataclass
class Tolerance:
    rtol: float = 1e-4
    atol: float = 1e-6
    ulps: float | None = None

    def __post_init__(self):
        for what, v in (("rtol", self.rtol), ("atol", self.atol), ("ulps", self.ulps)):
            if v is not None and not (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                      and np.isfinite(v) and v >= 0):
                raise UsageError(f"{what} must be a finite number >= 0, got {v!r:.40}")

    def limit(self, scale: float) -> float:
        """The largest error allowed for a tensor whose largest |reference| is scale."""
        return self.ulps * bf16_ulp_at(scale) if self.ulps is not None else self.atol + self.rtol * scale


def shape_info(a: dict, b: dict) -> dict:
    """params for localisation and the RoPE check: the reference's, else A's, else the
    head_dim and n_kv_heads the q/k tensors show."""
    for tr in (b, a):
        params = tr.get("__meta__", {}).get("params")
        if isinstance(params, dict) and {"dim", "n_heads"} <= set(params):
            p = dict(params)
            p["head_dim"] = p["dim"] // p["n_heads"]
            p.setdefault("n_kv_heads", p["n_heads"])
            return p
    q = next((v for k, v in b.items() if k.endswith(".q") and v.ndim == 3), None)
    kk = next((v for k, v in b.items() if k.endswith(".k") and v.ndim == 3), None)
    return {"head_dim": q.shape[2] if q is not None else None, "n_kv_heads": kk.shape[1] if kk is not None else None}


def tensor_row(name: str, x: np.ndarray, y: np.ndarray, tol: Tolerance, info: dict, notes: list[str]) -> tuple:
    """(name, stats or None, message, ok) for one shared tensor (normalised: notes); stats
    carries `where`, `heads` (per-head summary), `notes` and `hints` (diagnoses)."""
    if x.shape != y.shape:
        return name, None, f"shape {x.shape} vs {y.shape}", False
    if name == "tokens":
        ok = np.array_equal(x, y)
        return name, None, "identical" if ok else "DIFFERENT tokens", ok
    masked = locate.kind(name) == "scores"
    if masked:
        x, y, notes = finite_masks_as_inf(x, y, notes)
    s = compare_arrays(x, y, masked)
    limit = tol.limit(s["scale"])
    ok = s["max_abs"] <= limit
    notes = notes + nonfinite_notes(x, y, masked)
    hd = info.get("head_dim")
    diff = s.pop("diff")
    s.update(where=locate.where(diff, name, hd), notes=notes, hints=[], heads=None,
             aligned=x if locate.kind(name) in QK_NAMES else None)
    errors = locate.per_head(diff, name, hd)
    if errors is not None and not ok:
        s["heads"] = locate.head_summary(errors, limit)
        hint = locate.gqa_hint(name, errors, limit, info.get("n_kv_heads"))
        s["hints"] += [hint] if hint else []
    return name, s, None, ok


def layout_hints(rows: list, a: dict, b: dict, tol: Tolerance, info: dict) -> None:
    """A q/k mismatch the other RoPE layout explains: A's q/k match in the other layout (a
    wrong qk_layout tag), or A's rotated q/k are its own q/k under the other RoPE pairing."""
    by_name = {r[0]: r for r in rows}
    for name, s, _, ok in rows:
        k = locate.kind(name)
        if ok or s is None or k not in QK_NAMES or s["aligned"].ndim == 0 or s["aligned"].shape[-1] % 2 \
                or s["aligned"].size == 0:
            continue                  # no even head dimension: no other layout to try
        y, limit = b[name], tol.limit(s["scale"])
        tagged = a.get("__meta__", {}).get("qk_layout", "interleaved")
        other = to_rotate_half(s["aligned"]) if tagged == "rotate_half" else rotate_half_to_interleaved(s["aligned"])
        if error_of(other, y).max() <= limit:
            s["hints"].append(f"explained by the other RoPE layout: A's q/k match as {QK_LAYOUTS[tagged == 'interleaved']}"
                              f", but A's trace says qk_layout {tagged!r}")
        elif k.endswith("_rotated") and name[:-len("_rotated")] in by_name and "rope_theta" in info:
            src, mine = by_name[name[:-len("_rotated")]][1], s["aligned"]
            if src is not None:
                hint = locate.rope_hint(src["aligned"], info, lambda z: error_of(z, mine).max() <= limit)
                s["hints"] += [hint] if hint else []


def coverage(a: dict, b: dict) -> tuple[list, list, int]:
    """(the reference's tensors A lacks, those A declares it does not compute, how many A
    has that the reference lacks)."""
    omits = set(a.get("__meta__", {}).get("omits", [])) & OMITTABLE
    expected = [n for n in b if n != "__meta__" and forward_key(n) is not None]
    absent = sorted((n for n in expected if n not in a), key=forward_key)
    declared = [n for n in absent if locate.kind(n) in omits]
    extra = sum(1 for n in a if n != "__meta__" and forward_key(n) is not None and n not in b)
    return [n for n in absent if n not in declared], declared, extra


def compare(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6, ulps: float | None = None, out=None,
            names_a: str | None = None, names_b: str | None = None, allow_missing: bool = False,
            allow_unknown: bool = False) -> Report:
    """Walk the shared names in forward order. A tensor passes when max |a - b| <= atol +
    rtol * max |b| (or, with ulps, <= ulps bf16 ulps at max |b|: ulps=0 asks for identical
    values). names_a/names_b: the name map of each trace (default its __meta__ "names",
    else npllama's). Returns a Report (ok, first failing name, rows, coverage) and prints a
    table to `out`."""
    tol = Tolerance(rtol, atol, ulps)
    for side, tr in (("A", a), ("B", b)):
        check_meta(tr.get("__meta__", {}), f"{side}'s __meta__")
    a, a_unknown, _ = rename(a, names_a or a.get("__meta__", {}).get("names"))
    b, b_unknown, _ = rename(b, names_b or b.get("__meta__", {}).get("names"))
    shared = sorted((n for n in a if n in b and forward_key(n) is not None), key=forward_key)
    notes = {}
    for n in shared:        # shapes first: the layout conversion works on split heads
        a[n], notes[n] = normalise(a[n], b[n], n)
    a, b = to_canonical(a), to_canonical(b)
    info = shape_info(a, b)
    rows = [tensor_row(n, a[n], b[n], tol, info, notes[n]) for n in shared]
    layout_hints(rows, a, b, tol, info)
    first = next((r[0] for r in rows if not r[3]), None)
    missing, declared, extra = coverage(a, b)
    unknown = {k: v for k, v in (("A", a_unknown), ("B", b_unknown)) if v}
    ok = first is None and (allow_missing or not missing) and (allow_unknown or not unknown)
    report = Report(ok, first, rows, len(shared) + len(missing) + len(declared), missing, declared, unknown, extra)
    if not rows:
        raise UsageError("the traces share no tensor names" + (f" ({unknown_message(unknown)})" if unknown else ""))
    if not compared_values(rows, a, b):
        raise UsageError(f"compared nothing: the traces share {shown([r[0] for r in rows[:3]])} but no "
                         "float value (only tokens, or empty arrays)")
    if out is not None:
        print_report(report, out, allow_missing, allow_unknown)
    return report


def compared_values(rows: list, a: dict, b: dict) -> bool:
    """Whether a comparison compared any float value (or failed a tensor on its shape): a
    pass over tokens or empty arrays alone says nothing of an implementation."""
    return any(r[0] != "tokens" and (a[r[0]].shape != b[r[0]].shape or b[r[0]].size) for r in rows)


def unknown_message(unknown: dict) -> str:
    parts = []
    for side, names in unknown.items():
        g = guess(names)
        hint = f"they look like the {g!r} name map's: give names_{side.lower()}={g!r} (--names-{side.lower()} {g})" \
            if g else "not in any name map"
        parts.append(f"{len(names)} name(s) of {side} are not trace names, e.g. {shown(names[:3])}; {hint}")
    return "; ".join(parts)


def shown(names: list[str]) -> str:
    """Names from a file, made printable and short."""
    return ", ".join(repr(n)[1:-1][:60] for n in names)


def print_row(r: tuple, first: str | None, out) -> None:
    """One tensor's line; for a failing tensor of the first failing layer (later ones
    inherit its error) its per-head summary and diagnoses below it."""
    name, s, msg, ok = r
    mark = "  <-- first outside tolerance" if name == first else ("  x" if not ok else "")
    if s is None:
        print(printable(f"{name:<28} {msg}{mark}"), file=out)
        return
    notes = f" ({'; '.join(s['notes'])})" if s["notes"] else ""
    print(f"{printable(name):<28} {s['max_abs']:11.3e} {s['max_rel']:11.3e} {s['ulps']:10.2f} {s['ulp_dist']:9d}  "
          f"{locate.describe_where(s['where']) if s['max_abs'] > 0 else '-'}{notes}{mark}", file=out)
    if first is not None and locate.layer_of(name) == locate.layer_of(first):
        for extra in ([s["heads"]] if s["heads"] else []) + s["hints"]:
            print(f"    {extra}", file=out)


def print_report(rep: Report, out, allow_missing: bool, allow_unknown: bool) -> None:
    print(f"{'tensor':<28} {'max abs':>11} {'max rel':>11} {'bf16 ulps':>10} {'ulp dist':>9}  largest error at",
          file=out)
    for r in rep.rows:
        print_row(r, rep.first, out)
    lines = [f"compared {len(rep.rows)} of the reference's {rep.expected} tensors"
             + (f" (A has {rep.extra} more the reference lacks)" if rep.extra else "") + "; "
             + ("all within tolerance" if rep.first is None else f"first outside tolerance: {rep.first}")]
    if rep.declared:
        lines.append(f"not computed by A (declared in its __meta__ omits): {len(rep.declared)}, e.g. "
                     f"{shown(rep.declared[:3])}")
    if rep.missing:
        lines.append(f"{'allowed' if allow_missing else 'FAIL'}: {len(rep.missing)} of the reference's tensors are "
                     f"missing from A: {shown(rep.missing[:5])}{' ...' if len(rep.missing) > 5 else ''}"
                     + ("" if allow_missing else " (allow_missing / --allow-missing compares only the shared ones)"))
    if rep.unknown:
        lines.append(f"{'allowed' if allow_unknown else 'FAIL'}: {unknown_message(rep.unknown)}"
                     + ("" if allow_unknown else " (or allow_unknown / --allow-unknown)"))
    for line in lines:
        print(printable(line), file=out)   # tensor names from the traces' files
