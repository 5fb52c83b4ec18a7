"""Activation traces: every intermediate of a forward pass under stable names (the observer,
npllama.model.observer), saved as an .npz of arrays and JSON metadata and loaded back through
the hardened zip reader."""
from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np

from ..errors import UsageError
from ..version import __version__
from ..model.observer import QK_LAYOUTS, Recorder

SCORES_BUDGET = 2 << 30  # bytes of (n_heads, T, T) scores and probs a trace keeps unless told otherwise


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
    from ..io.atomic import write_file
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
    from ..errors import CheckpointError
    from ..untrusted import MAX_JSON_BYTES, ZipReader, describe, npy_member, numel, parse_json
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
