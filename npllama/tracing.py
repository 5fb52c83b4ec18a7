"""Activation traces: every intermediate of a forward pass under stable names, saved as
.npz, and a comparer that finds the first operation where two implementations diverge.
The names, shapes and layouts are documented in the README's "Trace format" section."""
from __future__ import annotations

import json
import re
from typing import Iterable, Sequence

import numpy as np

from .errors import UsageError
from .version import __version__

LAYER_NAMES = ("attention_norm", "q", "k", "v", "q_rotated", "k_rotated", "scores", "probs", "attention",
               "attention_out", "h", "ffn_norm", "w1", "w3", "ffn_out", "out")
QK_NAMES = ("q", "k", "q_rotated", "k_rotated")
QK_LAYOUTS = ("interleaved", "rotate_half")


def forward_order(n_layers: int) -> list[str]:
    """Every trace name, in the order the forward pass computes them."""
    names = ["tokens", "token_embeddings"]
    for i in range(n_layers):
        names += [f"layers.{i}.{n}" for n in LAYER_NAMES]
    return names + ["norm", "logits"]


def forward_key(name: str) -> tuple | None:
    """Where a trace name comes in forward order (None: not a trace name). Sorting by it
    orders any set of names without listing every layer a (hostile) trace might claim."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if m:
        return (2, int(m.group(1)), LAYER_NAMES.index(m.group(2))) if m.group(2) in LAYER_NAMES else None
    fixed = {"tokens": 0, "token_embeddings": 1, "norm": 3, "logits": 4}
    return (fixed[name],) if name in fixed else None


SCORES_BUDGET = 2 << 30  # bytes of (n_heads, T, T) scores and probs a trace keeps unless told otherwise


class Recorder:
    """The observer a forward pass reports to. The blocks call `record(q=xq, k=xk)` and each
    tensor is copied into `out` under its Trace format name (a layer's recorder, from
    `layer(i)`, adds the "layers.{i}." prefix). layers: record only these layers (the others
    get IGNORE, so they keep nothing). squeeze: drop the batch axis (one sequence).
    scores=False: attention gets no sink, so the (n_heads, T, S) scores and probs are
    neither computed nor kept. A recorder holds whole tensors, so a forward pass that
    records runs its tokens as one pass (whole_pass), not in prefill chunks."""
    whole_pass = True

    def __init__(self, out: dict, layers: Iterable[int] | None = None, squeeze: bool = False, prefix: str = "",
                 scores: bool = True):
        self.out, self.squeeze, self.prefix, self.scores = out, squeeze, prefix, scores
        self.layers = None if layers is None else set(layers)

    def __call__(self, **tensors: np.ndarray) -> None:
        for name, x in tensors.items():
            self.out[self.prefix + name] = np.array(x[0] if self.squeeze else x, copy=True)

    def __setitem__(self, name: str, x: np.ndarray) -> None:
        self(**{name: x})

    @property
    def sink(self) -> "Recorder | None":
        """What an ops function's `trace=` argument gets (ops.attention records its scores
        and probs into it); None when they are left out."""
        return self if self.scores else None

    def layer(self, i: int) -> "Recorder | Ignore":
        if self.layers is not None and i not in self.layers:
            return IGNORE
        return Recorder(self.out, self.layers, self.squeeze, f"layers.{i}.", self.scores)


class Ignore:
    """No observer: everything reported is dropped, and ops functions get `trace=None`, so
    they keep no intermediate for it (a forward pass without a trace)."""
    sink = None
    whole_pass = False

    def __call__(self, **tensors: np.ndarray) -> None:
        pass

    def layer(self, i: int) -> "Ignore":
        return self


IGNORE = Ignore()


def recorder(trace: dict | Recorder | None, squeeze: bool) -> Recorder | Ignore:
    """forward's `trace=` argument as the observer its blocks report to: None records
    nothing, a dict receives every intermediate (without the batch axis for one sequence),
    a Recorder is used as it is."""
    if trace is None:
        return IGNORE
    return trace if isinstance(trace, Recorder) else Recorder(trace, squeeze=squeeze)


def trace(model, tokens: Sequence[int], layers: Iterable[int] | None = None, scores: bool = True,
          scores_budget: int = SCORES_BUDGET) -> dict:
    """Run `tokens` (T,) from position 0 and return {name: array} plus "__meta__"
    (params, dtype, npllama version, layout). layers: only these layers' tensors.
    scores=False leaves out the (n_heads, T, T) scores and probs; kept, they may take at
    most scores_budget bytes (a UsageError says how much they would need). The prompt
    runs as one forward pass (not in prefill chunks)."""
    T, n_layers = len(tokens), model.args.n_layers
    if scores:
        n = n_layers if layers is None else len({i for i in layers if 0 <= i < n_layers})
        size = 2 * n * model.args.n_heads * T * T * 4
        if size > scores_budget:
            raise UsageError(f"trace: the scores and probs of {n} layer(s) ({model.args.n_heads} heads x {T:,} x "
                             f"{T:,} float32, twice) need {size / 2**30:.2f} GiB, over the {scores_budget / 2**30:.2f}"
                             f" GiB limit: trace fewer layers (--layers) or leave them out (--no-scores)")
    out: dict = {}
    model.forward(np.asarray(tokens), start_pos=0, trace=Recorder(out, layers, squeeze=True, scores=scores))
    out["__meta__"] = {"params": model.args.to_dict(), "dtype": model.dtype, "npllama": __version__,
                       "qk_layout": "interleaved", "source": "npllama"}
    return out


def save(path: str, tr: dict) -> None:
    """An .npz of the arrays, with the metadata as a JSON string member (no pickles),
    written atomically."""
    from .atomic import write_file
    arrays = {k: v for k, v in tr.items() if k != "__meta__"}
    arrays["__meta__"] = np.array(json.dumps(tr.get("__meta__", {})))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_file(path, write, "trace")


def load(path: str) -> dict:
    """A trace file: an uncompressed .npz (np.savez, as save writes) of numeric arrays and a
    JSON `__meta__`. Arrays are memory-mapped: a header cannot make it allocate more than
    the file holds, and no pickle is ever read."""
    from .errors import CheckpointError
    from .formats.untrusted import MAX_JSON_BYTES, ZipReader, describe, npy_member, numel, parse_json
    tr, meta = {}, None
    with ZipReader(path) as z:
        for member in z.members:
            if not member.endswith(".npy"):
                raise CheckpointError(f"{path}: member {describe(member)} is not an .npy array (not an npllama trace)")
            dtype, shape, start = npy_member(z, member)
            name = member[:-4]
            if name == "__meta__":
                if dtype.kind != "U" or shape != () or dtype.itemsize > MAX_JSON_BYTES:
                    raise CheckpointError(f"{path}: __meta__ is not a JSON string")
                z.file.seek(start)
                meta = str(np.frombuffer(z.file.read(dtype.itemsize), dtype)[0])
            elif dtype.kind not in "biuf":
                raise CheckpointError(f"{path}: {describe(name)} is not a numeric array ({dtype})")
            else:
                tr[name] = np.memmap(path, dtype, "r", offset=start, shape=shape) if numel(shape) else \
                    np.zeros(shape, dtype)
    tr["__meta__"] = {} if meta is None else parse_json(meta.encode("utf-8", "surrogatepass"), f"{path}: __meta__")
    if not isinstance(tr["__meta__"], dict):
        raise CheckpointError(f"{path}: __meta__ is not a JSON object")
    if tr["__meta__"].get("qk_layout", "interleaved") not in QK_LAYOUTS:
        raise CheckpointError(f"{path}: unknown qk_layout {tr['__meta__']['qk_layout']!r:.40} "
                              f"({' or '.join(QK_LAYOUTS)})")
    return tr


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
    from . import bf16
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
