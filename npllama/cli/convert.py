"""`npllama convert` and `npllama info`: checkpoints in, and what one holds."""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

from ..errors import TokenizerError, printable
from ..io.checkpoint import nonfinite, open_tensors, read_checked, verify
from ..io.convert import convert
from ..io.hub import default_model, resolve_model
from ..model.memory import choose_context
from ..model.memory import available_memory
from ..text.tokenizer import load as load_tokenizer


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a Meta (.pth), HF (safetensors) or GGUF checkpoint",
                       description="Convert a checkpoint into npllama's memory-mappable format. SRC is a Meta "
                       "directory (consolidated.*.pth + params.json), an HF directory (config.json + "
                       "*.safetensors) or a .gguf file.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="store every tensor as this "
                   "(default: as in the source: a GGUF's quantized matrices keep their blocks, which run quantized, or "
                   "widened exactly to float32 when they fit; --dtype float32 dequantizes them)")
    c.add_argument("--force", action="store_true", help="replace an existing DST, if it is a checkpoint npllama "
                   "wrote (anything else is refused and left untouched)")
    c.add_argument("--shard-size", type=shard_gb, default=None, metavar="GB", help="largest shard (default 2 GB)")
    c.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a converted checkpoint", description="Print a converted "
                       "checkpoint's params, tensor count, bytes and dtypes.")
    i.add_argument("dir", nargs="?", help="a converted model directory, or an HF folder, .gguf file or Meta folder "
                   "(converted once into the cache); default: the default model, as every other command takes")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 against the index and "
                   "every weight for NaN or infinity")
    i.set_defaults(func=cmd_info)


def shard_gb(text: str) -> float:
    """An argparse type: a shard size in GB, finite, from 1 MB to 1 TB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not 1e-3 <= value <= 1024:   # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be from 0.001 to 1024 GB, got {text}")
    return value


def cmd_convert(a) -> int:
    index = convert(a.src, a.dst, dtype=a.dtype, force=a.force,
                    shard_bytes=int(a.shard_size * 1024**3) if a.shard_size else None, quiet=a.quiet, blocks=True)
    print(f"wrote {a.dst}: {len(index['tensors'])} tensors in {len(index['shards'])} shard(s)", file=sys.stderr)
    return 0


def show(text: str, **kw) -> None:
    """A line of `info`: its file-derived text (tensor, shard and token names, a chat
    template's size, a tokenizer's description) made printable (errors.printable), so a
    name holding ESC sequences or a newline cannot paint the terminal or forge a line."""
    print(printable(text), **kw)


def cmd_info(a) -> int:
    a.dir = default_model() if a.dir is None else resolve_model(a.dir)
    args, index = read_checked(a.dir)
    open_tensors(a.dir, index)  # checks every shard, member, dtype and shape against the index
    dtypes = Counter(t["dtype"] for t in index["tensors"].values())
    total = sum(s["size"] for s in index["shards"].values())
    for line in json.dumps(args.to_dict(), indent=2).splitlines():
        show(line)
    show(f"tensors: {len(index['tensors'])}  shards: {len(index['shards'])}  bytes: {total:,}  "
          f"dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(dtypes.items()))}")
    print_model_summary(a.dir, args, index)
    return verify_weights(a.dir) if a.verify else 0


def verify_weights(path: str) -> int:
    """info --verify: every shard's sha256, then every weight finite."""
    bad = verify(path)
    if bad:
        show(f"npllama: {path}: sha256 mismatch in {', '.join(bad)}", file=sys.stderr)
        return 1
    show("sha256: all shards verified")
    bad = nonfinite(path)
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        show(f"npllama: {path}: NaN or infinity in {', '.join(bad[:5])}{more}", file=sys.stderr)
        return 1
    show("values: every weight finite")
    return 0


def print_model_summary(path: str, args, index: dict) -> None:
    """Parameters, tokenizer, chat format, stop ids and trained context: what a user asks
    first of a checkpoint."""
    n_params = sum(math.prod(t["shape"]) for t in index["tensors"].values())
    tied = "output.weight" not in index["tensors"]
    show(f"parameters: {n_params:,}" + (" (output head tied to the embeddings)" if tied else ""))
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        show(f"tokenizer: none usable ({e})")
    else:
        print_tokenizer(tok, args)
    ctx = choose_context(args, None, available_memory())
    show(f"trained context: {args.max_seq_len} tokens; runs at {ctx} by default (what fits in memory here, "
          "float32; --ctx, see `npllama memory`)" if ctx else
          f"trained context: {args.max_seq_len} tokens; float32 weights do not fit in memory here (`npllama memory`)")


def print_tokenizer(tok, args) -> None:
    name = {i: t for t, i in tok.special_tokens.items()}
    show(f"tokenizer: {tok.describe()}; bos {tok.bos!r} ({tok.bos_id}), "
          f"{'adds bos' if tok.add_bos else 'adds no bos'} to plain prompts")
    chat = (f"the checkpoint's chat template ({len(tok.chat_template):,} characters of Jinja)" if tok.chat_template
            else f"built-in {tok.chat_format}" if tok.chat_format else "none (a base model)")
    show(f"chat format: {chat}; generate uses it by default: {'yes' if tok.chat_default else 'no'}")
    show(f"stops on: {', '.join(f'{name[i]} ({i})' for i in tok.stop_ids)}")
    if tok.n_words > args.vocab_size:
        show(f"warning: the tokenizer has {tok.n_words} ids, the model's embedding {args.vocab_size}")
