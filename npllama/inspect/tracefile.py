"""Activation traces: every intermediate of a forward pass under stable names (the observer,
npllama.model.observer), saved as an .npz of arrays and JSON metadata and loaded back through
the hardened zip reader."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from ..errors import CheckpointError, UsageError
from ..io.atomic import write_file
from ..model.observer import QK_LAYOUTS, Recorder, forward_key
from ..untrusted import (MAX_JSON_BYTES, ZipReader, describe, file_size, inside, npy_header, npy_member, numel,
                         open_regular, parse_json, read_json)
from ..version import __version__

SCORES_BUDGET = 2 << 30  # bytes of (n_heads, T, T) scores and probs a trace keeps unless told otherwise
# __meta__ "params" fields the comparer computes with: counts (positive ints) and reals (finite, > 0)
PARAM_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
              "original_max_position_embeddings")
PARAM_REALS = ("rope_theta", "norm_eps", "rope_scaling_factor", "low_freq_factor", "high_freq_factor")
SCALED_ROPE = ("rope_scaling_factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_meta(meta: dict, where: str) -> None:
    """A trace's __meta__ fields of the types the comparer reads: "names" a string,
    "omits" a list of strings, "params" an object of positive counts and reals (a
    one-line error naming the field otherwise, not a traceback deep in the comparison)."""
    names, omits = meta.get("names"), meta.get("omits", [])
    if names is not None and not isinstance(names, str):
        raise CheckpointError(f"{where}: \"names\" is not a string (a name map's name)")
    if not isinstance(omits, list) or not all(isinstance(o, str) for o in omits):
        raise CheckpointError(f"{where}: \"omits\" is not a list of tensor kinds (e.g. [\"scores\"])")
    params = meta.get("params")
    if params is None:
        return
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: \"params\" is not an object")
    for key in PARAM_INTS + PARAM_REALS:
        v, count = params.get(key), key in PARAM_INTS
        if v is None:       # a default (n_kv_heads None: n_heads)
            continue
        if isinstance(v, bool) or not isinstance(v, int if count else (int, float)) or not math.isfinite(v) or v <= 0:
            raise CheckpointError(f"{where}: params {key} is {describe(v)}, not a positive "
                                  f"{'integer' if count else 'number'}")
    if params.get("use_scaled_rope") and any(k not in params for k in SCALED_ROPE):
        raise CheckpointError(f"{where}: params use_scaled_rope without {', '.join(SCALED_ROPE)}")


def schedule(T: int, chunks: Sequence[int] | None) -> list[tuple[int, int]]:
    """(start_pos, length) of each forward call that runs T tokens as `chunks`: the lengths
    in order (a prompt's prefill chunks), then one token a call (decode steps) once they run
    out; a chunk longer than what is left is cut. None: one call of all T."""
    if chunks is None:
        return [(0, T)]
    given, chunks = chunks, list(chunks) if isinstance(chunks, (list, tuple, range, np.ndarray)) else []
    if not chunks or any(not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)) or n < 1
                         for n in chunks):
        raise UsageError(f"chunks must be a sequence of positive integers, e.g. (3, 1, 1); got {given!r:.80}")
    steps, start = [], 0
    for n in chunks + [1] * T:
        if start >= T:
            break
        steps.append((start, min(int(n), T - start)))
        start += steps[-1][1]
    return steps


def stitch(steps: list[tuple[int, dict]], T: int) -> dict:
    """The per-call traces of a chunked run as one trace at absolute positions 0..T-1:
    (T, ...) tensors joined along positions; each call's (n_heads, t, start + t) scores
    and probs placed at its rows, with the keys it could not see masked (-inf, 0), as one
    pass over all T tokens would have them. A correct implementation's stitched trace is
    its one-pass trace, so either compares against the other."""
    out = {}
    for name in steps[0][1]:
        parts = [step[name] for _, step in steps if name in step]
        if len(parts) != len(steps):
            raise UsageError(f"{name}: recorded in {len(parts)} of the {len(steps)} steps")
        if name.rsplit(".", 1)[-1] in ("scores", "probs"):
            bad = next(((s, x.shape) for (s, _), x in zip(steps, parts) if x.ndim != 3 or x.shape[2] > T), None)
            if bad is not None:
                raise UsageError(f"{name}: shape {bad[1]} in the call at start_pos {bad[0]} is not (n_heads, "
                                 f"tokens, keys) with at most the {T} keys of the whole run")
            full = np.full((parts[0].shape[0], T, T), -np.inf if name.endswith("scores") else 0, np.float32)
            for (start, _), x in zip(steps, parts):
                full[:, start:start + x.shape[1], :x.shape[2]] = x
            out[name] = full
        else:
            out[name] = np.concatenate(parts, axis=0)
    return out


def trace(model, tokens: Sequence[int], layers: Iterable[int] | None = None, scores: bool = True,
          scores_budget: int = SCORES_BUDGET, chunks: Sequence[int] | None = None) -> dict:
    """Run `tokens` (T,) from position 0 and return {name: array} plus "__meta__"
    (params, dtype, npllama version, layout). layers: only these layers' tensors.
    scores=False leaves out the (n_heads, T, T) scores and probs; kept, they may take at
    most scores_budget bytes (a UsageError says how much they would need). chunks: run the
    prompt through the KV cache as these calls (schedule), e.g. (3, 1, 1): prefill 3
    tokens, then decode steps; every call's intermediates are recorded and stitched at
    their absolute positions (stitch). Default: one forward pass."""
    T = len(tokens)
    if scores:
        check_scores_budget(model.args, T, layers, scores_budget)
    tokens, steps = np.asarray(tokens), []
    for start, n in schedule(T, chunks):
        step: dict = {}
        with np.errstate(all="ignore"):   # non-finite values are kept, and reported by whoever checks them
            model.forward(tokens[start:start + n], start_pos=start, trace=Recorder(step, layers, squeeze=True,
                                                                                   scores=scores))
        steps.append((start, step))
    out = stitch(steps, T)
    out["__meta__"] = {"params": model.args.to_dict(), "dtype": model.dtype, "npllama": __version__,
                       "qk_layout": "interleaved", "source": "npllama",
                       "chunks": None if chunks is None else [n for _, n in schedule(T, chunks)]}
    return out


def check_scores_budget(args, T: int, layers, scores_budget: int) -> None:
    n = args.n_layers if layers is None else len({i for i in layers if 0 <= i < args.n_layers})
    size = 2 * n * args.n_heads * T * T * 4
    if size > scores_budget:
        raise UsageError(f"trace: the scores and probs of {n} layer(s) ({args.n_heads} heads x {T:,} x "
                         f"{T:,} float32, twice) need {size / 2**30:.2f} GiB, over the {scores_budget / 2**30:.2f}"
                         f" GiB limit: trace fewer layers (--layers) or leave them out (--no-scores)")


def save(path: str, tr: dict) -> None:
    """An .npz of the arrays, with the metadata as a JSON string member (no pickles),
    written atomically."""
    arrays = {k: v for k, v in tr.items() if k != "__meta__"}
    arrays["__meta__"] = np.array(json.dumps(tr.get("__meta__", {})))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_file(path, write, "trace")


def load(path: str) -> dict:
    """A trace: a golden bundle's directory (load_bundle) or a trace file (load_npz)."""
    return load_bundle(path) if os.path.isdir(path) else load_npz(path)


def load_bundle(path: str) -> dict:
    """A golden bundle (npllama golden) as a trace: golden.json's metadata and the .npy
    files it lists, each a trace name, memory-mapped after its header is checked."""
    meta = read_json(inside(path, "golden.json"))
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{path}: golden.json is not a golden bundle's (no \"files\" object)")
    tr = {}
    for member in meta["files"]:
        name = member[:-4] if isinstance(member, str) and member.endswith(".npy") else None
        if name is None or forward_key(name) is None:
            raise CheckpointError(f"{path}: golden.json lists {describe(member)}, not a trace name's .npy")
        file = inside(path, member)
        with open_regular(file) as f:
            dtype, shape, start = npy_header(f, 0, file_size(f), file)
        if dtype.kind not in "biuf":
            raise CheckpointError(f"{file}: not a numeric array ({dtype})")
        tr[name] = np.memmap(file, dtype, "r", offset=start, shape=shape) if numel(shape) else np.zeros(shape, dtype)
    check_bundle(path, tr, meta)
    tr["__meta__"] = {k: v for k, v in meta.items() if k != "files"}
    check_meta(tr["__meta__"], f"{path}: golden.json")
    tr["__meta__"].setdefault("qk_layout", "interleaved")
    return tr


def check_bundle(path: str, tr: dict, meta: dict) -> None:
    """What npllama golden writes for one trace is all there: tokens and logits at least (an
    edited golden.json listing fewer compares less), and tokens.npy the tokens golden.json
    names (a bundle whose files were swapped for another prompt's)."""
    lacking = [f"{n}.npy" for n in ("tokens", "logits") if n not in tr]
    if lacking:
        raise CheckpointError(f"{path}: golden.json does not list {' or '.join(lacking)} (not a whole golden bundle)")
    listed = meta.get("tokens")
    if not isinstance(listed, list) or tr["tokens"].shape != (len(listed),) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in listed) or \
            not np.array_equal(np.asarray(tr["tokens"]), np.array(listed, dtype=object).astype(np.int64)):
        raise CheckpointError(f"{path}: tokens.npy is not the token list golden.json's \"tokens\" gives")


def load_npz(path: str) -> dict:
    """A trace file: an uncompressed .npz (np.savez, as save writes) of numeric arrays and a
    JSON `__meta__`. Arrays are memory-mapped: a header cannot make it allocate more than
    the file holds, and no pickle is ever read."""
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
    check_meta(tr["__meta__"], f"{path}: __meta__")
    if tr["__meta__"].get("qk_layout", "interleaved") not in QK_LAYOUTS:
        raise CheckpointError(f"{path}: unknown qk_layout {tr['__meta__']['qk_layout']!r:.40} "
                              f"({' or '.join(QK_LAYOUTS)})")
    return tr
