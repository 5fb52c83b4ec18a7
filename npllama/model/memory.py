"""The memory model: what a model's weights, KV cache and forward pass occupy, so that a
context that cannot fit is refused before anything is allocated (a clear error, not the
kernel's OOM killer), and the default context is the longest that fits, up to the context
the model was trained for. `npllama memory` prints it; tests/model/test_long.py holds a real
run's peak RSS to it."""
from __future__ import annotations

import os

from . import ops
from .config import ModelArgs
from ..errors import UsageError

GiB = 1024**3
PREFILL_CHUNK = 1024      # tokens per forward pass when prefilling a longer prompt
RESERVE = 512 << 20       # left free: the interpreter, numpy, BLAS's buffers, the tokenizer
CONTEXT_STEP = 256        # a default context that is cut short is a multiple of this


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), else all RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_type(dtype: str) -> str:
    """What the KV cache holds under these numerics: bf16, f16 (llama.cpp's) or float32."""
    return {"bfloat16": "bf16", "llama.cpp": "f16"}.get(dtype, "float32")


def kv_cache_bytes(args: ModelArgs, ctx: int, batch: int = 1, dtype: str = "float32") -> int:
    """K and V of every layer, position and sequence: held as bf16 in bfloat16 numerics (as
    Meta's model holds them), f16 in llama.cpp numerics (as llama.cpp does), float32 otherwise."""
    return 2 * args.n_layers * batch * ctx * args.n_kv_heads * args.head_dim * (4 if dtype == "float32" else 2)


def context_bytes(args: ModelArgs, ctx: int, batch: int = 1, dtype: str = "float32") -> int:
    """Everything held per position: the KV cache and the RoPE table (complex64)."""
    return kv_cache_bytes(args, ctx, batch, dtype) + ctx * (args.head_dim // 2) * 8


def weight_bytes(args: ModelArgs, weights_mode: str = "resident", stored_bytes: int | None = None) -> int:
    """The weights every token reads, once a forward pass has used them: resident, a float32
    copy of each (the output head included, tied or not); tiled, the bf16 weights themselves,
    mapped from the checkpoint; quantized, the blocks as stored (`stored_bytes`, the mapped
    tensors' size; bf16's size if not given). An untied embedding table is not counted: it stays in the
    checkpoint and only the rows of the tokens seen are read."""
    d, kv, f = args.dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    weights = args.n_layers * per_layer + d + args.vocab_size * d
    if weights_mode == "quantized" and stored_bytes is not None:
        return stored_bytes
    return (4 if weights_mode == "resident" else 2) * weights


def scratch_bytes(args: ModelArgs, ctx: int, chunk: int = PREFILL_CHUNK, batch: int = 1,
                  dtype: str = "float32") -> int:
    """The most one forward pass over `chunk` new tokens allocates for itself, with up to
    `ctx` positions to attend to (an upper bound, from the forward pass's live arrays):
    - the activations: at most ~7 (chunk, ffn_dim) and ~12 (chunk, dim) float32 arrays are
      alive at once (the feed-forward's projections, SiLU's temporaries, bf16 roundings);
    - the last position's logits;
    - attention: float32 holds one FlashAttention tile of scores (ops.FLASH_BLOCK_BYTES,
      twice for its temporaries); bfloat16 numerics hold one block of query rows of the
      reference (ops.ROWS_SCRATCH_BYTES, or one row when a row alone is more) and the
      layer's bf16 cache widened to float32; llama.cpp numerics the FlashAttention tile and
      the layer's f16 cache widened.
    """
    n = batch * chunk
    activations = 4 * n * (7 * args.ffn_dim + 12 * args.dim)
    logits = 8 * batch * args.vocab_size
    widened = 2 * 4 * batch * ctx * args.n_kv_heads * args.head_dim
    if dtype == "bfloat16":
        attention = max(ops.ROWS_SCRATCH_BYTES, 16 * batch * args.n_heads * ctx) + widened
    else:
        attention = 2 * ops.FLASH_BLOCK_BYTES + (widened if dtype == "llama.cpp" else 0)
    return activations + logits + attention


def needed_bytes(args: ModelArgs, ctx: int, batch: int = 1, dtype: str = "float32", weights_mode: str = "resident",
                 chunk: int = PREFILL_CHUNK, stored_bytes: int | None = None) -> dict:
    """Each part of the model's memory at context `ctx`, and their total (with RESERVE)."""
    parts = {"weights": weight_bytes(args, weights_mode, stored_bytes), "kv_cache": kv_cache_bytes(args, ctx, batch, dtype),
             "rope": ctx * (args.head_dim // 2) * 8,
             "scratch": scratch_bytes(args, ctx, min(chunk, ctx), batch, dtype), "reserve": RESERVE}
    parts["total"] = sum(parts.values())
    return parts


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def longest_context(args: ModelArgs, available: int, limit: int, **kw) -> int:
    """The longest context up to `limit` whose needed_bytes total fits in `available`
    (0 if none does); a multiple of CONTEXT_STEP when cut short of the limit."""
    def fits(ctx):
        return needed_bytes(args, ctx, **kw)["total"] <= available

    if fits(limit):
        return limit
    if not fits(1):
        return 0
    lo, hi = 1, limit                    # lo fits, hi does not (the total grows with ctx)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo // CONTEXT_STEP * CONTEXT_STEP or lo


def choose_context(args: ModelArgs, requested: int | None, available: int, batch: int = 1, dtype: str = "float32",
                   weights_mode: str = "resident", chunk: int = PREFILL_CHUNK, stored_bytes: int | None = None) -> int:
    """The context (positions) to allocate: `requested`, if it fits in `available` bytes;
    by default the longest that fits, up to the trained context (args.max_seq_len). A
    context that does not fit raises UsageError with the figures."""
    kw = dict(batch=batch, dtype=dtype, weights_mode=weights_mode, chunk=chunk, stored_bytes=stored_bytes)
    ctx = requested if requested is not None else args.max_seq_len
    fit = longest_context(args, available, ctx, **kw)
    mapped = weights_mode in ("tiled", "quantized")
    if mapped and (fit == 0 or (requested is not None and fit != ctx)):
        # Tiled weights are the checkpoint's own pages, mapped: what does not fit in memory the
        # page cache streams from disk (a model larger than memory runs, slowly). Only the rest
        # has to fit.
        fit = longest_context(args, available + weight_bytes(args, weights_mode, stored_bytes), ctx, **kw)
    if fit == ctx or (requested is None and fit):
        return fit
    need = needed_bytes(args, ctx, **kw)
    advice = f"at most {fit:,} positions fit" if fit else "no context fits" + (
        "; --weights tiled holds bf16 weights in half the memory" if not mapped else "")
    raise UsageError(
        f"a context of {ctx:,} positions (--ctx / max_seq_len) needs {gib(need['total'])}: "
        f"{gib(need['kv_cache'])} of KV cache ({batch} x {ctx:,} positions x {args.n_layers} layers, "
        f"{cache_type(dtype)}), {gib(need['weights'])} of {weights_mode} weights, "
        f"{gib(need['scratch'] + need['rope'])} of scratch and RoPE table and {gib(RESERVE)} reserve, "
        f"but {gib(available)} is available: {advice}")

def table(args: ModelArgs, contexts: list[int], dtype: str = "float32", weights_mode: str = "resident",
          batch: int = 1) -> str:
    """The memory model at several contexts, one row each (`npllama memory`)."""
    rows = [f"{'context':>9} {'weights':>10} {'KV cache':>10} {'scratch':>10} {'total':>10}"]
    for ctx in contexts:
        p = needed_bytes(args, ctx, batch, dtype, weights_mode)
        rows.append(f"{ctx:>9,} {gib(p['weights']):>10} {gib(p['kv_cache']):>10} "
                    f"{gib(p['scratch'] + p['rope']):>10} {gib(p['total']):>10}")
    return "\n".join(rows)
