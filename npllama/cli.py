"""The `npllama` command line."""
from __future__ import annotations

import argparse
import os
import sys

from .checkpoint import CheckpointError
from .config import ConfigError
from .model import WeightError

# Errors a user can cause and fix: shown as one line, never as a traceback.
USER_ERRORS = (CheckpointError, ConfigError, WeightError, FileNotFoundError, ValueError)


def cmd_convert(a) -> int:
    from .convert import convert
    index = convert(a.src, a.dst, dtype=a.dtype, force=a.force,
                    shard_bytes=int(a.shard_size * 1024**3) if a.shard_size else None, quiet=a.quiet)
    print(f"wrote {a.dst}: {len(index['tensors'])} tensors in {len(index['shards'])} shard(s)", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    import json
    from collections import Counter
    from .checkpoint import open_tensors, read_index, verify
    from .config import ModelArgs
    index = read_index(a.dir)
    args = ModelArgs.from_json(os.path.join(a.dir, "params.json"))
    open_tensors(a.dir, index)  # checks every shard, member, dtype and shape against the index
    dtypes = Counter(t["dtype"] for t in index["tensors"].values())
    total = sum(s["size"] for s in index["shards"].values())
    print(json.dumps(args.to_dict(), indent=2))
    print(f"tensors: {len(index['tensors'])}  shards: {len(index['shards'])}  bytes: {total:,}  "
          f"dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(dtypes.items()))}")
    if a.verify:
        bad = verify(a.dir)
        if bad:
            print(f"npllama: {a.dir}: sha256 mismatch in {', '.join(bad)}", file=sys.stderr)
            return 1
        print("sha256: all shards verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="npllama", description="Llama 3 in plain NumPy.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Meta (.pth), HF (safetensors) or GGUF checkpoint",
                       description="Convert a checkpoint into npllama's memory-mappable format. SRC is a Meta "
                       "directory (consolidated.*.pth + params.json), an HF directory (config.json + "
                       "*.safetensors) or a .gguf file.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="store every tensor as this "
                   "(default: as in the source; GGUF's quantized tensors become float32)")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--shard-size", type=float, default=None, metavar="GB", help="largest shard (default 2 GB)")
    c.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a converted checkpoint", description="Print a converted "
                       "checkpoint's params, tensor count, bytes and dtypes.")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 against the index")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except USER_ERRORS as e:
        print(f"npllama: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
