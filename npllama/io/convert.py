"""`npllama convert`: recognise a checkpoint's format and write it in npllama's. The
readers, one per format, live in npllama/formats/ over one hardened reading layer."""
from __future__ import annotations

import glob
import os
import sys
from typing import Callable

from ..errors import CheckpointError, NonFiniteError
from ..untrusted import open_regular
from .atomic import refuse_overlap
from .checkpoint import check_destination, write_checkpoint
from .formats.gguf_file import read_gguf
from .formats.hf import read_hf
from .formats.meta_pth import read_meta
from .formats.source import Source


def detect(src: str) -> str:
    if os.path.isfile(src):
        with open_regular(src) as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise CheckpointError(f"{src}: not a GGUF file (a Meta or HF checkpoint is a directory)")
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such file or directory" if not os.path.lexists(src) else
                              f"{src}: not a checkpoint file or directory (a FIFO or device?)")
    has = lambda *pattern: glob.glob(os.path.join(glob.escape(src), *pattern))  # noqa: E731
    if has("consolidated.*.pth"):
        return "meta"
    if os.path.lexists(os.path.join(src, "config.json")) and has("*.safetensors"):
        return "hf"
    if os.path.isdir(os.path.join(src, "original")) and has("original", "consolidated.*.pth"):
        return "meta-original"
    raise CheckpointError(f"{src}: neither a Meta checkpoint (consolidated.*.pth + params.json), "
                          "an HF one (config.json + *.safetensors) nor a GGUF file")


def open_source(src: str, blocks: bool = False) -> Source:
    """src as a Source; blocks: a GGUF's block-quantized matrices kept as their blocks."""
    kind = detect(src)
    if kind == "gguf":
        return read_gguf(src, blocks)
    if kind == "hf":
        return read_hf(src)
    return read_meta(os.path.join(src, "original") if kind == "meta-original" else src)


def convert(src: str, dst: str, dtype: str | None = None, force: bool = False,
            shard_bytes: int | None = None, quiet: bool = False, verify: Callable[[], None] | None = None,
            blocks: bool = False) -> dict:
    """Convert src into npllama's format at dst. Every tensor's shape is checked against the
    params before anything is written; dst appears only complete, and only if verify() (given:
    the source is still what was hashed) returns. blocks (without dtype): a GGUF's
    block-quantized matrices are stored as their blocks, which run quantized or widen exactly."""
    refuse_overlap(dst, [src], "converted checkpoint")   # before --force may replace anything
    check_destination(dst, force)   # before reading a byte of the source
    source = open_source(src, blocks and dtype is None)
    source.check()
    if not {"tokenizer.json", "tokenizer.model"} & (set(source.extra_files) | set(source.extra_data)):
        print(f"npllama: warning: {src} has no tokenizer (tokenizer.json or tokenizer.model): the converted model "
              "runs token ids but cannot generate, chat or trace text", file=sys.stderr)
    kw = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    try:
        return write_checkpoint(dst, source.args, source.tensors(), source.nbytes, len(source.shapes), dtype=dtype,
                                extra_files=source.extra_files, extra_data=source.extra_data, force=force,
                                quiet=quiet, verify=verify, **kw)
    except NonFiniteError as e:   # the writer knows the tensor; the message names the source too
        raise NonFiniteError(f"{src}: {e}") from None
