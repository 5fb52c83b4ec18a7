"""The weight store: everything about holding a model's weights, behind one seam.

The model asks for `weights.linear(x, name)`, `weights.fused(x, names)`, `weights.rows(name,
index)` and `weights.weight(name)`; how the tensors are held is decided here: their names,
shapes and dtypes checked against the params, bf16 bit patterns widened exactly, weights that
read the same input fused into one matmul, resident float32 copies in Meta's layout, or the
weights left where they are (bf16 widened a tile at a time, npllama/tiled.py; float32 read in
place). The numerics do not depend on the choice, only the float32 summation order inside the
matmuls does.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import bf16, ggml, tiled
from .memory import available_memory
from .quant import QuantTensor
from .config import ModelArgs
from ..errors import UsageError, WeightError
from .ops import identity, matmul

WEIGHT_MODES = ("auto", "resident", "tiled", "quantized")
WEIGHT_DTYPES = ("float32", "float16", "float64", "uint16", "bfloat16")
# Present in some of Meta's older checkpoints and recomputed here, so safe to ignore.
IGNORED_WEIGHTS = ("rope.freqs",)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta's tensor names and shapes for `args` (output.weight is optional: tied head)."""
    hd, kv = args.head_dim, args.n_kv_heads
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, args.dim),
            p + "attention.wk.weight": (kv * hd, args.dim),
            p + "attention.wv.weight": (kv * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.ffn_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.ffn_dim),
            p + "feed_forward.w3.weight": (args.ffn_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def check_dtype(name: str, w: np.ndarray) -> None:
    if isinstance(w, QuantTensor):
        return   # its type and size were checked when it was made
    if w.dtype.name not in WEIGHT_DTYPES:
        raise WeightError(f"{name}: unsupported dtype {w.dtype} (expected float32, float16, float64 or bf16 as uint16)")


def held_names(args: ModelArgs, layers: range, tied: bool) -> list[str]:
    """The tensors a model holding `layers` uses, in forward order: the embeddings if it holds
    the first layer, its layers', and the final norm and output head (the embeddings, when
    tied) if it holds the last. A pipeline stage maps these and no others."""
    names = ["tok_embeddings.weight"] if layers.start == 0 else []
    names += [n for n in expected_shapes(args) if n.startswith("layers.") and int(n.split(".")[1]) in layers]
    if layers.stop == args.n_layers:
        names += ["norm.weight", "tok_embeddings.weight" if tied else "output.weight"]
    return list(dict.fromkeys(names))   # a tied model held whole names its embeddings once


def check_shapes(args: ModelArgs, shapes: Mapping[str, tuple], where: str = "", layers: range | None = None,
                 error: type = WeightError) -> list[str]:
    """Tensor names and shapes against the params, before any data is read (a file's reader
    calls it with its tensor list, the model with its arrays): no name is one the params do
    not have (tensors of other layers are allowed: a pipeline stage holds some), and every
    tensor a model holding `layers` (default all) uses is there with the shape the params
    imply; output.weight may be absent (a tied head). -> the held names, in forward order.
    `where` (a file) starts the error message."""
    expected, at = expected_shapes(args), f"{where}: " if where else ""
    unknown = sorted(set(shapes) - set(expected) - set(IGNORED_WEIGHTS))
    if unknown:
        raise error(f"{at}unexpected tensors for these params: {', '.join(n[:80] for n in unknown[:5])}"
                    + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    ignored = tuple(shapes.get("rope.freqs", (args.head_dim // 2,)))
    if ignored != (args.head_dim // 2,):     # ignored, but not of any size: Meta's is (head_dim / 2,)
        raise error(f"{at}rope.freqs: shape {ignored}, the params say {(args.head_dim // 2,)}")
    held = held_names(args, range(args.n_layers) if layers is None else layers, "output.weight" not in shapes)
    missing = [n for n in held if n not in shapes]
    if missing:
        raise error(f"{at}missing tensor {missing[0]} (expected shape {expected[missing[0]]})"
                    + (f" (+{len(missing) - 1} more)" if missing[1:] else ""))
    for name in held:
        if tuple(shapes[name]) != expected[name]:
            raise error(f"{at}{name}: shape {tuple(shapes[name])}, the params say {expected[name]}")
    return held


def check(args: ModelArgs, tensors: Mapping[str, np.ndarray], layers: range | None = None) -> dict[str, np.ndarray]:
    """The tensors a model holding `layers` (default all) uses, by Meta's names, after
    checking names, shapes (check_shapes) and dtypes only: no weight data is read, so a
    memory-mapped checkpoint stays on disk until a forward pass touches it."""
    held = check_shapes(args, {n: tuple(w.shape) for n, w in tensors.items()}, layers=layers)
    for name in held:
        check_dtype(name, tensors[name])
    return {name: tensors[name] for name in held}


def as_float32(name: str, w) -> np.ndarray:
    """A weight as float32. uint16 (and ml_dtypes' bfloat16) arrays are bf16 bit patterns,
    widened exactly; float16/float64 are converted; float32 (memory maps too) is kept."""
    if isinstance(w, QuantTensor):
        return w.widen()
    w = np.asarray(w)
    check_dtype(name, w)
    if w.dtype == np.uint16 or w.dtype.name == "bfloat16":
        return bf16.from_bits(w.view(np.uint16))
    return w.astype(np.float32, copy=False)


def fits_resident(resident_bytes: int, share: int = 1) -> bool:
    """Whether float32 copies of this many bytes fit comfortably (60%) in the memory this
    model gets: 1/share of what is available (pipeline stages sharing a machine)."""
    return resident_bytes <= 0.6 * available_memory() / share


def choose_mode(tensors: Mapping[str, np.ndarray], requested: str, share: int = 1) -> str:
    """"resident": float32 copies made on first use (fastest, 4 bytes a weight in memory).
    "tiled": weights stay as stored, where they are (a memory map: the page cache streams
    them from disk when they do not fit in memory): bf16 widened a tile at a time, float32
    read in place by the matmuls; no copy of a weight is kept.
    "quantized": a GGUF's blocks (QuantTensors) stay as they are, mapped, and are widened a
    tile at a time as bf16 is; for float weights it is "tiled".
    "auto": tiled (quantized, for quantized tensors) only when the float32 copies would not
    fit comfortably in memory, of which this model gets 1/share (pipeline stages sharing a
    machine)."""
    if requested not in WEIGHT_MODES:
        raise UsageError(f"weights mode must be one of {WEIGHT_MODES}, got {requested!r}")
    if requested != "auto":
        return requested
    if fits_resident(sum(int(np.prod(w.shape)) * 4 for w in tensors.values()), share):
        return "resident"
    return "quantized" if any(isinstance(w, QuantTensor) for w in tensors.values()) else "tiled"


class Weights(Mapping):
    """Meta's tensor names -> the tensors as given (memory maps stay maps), checked against
    `args`; the operations the model needs, in the numerics of `rnd` (identity for float32,
    bf16.round for bfloat16: bf16 numerics hold bf16 weights and store bf16 outputs, as a
    torch model in bf16 would). mode: see choose_mode. layers: the layers held (a pipeline
    stage's; default all), see held_names."""

    def __init__(self, args: ModelArgs, tensors: Mapping[str, np.ndarray], rnd=identity, mode: str = "auto",
                 layers: range | None = None, llama_cpp: bool = False):
        self.tensors = check(args, tensors, layers)
        self.rnd, self.ggml = rnd, llama_cpp
        self.mode = choose_mode(self.tensors, mode)
        # What was made from the tensors, kept: compute forms by name, fused copies by
        # tuple of names.
        self._ready: dict = {}

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors as given (a quantized model's blocks: what tiling maps)."""
        return sum(w.nbytes for w in self.tensors.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def _compute_form(self, name: str) -> np.ndarray:
        return self.rnd(as_float32(name, self.tensors[name]))

    def weight(self, name: str) -> np.ndarray:
        """A weight in compute form (float32; bf16-rounded in bf16 numerics), made on first
        use and kept."""
        w = self._ready.get(name)
        if w is None:
            w = self._ready[name] = self._compute_form(name)
        return w

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """weight(name)[index], gathering the rows first: an untied model never needs the
        whole embedding table in float32."""
        if name in self._ready:
            return self._ready[name][index]
        return self.rnd(as_float32(name, self.tensors[name][index]))

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x (..., in) @ w.T -> (..., out), rounded as a torch Linear's output would be."""
        return self.fused(x, (name,))[0]

    def fused(self, x: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """linear(x, name) for weights that read the same input (wq/wk/wv, w1/w3), computed as
        one matmul; each result (..., out_i) rounded as its own torch op would be. Under
        llama.cpp numerics the activations are first what ggml makes of them for each
        weight's type (npllama.model.ggml)."""
        x2 = x.reshape(-1, x.shape[-1])
        raw = [self.tensors[n] for n in names]
        if self.ggml:
            y = ggml.matmul(x2, raw, lambda xt, i, j: self._matmul(xt, names[i:j]))
        else:
            y = self._matmul(x2, names)
        out, col = [], 0
        for w in raw:
            out.append(self.rnd(y[:, col:col + w.shape[0]].reshape(*x.shape[:-1], w.shape[0])))
            col += w.shape[0]
        return out

    def _matmul(self, x2: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
        # x2 (M, K) @ the weights' float values, joined, .T -> (M, sum N_i)
        raw = [self.tensors[n] for n in names]
        if self.mode in ("tiled", "quantized") and all(tiled.supported(w) for w in raw):
            return tiled.matmul(x2, raw)
        if self.mode in ("tiled", "quantized"):
            # Each weight where it is: a float32 memory map goes to the matmul as it is (w.T is
            # a view), so nothing model-sized is copied; joining them would copy them.
            return np.concatenate([matmul(x2, self._compute_form(n)) for n in names], axis=1)
        return matmul(x2, self._joined(names))

    def _joined(self, names: tuple[str, ...]) -> np.ndarray:
        # Kept as Meta stores them, (out, in), the weights of a fused matmul one below the other:
        # x @ w.T is then OpenBLAS's dot-product GEMV, each output a dot product along a
        # contiguous row, which streams the weights 5-25% faster than x @ w on a transposed
        # copy did on the development machine, while the prefill GEMMs run within a few
        # percent in either layout (tools/bench_limits.py layout; README, Performance).
        # A lone weight is kept under its name, so a tied head's embedding rows are gathered
        # from the same copy.
        key = names[0] if len(names) == 1 else names
        w = self._ready.get(key)
        if w is None:
            raw = [self.tensors[n] for n in names]
            w = np.empty((sum(r.shape[0] for r in raw), raw[0].shape[1]), np.float32)
            row = 0
            for n, r in zip(names, raw):
                w[row:row + r.shape[0]] = self._compute_form(n)
                row += r.shape[0]
            self._ready[key] = w
        return w
