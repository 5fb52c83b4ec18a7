"""What the commands share: the model arguments and their opener, token-id and sampling
arguments, and the prompt they name."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from ..io import hub
from ..io.atomic import refuse_overlap
from ..io.checkpoint import is_gguf, load, make_model, read_checked, runs_as_gguf
from ..io.formats.gguf_file import open_gguf
from ..io.hub import default_gguf, default_model, resolve_model
from ..io.tokens import parse_token_ids, read_token_ids
from ..run import distributed
from ..run.generate import Generator, SamplingParams
from ..text.tokenizer import from_files as tokenizer_from_files, load as load_tokenizer


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, refused before any model loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def utf8(text: str) -> str:
    """An argparse type for text the model reads: Python hands over argv bytes that are not
    UTF-8 as lone surrogates (surrogateescape), which the tokenizer would turn into U+FFFD
    without a word; they are refused instead, naming the argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00   # surrogateescape maps byte b to U+DC00 + b
        raise argparse.ArgumentTypeError(f"not UTF-8 text (byte 0x{byte:02x} at character {e.start})") from None
    return text


def add_threads_arg(p) -> None:
    p.add_argument("-t", "--threads", type=at_least(1), default=None, metavar="N", help="threads for numpy and its "
                   "BLAS (default: the cores not kept busy by other processes, from the load average; at least 1)")


def add_model_args(p, ctx: bool = True):
    p.add_argument("-m", "--model", metavar="PATH", help="a converted model directory, or an HF folder, .gguf file or "
                   "Meta folder (converted once into the cache); default: SmolLM2-135M-Instruct, fetched once into "
                   "~/.cache/npllama")
    p.add_argument("--numerics", "--dtype", dest="dtype", choices=["float32", "bfloat16", "llama.cpp"],
                   default="float32", help="float32 (default); bfloat16: a PyTorch bf16 run; llama.cpp: what "
                   "llama.cpp's CPU backend computes on a .gguf's own blocks (activations quantized per weight type, "
                   "f16 KV cache); the .gguf is then run as it is")
    p.add_argument("--weights", dest="weights_mode", choices=["auto", "resident", "tiled", "quantized"],
                   default="auto", help="weights as resident float32 copies, or left in the memory-mapped file as "
                   "stored (tiled: bf16 widened tile by tile, float32 read in place; the page cache streams what does "
                   "not fit); quantized: a .gguf run as it is, its blocks mapped and widened tile by tile (no "
                   "conversion, no float copy) (default auto: tiled, or quantized for a .gguf, when float32 copies "
                   "would not fit in memory)")
    p.add_argument("--ray", metavar="local|ADDRESS", help="run the layers as a pipeline of stages on Ray: local "
                   "starts Ray on this machine, an address (HOST:PORT of `ray start --head`, or auto) joins a "
                   "cluster; the checkpoint must be at the same path on every node (pip install npllama[ray])")
    p.add_argument("--stages", type=at_least(1), metavar="N",
                   help="with --ray: how many stages (default: one per node)")
    if ctx:
        p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length in tokens (default: the "
                       "longest that fits in memory, up to the model's trained context; see `npllama memory`)")
    p.add_argument("--force-ctx", action="store_true", help="allow a context beyond the model's trained context")
    add_threads_arg(p)


def add_token_args(p):
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--tokens", metavar="IDS", help="token ids instead of text, e.g. 128000,791,6864 (used as "
                     "given: no bos or chat template is added)")
    ids.add_argument("--tokens-file", metavar="FILE", help="token ids from a .npy (1-D integers) or a text file "
                     "(separated by commas or whitespace)")


def add_sampling_args(p):
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (default 0: off)")
    p.add_argument("--seed", type=at_least(0), default=None, help="makes sampling reproducible")
    p.add_argument("--max-new-tokens", type=at_least(0), default=256)


def sampling_params(a) -> SamplingParams:
    """--temperature, --top-p, --top-k, --seed as the library checks them: made before the
    model loads, so that a bad value is refused at once."""
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)


def open_model(a, max_seq_len: int | None = None, max_batch_size: int = 1) -> Generator:
    """The model named by -m (or the default model), loaded, with its tokenizer: a GGUF run
    as it is (runs_as_gguf), anything else converted once and loaded from the cache."""
    ctx = max_seq_len or getattr(a, "ctx", None)
    if ctx is not None and ctx <= 0:
        raise UsageError(f"--ctx must be a positive number of tokens, got {ctx}")
    if a.stages is not None and a.ray is None:
        raise UsageError("--stages goes with --ray (local, or the address of a Ray cluster)")
    as_is = a.weights_mode == "quantized" or a.dtype == "llama.cpp"
    source = a.model if a.model is not None else default_gguf() if as_is else None
    if source is not None and (runs_as_gguf(source, a.weights_mode) or a.dtype == "llama.cpp" and is_gguf(source)):
        if a.ray is not None and a.dtype == "llama.cpp":
            raise UsageError("--ray runs converted checkpoints: convert the .gguf first (`npllama convert X.gguf "
                             "DIR` keeps its blocks, which llama.cpp numerics need), then -m DIR")
        if a.ray is not None:
            raise UsageError("--ray runs converted checkpoints: a .gguf run quantized runs in one process (drop "
                             "--ray, or pass --weights tiled to convert it)")
        return open_gguf_model(a, source, ctx, max_batch_size)
    path = default_model() if a.model is None else resolve_model(a.model)
    check_context(a, ctx, read_checked(path)[0].max_seq_len)
    if a.ray is not None:
        model = distributed.load(path, a.stages, a.ray, dtype=a.dtype, max_seq_len=ctx, max_batch_size=max_batch_size,
                                 weights_mode=a.weights_mode)
        print("\n".join(model.describe()), file=sys.stderr)
    else:
        model = load(path, dtype=a.dtype, max_seq_len=ctx, max_batch_size=max_batch_size, weights_mode=a.weights_mode)
    return Generator(model, load_tokenizer(path), progress=sys.stderr)


def check_context(a, ctx: int | None, trained: int) -> None:
    """A --ctx past the model's trained context is refused unless --force-ctx."""
    if ctx is not None and ctx > trained and not a.force_ctx:
        raise UsageError(f"a context of {ctx} tokens is longer than the {trained} tokens this model was trained for; "
                         "add --force-ctx to run it anyway (quality degrades past the trained context)")


def open_gguf_model(a, path: str, ctx: int | None, max_batch_size: int) -> Generator:
    """A GGUF as it is, quantized (llama.cpp numerics: its blocks, held as --weights says);
    its header parsed once (gguf's reader takes seconds on a large vocabulary)."""
    args, tensors, files = open_gguf(path)
    check_context(a, ctx, args.max_seq_len)
    tokenizer = tokenizer_from_files(files, path)
    model = make_model(path, args, tensors, a.dtype, max_seq_len=ctx, max_batch_size=max_batch_size,
                       weights_mode=a.weights_mode if a.dtype == "llama.cpp" else "quantized")
    return Generator(model, tokenizer)


def refuse_output_in_inputs(a, output: str, what: str, *more) -> None:
    """The output file or directory of a command may not be, hold or lie inside what it
    reads: the model (-m, or the default model's folder), --tokens-file, and `more`."""
    model = a.model if getattr(a, "model", None) is not None else os.path.join(hub.cache_dir(), hub.NAME)
    refuse_overlap(output, [model, getattr(a, "tokens_file", None), *more], what)


def encode_prompt(tok, text: str) -> list[int]:
    """A raw prompt's tokens; an empty one (with no begin-of-text token to start from) is an error."""
    tokens = tok.encode(text, bos=tok.add_bos)
    if not tokens:
        raise UsageError("the prompt is empty and this model adds no begin-of-text token: give some text")
    return tokens


def token_ids(a, gen) -> list[int] | None:
    """--tokens / --tokens-file, checked against the model and tokenizer (None if not given)."""
    if a.tokens is None and a.tokens_file is None:
        return None
    ids = parse_token_ids(a.tokens, "--tokens") if a.tokens is not None else read_token_ids(a.tokens_file)
    limit = min(gen.model.args.vocab_size, gen.tokenizer.n_words)
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise UsageError(f"{'--tokens' if a.tokens is not None else a.tokens_file}: token id {bad[0]} is outside "
                         f"the vocabulary (0..{limit - 1})")
    return ids


def prompt_or_tokens(a, gen) -> tuple[str | None, list[int] | None]:
    """The positional prompt, or the ids of --tokens/--tokens-file: exactly one of them."""
    ids = token_ids(a, gen)
    if ids is not None and a.prompt is not None:
        raise UsageError("give a prompt or --tokens/--tokens-file, not both")
    if ids is None and a.prompt is None:
        raise UsageError("give a prompt, or token ids with --tokens/--tokens-file")
    return a.prompt, ids


def piece(tok, token: int) -> str:
    """One token's text; a token ending mid-character shows U+FFFD for the incomplete bytes."""
    return tok.token_bytes(token).decode("utf-8", errors="replace")
