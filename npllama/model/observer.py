"""The observer a forward pass reports to (Recorder, or IGNORE for none), and the stable
names it records every intermediate under (the README's "Trace format" section). The model
core needs this part of tracing only: saving, loading and comparing traces are npllama.inspect's."""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

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
