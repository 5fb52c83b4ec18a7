"""`npllama memory`: what a model needs at given contexts, and what fits here."""
from __future__ import annotations

from ..errors import UsageError
from ..io.checkpoint import read_params
from ..model import memory
from ..model.config import preset
from ..model.memory import available_memory
from .common import at_least


def add_parser(sub) -> None:
    mm = sub.add_parser("memory", help="what a model needs in memory at given contexts",
                        description="Print the memory model (weights, KV cache, scratch of a forward pass) at "
                        "several contexts, and the default context that fits in this machine's available memory.")
    src = mm.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", metavar="DIR", help="a converted model directory (its params.json)")
    src.add_argument("--shape", default="llama3.2-1b", help="a released shape instead (default llama3.2-1b; "
                     "llama3-8b, llama3.1-8b, llama3.1-70b, ...)")
    mm.add_argument("--ctx", default="8192,32768,131072", help="context lengths, comma-separated")
    mm.add_argument("--numerics", "--dtype", dest="dtype", choices=["float32", "bfloat16", "llama.cpp"], default="float32")
    mm.add_argument("--weights", choices=["resident", "tiled"], default="resident")
    mm.add_argument("--batch", type=at_least(1), default=1)
    mm.set_defaults(func=cmd_memory)


def cmd_memory(a) -> int:
    if a.model:
        args, name = read_params(a.model), a.model     # as `info` reads it: no link out of the folder
    else:
        args, name = preset(a.shape), a.shape
    try:
        contexts = [int(c) for c in a.ctx.split(",")]
    except ValueError:
        raise UsageError(f"--ctx takes comma-separated context lengths, got {a.ctx!r}") from None
    if min(contexts) <= 0:
        raise UsageError(f"--ctx: context lengths must be positive, got {a.ctx!r}")
    print(f"{name}: {args.n_layers} layers, {args.n_kv_heads} KV heads x {args.head_dim}, {a.dtype} numerics "
          f"(KV cache {memory.cache_type(a.dtype)}), {a.weights} weights, batch {a.batch}, "
          f"prefill chunks of {memory.PREFILL_CHUNK}; total includes {memory.gib(memory.RESERVE)} reserve")
    print(memory.table(args, contexts, a.dtype, a.weights, a.batch))
    available, trained = available_memory(), args.max_seq_len
    fit = memory.longest_context(args, available, max(trained, *contexts), batch=a.batch, dtype=a.dtype,
                                 weights_mode=a.weights)
    print(f"this machine: {memory.gib(available)} available: " + (
        f"up to {fit:,} positions fit; the default context is {min(fit, trained):,} (trained: {trained:,})" if fit
        else "the weights alone do not fit"))
    return 0
