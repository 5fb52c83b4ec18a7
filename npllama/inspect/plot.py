"""Pictures of traces: attention heatmaps (`npllama plot`) and a comparison's error along the
layers (`npllama compare --plot`). matplotlib is an optional extra, imported only when drawing."""
from __future__ import annotations

import math
import os
import re

import numpy as np

from ..errors import MissingDependencyError, UsageError
from ..io.atomic import write_file


def new_figure(**kwargs):
    """A matplotlib Figure, not tied to pyplot's global state or to any display."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: pip install 'npllama[plot]'") from None
    return Figure(**kwargs)


def save(fig, path: str) -> None:
    """The image appears under `path` complete or not at all; its format is the extension's."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise UsageError(f"{path}: cannot write .{fmt} images (one of: {', '.join(sorted(supported))})")
    write_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"), "image")


def token_labels(trace: dict) -> list[str]:
    """The tokens as text when the trace recorded their pieces (`npllama trace` does), else ids."""
    ids = [int(t) for t in np.asarray(trace["tokens"]).reshape(-1)]
    pieces = trace.get("__meta__", {}).get("pieces")
    if isinstance(pieces, list) and len(pieces) == len(ids):
        return [repr(p)[1:-1] for p in pieces]      # escapes newlines and tabs, drops the quotes
    return [str(t) for t in ids]


def attention(trace: dict, layer: int, path: str, head: int | None = None, what: str = "probs",
              source: str = "trace") -> None:
    """Heatmaps of layer `layer`'s attention `what` ("probs" or "scores", (n_heads, T, T)),
    one head or all of them in a grid; queries down, keys across, token text on the axes."""
    if what not in ("probs", "scores"):
        raise UsageError(f"--what must be probs or scores, got {what!r}")
    name = f"layers.{layer}.{what}"
    if name not in trace:
        traced = sorted({int(m.group(1)) for k in trace if (m := re.match(r"layers\.(\d+)\.", k))})
        raise UsageError(f"{source}: no {name} (layers traced: {', '.join(map(str, traced)) or 'none'})")
    x = np.asarray(trace[name], dtype=np.float32)                      # (n_heads, T, T)
    n_tokens = np.asarray(trace.get("tokens", ())).size
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[1] != n_tokens:
        raise UsageError(f"{source}: {name} has shape {x.shape}, not (n_heads, T, T) for its {n_tokens} tokens")
    n_heads, T = x.shape[0], x.shape[1]
    if head is not None and not 0 <= head < n_heads:
        raise UsageError(f"--head {head}: layer {layer} has heads 0..{n_heads - 1}")
    heads = [head] if head is not None else list(range(n_heads))
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    cell = max(3.0, min(0.25 * T, 8.0)) if len(heads) == 1 else 3.0
    fig = new_figure(figsize=(cols * cell + 1.5, rows * cell), layout="constrained")
    labels = token_labels(trace)
    masked = np.where(np.isfinite(x), x, np.nan)                     # scores' -inf mask: left blank
    lo, hi = np.nanmin(masked), np.nanmax(masked)
    image = None
    for k, h in enumerate(heads):
        ax = fig.add_subplot(rows, cols, k + 1)
        image = ax.imshow(masked[h], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        if T <= 48:   # more labels than that would overlap
            size = 7 if len(heads) == 1 else 5
            ax.set_xticks(range(T), labels, rotation=90, fontsize=size)
            ax.set_yticks(range(T), labels, fontsize=size)
        if len(heads) == 1:
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label=what)
    save(fig, path)


def comparison(rows: list[tuple], path: str, title: str = "", rtol: float | None = None) -> None:
    """The rows of tracing.compare as a line per tensor kind along the layers (max |A - B|
    relative to max |B|, log scale); embeddings, final norm and logits as points at the ends."""
    per_kind: dict[str, dict[int, float]] = {}
    ends: dict[str, float] = {}
    first_bad = next((r[0] for r in rows if not r[3]), None)
    for name, stats, _, _ in rows:
        if stats is None:
            continue
        m = re.match(r"layers\.(\d+)\.(.+)", name)
        if m:
            per_kind.setdefault(m.group(2), {})[int(m.group(1))] = stats["max_rel"]
        else:
            ends[name] = stats["max_rel"]
    if not per_kind and not ends:
        raise UsageError("the traces share no numeric tensors to plot")
    n_layers = max((max(v) + 1 for v in per_kind.values()), default=0)
    positive = [e for v in [*per_kind.values(), ends] for e in v.values() if 0 < e < np.inf]
    floor = min(positive) / 10 if positive else 1e-12                 # where identical tensors are drawn
    y = lambda e: min(max(e, floor), 1e30)  # noqa: E731
    fig = new_figure(figsize=(max(7.0, 0.3 * n_layers + 5), 4.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps   # importable: new_figure succeeded
    colors = colormaps["tab20"].colors
    for k, (kind, errs) in enumerate(per_kind.items()):
        layers = sorted(errs)
        ax.plot(layers, [y(errs[i]) for i in layers], marker="o", markersize=3, linewidth=1, label=kind,
                color=colors[k % len(colors)], linestyle="-" if k < len(colors) else "--")
    end_x = {"token_embeddings": -1.5, "norm": n_layers + 0.5, "logits": n_layers + 2}
    for name, e in ends.items():
        if name in end_x:
            ax.scatter([end_x[name]], [y(e)], marker="s", color="black", zorder=3)
    step = max(1, math.ceil(n_layers / 16))
    ticks = [end_x["token_embeddings"], *range(0, n_layers, step), end_x["norm"], end_x["logits"]]
    ax.set_xticks(ticks, ["emb", *map(str, range(0, n_layers, step)), "norm", "logits"])
    if first_bad is not None:
        m = re.match(r"layers\.(\d+)\.(.+)", first_bad)
        x_bad = int(m.group(1)) if m else end_x.get(first_bad)
        e_bad = per_kind[m.group(2)][int(m.group(1))] if m else ends.get(first_bad)
        if x_bad is not None and e_bad is not None:
            ax.scatter([x_bad], [y(e_bad)], marker="x", s=80, color="red", zorder=4,
                       label=f"first outside tolerance: {first_bad}")
    if rtol is not None:
        ax.axhline(rtol, color="gray", linestyle="--", linewidth=1, label=f"rtol {rtol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"max |A - B| / max |B|  (identical: {floor:.0e})")
    ax.set_title(title or "trace comparison", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, path)
