"""The `npllama` command line."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .errors import NpllamaError, UsageError


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


def cmd_convert(a) -> int:
    from .io.convert import convert
    index = convert(a.src, a.dst, dtype=a.dtype, force=a.force,
                    shard_bytes=int(a.shard_size * 1024**3) if a.shard_size else None, quiet=a.quiet)
    print(f"wrote {a.dst}: {len(index['tensors'])} tensors in {len(index['shards'])} shard(s)", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    import json
    from collections import Counter
    from .io.checkpoint import nonfinite, open_tensors, read_checked, verify
    from .io.hub import resolve_model
    a.dir = resolve_model(a.dir)
    args, index = read_checked(a.dir)
    open_tensors(a.dir, index)  # checks every shard, member, dtype and shape against the index
    dtypes = Counter(t["dtype"] for t in index["tensors"].values())
    total = sum(s["size"] for s in index["shards"].values())
    print(json.dumps(args.to_dict(), indent=2))
    print(f"tensors: {len(index['tensors'])}  shards: {len(index['shards'])}  bytes: {total:,}  "
          f"dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(dtypes.items()))}")
    print_model_summary(a.dir, args, index)
    if a.verify:
        bad = verify(a.dir)
        if bad:
            print(f"npllama: {a.dir}: sha256 mismatch in {', '.join(bad)}", file=sys.stderr)
            return 1
        print("sha256: all shards verified")
        bad = nonfinite(a.dir)
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            print(f"npllama: {a.dir}: NaN or infinity in {', '.join(bad[:5])}{more}", file=sys.stderr)
            return 1
        print("values: every weight finite")
    return 0


def print_model_summary(path: str, args, index: dict) -> None:
    """Parameters, tokenizer, chat format, stop ids and trained context: what a user asks
    first of a checkpoint."""
    import math
    from .text.tokenizer import TokenizerError, load as load_tokenizer
    n_params = sum(math.prod(t["shape"]) for t in index["tensors"].values())
    tied = "output.weight" not in index["tensors"]
    print(f"parameters: {n_params:,}" + (" (output head tied to the embeddings)" if tied else ""))
    try:
        tok = load_tokenizer(path)
    except TokenizerError as e:
        print(f"tokenizer: none usable ({e})")
    else:
        name = {i: t for t, i in tok.special_tokens.items()}
        print(f"tokenizer: {tok.describe()}; bos {tok.bos!r} ({tok.bos_id}), "
              f"{'adds bos' if tok.add_bos else 'adds no bos'} to plain prompts")
        chat = (f"the checkpoint's chat template ({len(tok.chat_template):,} characters of Jinja)" if tok.chat_template
                else f"built-in {tok.chat_format}" if tok.chat_format else "none (a base model)")
        print(f"chat format: {chat}; generate uses it by default: {'yes' if tok.chat_default else 'no'}")
        print(f"stops on: {', '.join(f'{name[i]} ({i})' for i in tok.stop_ids)}")
        if tok.n_words > args.vocab_size:
            print(f"warning: the tokenizer has {tok.n_words} ids, the model's embedding {args.vocab_size}")
    from .model.memory import choose_context
    from .model.weights import available_memory
    ctx = choose_context(args, None, available_memory())
    print(f"trained context: {args.max_seq_len} tokens; runs at {ctx} by default (what fits in memory here, "
          "float32; --ctx, see `npllama memory`)" if ctx else
          f"trained context: {args.max_seq_len} tokens; float32 weights do not fit in memory here (`npllama memory`)")


def open_model(a, max_seq_len: int | None = None, max_batch_size: int = 1):
    """The model directory named by -m (or the default model), loaded, with its tokenizer."""
    from .io.checkpoint import load
    from .run.generate import Generator
    from .text.tokenizer import load as load_tokenizer
    from .io.checkpoint import read_checked
    from .io.hub import default_model, resolve_model
    ctx = max_seq_len or getattr(a, "ctx", None)
    if ctx is not None and ctx <= 0:
        raise UsageError(f"--ctx must be a positive number of tokens, got {ctx}")
    path = default_model() if a.model is None else resolve_model(a.model)
    trained = read_checked(path)[0].max_seq_len
    if ctx is not None and ctx > trained and not a.force_ctx:
        raise UsageError(f"a context of {ctx} tokens is longer than the {trained} tokens this model was trained for; "
                         "add --force-ctx to run it anyway (quality degrades past the trained context)")
    if a.stages is not None and a.ray is None:
        raise UsageError("--stages goes with --ray (local, or the address of a Ray cluster)")
    if a.ray is not None:
        from .run.distributed import load as load_pipeline
        model = load_pipeline(path, a.stages, a.ray, dtype=a.dtype, max_seq_len=ctx, max_batch_size=max_batch_size,
                              weights_mode=a.weights_mode)
        print("\n".join(model.describe()), file=sys.stderr)
    else:
        model = load(path, dtype=a.dtype, max_seq_len=ctx, max_batch_size=max_batch_size,
                             weights_mode=a.weights_mode)
    return Generator(model, load_tokenizer(path))


def encode_prompt(tok, text: str) -> list[int]:
    """A raw prompt's tokens; an empty one (with no begin-of-text token to start from) is an error."""
    tokens = tok.encode(text, bos=tok.add_bos)
    if not tokens:
        raise UsageError("the prompt is empty and this model adds no begin-of-text token: give some text")
    return tokens


# --- token ids on the command line (--tokens, --tokens-file) ------------------------------

# Ids a --tokens-file may hold: 4M, beyond any context and any perplexity run on a CPU; a
# file is refused by its size before it is read (a .npy of int64, or text of 16 bytes an id).
MAX_TOKEN_IDS = 1 << 22


def parse_token_ids(text: str, where: str) -> list[int]:
    """Ids separated by commas and/or whitespace (at most MAX_TOKEN_IDS, read one at a time)."""
    ids = []
    for m in re.finditer(r"[^\s,]+", text):
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", m.group()):
            raise UsageError(f"{where}: {m.group()[:20]!r} is not a token id")
        if len(ids) == MAX_TOKEN_IDS:
            raise UsageError(f"{where}: more than {MAX_TOKEN_IDS:,} token ids")
        ids.append(int(m.group()))
    if not ids:
        raise UsageError(f"{where}: no token ids")
    return ids


def read_token_ids(path: str) -> list[int]:
    """A .npy of integers (1-D, no pickles; its header parsed and checked against the file
    before anything is allocated), or a UTF-8 text file of ids: a regular file either way."""
    import numpy as np
    from .untrusted import file_size, npy_header, open_regular, read_bounded
    if not path.endswith(".npy"):
        try:
            text = read_bounded(path, 16 * MAX_TOKEN_IDS, UsageError).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return parse_token_ids(text, path)
    with open_regular(path, UsageError) as f:
        dtype, shape, start = npy_header(f, 0, file_size(f), path, UsageError)
        if len(shape) != 1 or dtype.kind not in "iu":
            raise UsageError(f"{path}: expected a 1-D array of integer ids, got {dtype} {shape}")
        if not 0 < shape[0] <= MAX_TOKEN_IDS:
            raise UsageError(f"{path}: {shape[0]:,} token ids (1 to {MAX_TOKEN_IDS:,} are accepted)")
        f.seek(start)
        return np.frombuffer(f.read(shape[0] * dtype.itemsize), dtype).tolist()   # inside the file: checked


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


def piece(tok, token: int) -> str:
    """One token's text; a token ending mid-character shows U+FFFD for the incomplete bytes."""
    return tok.token_bytes(token).decode("utf-8", errors="replace")


def prompt_or_tokens(a, gen) -> tuple[str | None, list[int] | None]:
    """The positional prompt, or the ids of --tokens/--tokens-file: exactly one of them."""
    ids = token_ids(a, gen)
    if ids is not None and a.prompt is not None:
        raise UsageError("give a prompt or --tokens/--tokens-file, not both")
    if ids is None and a.prompt is None:
        raise UsageError("give a prompt, or token ids with --tokens/--tokens-file")
    return a.prompt, ids


def sampling_params(a):
    from .run.generate import SamplingParams
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)


def cmd_generate(a) -> int:
    from .text.tokenizer import chat_format
    gen = open_model(a)
    sampling = sampling_params(a)  # validated before any work
    if a.logprobs < 0:
        raise UsageError(f"--logprobs must be >= 0, got {a.logprobs}")
    tok = gen.tokenizer
    text, ids = prompt_or_tokens(a, gen)
    if a.chat is False and a.system is not None:
        raise UsageError("--system fills the chat format's system message; it does not go with --raw")
    if ids is not None:
        if a.chat or a.system is not None:
            raise UsageError("--chat (or --system) does not apply to --tokens/--tokens-file: the ids are the whole prompt")
        prompt, echo = ids, tok.decode(ids)
    elif a.chat if a.chat is not None else tok.chat_default or a.system is not None:
        system = [{"role": "system", "content": a.system}] if a.system is not None else []
        prompt = chat_format(tok, tok.default_system).encode_dialog_prompt(
            system + [{"role": "user", "content": text}])
        echo = ""
    else:
        prompt, echo = encode_prompt(tok, text), text
    per_token = bool(a.json or a.show_ids or a.logprobs)
    stream = gen.stream(prompt, a.max_new_tokens, sampling, stop_strings=a.stop or (), logprobs=per_token,
                        top_logprobs=a.logprobs)
    if per_token:
        per_token_output(gen, prompt, stream, a.json)
    else:
        sys.stdout.write(echo)
        for text_piece, _, _ in stream:
            sys.stdout.write(text_piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    print(gen.timings.line(), file=sys.stderr)
    return 0


def per_token_output(gen, prompt: list[int], stream, as_json: bool) -> None:
    """One line per token. Text: the prompt's ids, `---`, then each generated id with its
    piece and, with --logprobs K, its log-probability and the K most likely. --json: one
    object per generated token, then one with the whole result."""
    import json
    tok, out = gen.tokenizer, sys.stdout
    if not as_json:
        for t in prompt:
            print(f"{t:>7}  {json.dumps(piece(tok, t), ensure_ascii=False)}", file=out)
        print("---", file=out)
    shown = 0

    def show_new():
        nonlocal shown
        r = gen.result
        for i in range(shown, len(r.tokens)):
            t, top = r.tokens[i], (r.top_logprobs[i] if r.top_logprobs else [])
            if as_json:
                line = {"id": t, "piece": piece(tok, t), "logprob": r.logprobs[i]}
                if r.top_logprobs:
                    line["top"] = [{"id": u, "piece": piece(tok, u), "logprob": lp} for u, lp in top]
                print(json.dumps(line, ensure_ascii=False), file=out, flush=True)
            else:
                alts = ", ".join(f"{u} {json.dumps(piece(tok, u), ensure_ascii=False)} {lp:.4f}" for u, lp in top)
                print(f"{t:>7}  {json.dumps(piece(tok, t), ensure_ascii=False):<20} {r.logprobs[i]:9.4f}"
                      + (f"  | {alts}" if alts else ""), file=out, flush=True)
        shown = len(r.tokens)

    for _ in stream:
        show_new()
    show_new()
    if as_json:
        r, t = gen.result, gen.timings
        print(json.dumps({"prompt_ids": list(prompt), "ids": r.tokens, "text": r.text, "stop_reason": r.stop_reason,
                          "prompt_tokens": t.prompt_tokens, "prompt_seconds": t.prompt_seconds,
                          "generated_tokens": t.generated_tokens, "generated_seconds": t.generated_seconds},
                         ensure_ascii=False), file=out)


def cmd_chat(a) -> int:
    from .text.tokenizer import chat_format
    gen = open_model(a)
    sampling = sampling_params(a)
    tok = gen.tokenizer
    fmt = chat_format(tok, tok.default_system)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            prompt = fmt.encode_dialog_prompt(messages)
            if len(prompt) >= gen.model.max_seq_len:
                print(f"npllama: the conversation ({len(prompt)} tokens) outgrew the context of "
                      f"{gen.model.max_seq_len}; starting over from this message", file=sys.stderr)
                messages = system + messages[-1:]
                prompt = fmt.encode_dialog_prompt(messages)
            for piece, _, _ in gen.stream(prompt, a.max_new_tokens, sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": gen.result.text})
            print(gen.timings.line(), file=sys.stderr)
            gen.timings.__init__()
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def parse_layers(spec: str | None):
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers takes comma-separated layer numbers, got {spec!r}") from None


def cmd_trace(a) -> int:
    from .inspect import tracefile as tr
    from .io.atomic import check_file
    check_file(a.output, "trace")   # before the model runs
    layers = parse_layers(a.layers)
    gen = open_model(a)
    bad = [i for i in layers or [] if not 0 <= i < gen.model.args.n_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} does not exist (the model has {gen.model.args.n_layers})")
    tok = gen.tokenizer
    text, ids = prompt_or_tokens(a, gen)
    ids = ids if ids is not None else encode_prompt(tok, text)
    t = tr.trace(gen.model, ids, layers, scores=not a.no_scores)
    t["__meta__"]["prompt"] = text
    t["__meta__"]["pieces"] = [piece(tok, i) for i in ids]   # token text, for `npllama plot`'s axes
    tr.save(a.output, t)
    print(f"wrote {a.output}: {len(t) - 1} tensors for {len(t['tokens'])} tokens", file=sys.stderr)
    return 0


def cmd_compare(a) -> int:
    from .inspect import tracefile as tr
    from .inspect.compare import compare
    ok, first, rows = compare(tr.load(a.a), tr.load(a.b), rtol=a.rtol, atol=a.atol, ulps=a.ulps, out=sys.stdout)
    if a.plot:
        from .inspect.plot import comparison
        comparison(rows, a.plot, title=f"{a.a} vs {a.b}", rtol=None if a.ulps is not None else a.rtol)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0 if ok else 1


def cmd_plot(a) -> int:
    from .inspect import tracefile as tr
    from .inspect.plot import attention
    attention(tr.load(a.trace), a.layer, a.output, head=a.head, what=a.what, source=a.trace)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


def cmd_memory(a) -> int:
    from .model import memory
    from .model.config import ModelArgs, preset
    from .model.weights import available_memory
    if a.model:
        args, name = ModelArgs.from_json(os.path.join(a.model, "params.json")), a.model
    else:
        args, name = preset(a.shape), a.shape
    try:
        contexts = [int(c) for c in a.ctx.split(",")]
    except ValueError:
        raise UsageError(f"--ctx takes comma-separated context lengths, got {a.ctx!r}") from None
    if min(contexts) <= 0:
        raise UsageError(f"--ctx: context lengths must be positive, got {a.ctx!r}")
    print(f"{name}: {args.n_layers} layers, {args.n_kv_heads} KV heads x {args.head_dim}, {a.dtype} numerics "
          f"(KV cache {'bf16' if a.dtype == 'bfloat16' else 'float32'}), {a.weights} weights, batch {a.batch}, "
          f"prefill chunks of {memory.PREFILL_CHUNK}; total includes {memory.gib(memory.RESERVE)} reserve")
    print(memory.table(args, contexts, a.dtype, a.weights, a.batch))
    available, trained = available_memory(), args.max_seq_len
    fit = memory.longest_context(args, available, max(trained, *contexts), batch=a.batch, dtype=a.dtype,
                                 weights_mode=a.weights)
    print(f"this machine: {memory.gib(available)} available: " + (
        f"up to {fit:,} positions fit; the default context is {min(fit, trained):,} (trained: {trained:,})" if fit
        else "the weights alone do not fit"))
    return 0


def cmd_golden(a) -> int:
    from .inspect.golden import check_destination, write_golden
    check_destination(a.output, a.force)   # before the model runs
    gen = open_model(a)
    ids = token_ids(a, gen)
    if ids is not None and a.prompt is not None:
        raise UsageError("give --prompt or --tokens/--tokens-file, not both")
    write_golden(gen, a.output, a.prompt, a.max_new_tokens, force=a.force, tokens=ids)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


def read_text(path: str) -> str:
    """The file's text, byte for byte (no newline translation), less one trailing newline
    as llama.cpp's -f reads it."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def cmd_perplexity(a) -> int:
    from .inspect import perplexity as pp
    base = pp.BaseFile.open(a.kl_divergence) if a.kl_divergence else None
    if base is not None and a.n_ctx is not None and a.n_ctx != base.n_ctx:
        raise UsageError(f"-c {a.n_ctx}: {a.kl_divergence} was made with -c {base.n_ctx}")
    n_ctx = base.n_ctx if base is not None else (a.n_ctx or 512)
    gen = open_model(a, max_seq_len=n_ctx, max_batch_size=max(1, (a.batch or n_ctx) // n_ctx))
    tok = gen.tokenizer
    bos = tok.bos_id if tok.add_bos else None
    ids = token_ids(a, gen)
    if base is not None:
        if a.file is not None or ids is not None:
            raise UsageError("--kl-divergence scores the tokens stored in the base file: drop -f/--tokens")
        pp.run_kl_divergence(gen.model, base, bos, a.batch, as_json=a.json)
        return 0
    if (a.file is None) == (ids is None):
        raise UsageError("give the text to score with -f FILE, or its token ids with --tokens/--tokens-file")
    tokens = ids if ids is not None else tok.encode(read_text(a.file), bos=tok.add_bos)
    pp.run_perplexity(gen.model, tokens, n_ctx, bos, a.batch, a.chunks, base_path=a.kl_divergence_base,
                      as_json=a.json)
    return 0


def cmd_bench(a) -> int:
    from .bench.peers import main as bench_main
    return bench_main(a)


def add_model_args(p, ctx: bool = True):
    p.add_argument("-m", "--model", metavar="PATH", help="a converted model directory, or an HF folder, .gguf file or "
                   "Meta folder (converted once into the cache); default: SmolLM2-135M-Instruct, fetched once into "
                   "~/.cache/npllama")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="numerics (default float32)")
    p.add_argument("--weights", dest="weights_mode", choices=["auto", "resident", "tiled"], default="auto",
                   help="weights as resident float32 copies, or left in the memory-mapped file as stored (tiled: "
                   "bf16 widened tile by tile, float32 read in place; the page cache streams what does not fit) "
                   "(default auto: tiled when float32 copies would not fit in memory)")
    p.add_argument("--ray", metavar="local|ADDRESS", help="run the layers as a pipeline of stages on Ray: local "
                   "starts Ray on this machine, an address (HOST:PORT of `ray start --head`, or auto) joins a "
                   "cluster; the checkpoint must be at the same path on every node (pip install npllama[ray])")
    p.add_argument("--stages", type=int, metavar="N", help="with --ray: how many stages (default: one per node)")
    if ctx:
        p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length in tokens (default: the "
                       "longest that fits in memory, up to the model's trained context; see `npllama memory`)")
    p.add_argument("--force-ctx", action="store_true", help="allow a context beyond the model's trained context")


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


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    p = argparse.ArgumentParser(prog="npllama", description="Llama 3 in plain NumPy.")
    p.add_argument("--version", action="version", version=f"npllama {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Meta (.pth), HF (safetensors) or GGUF checkpoint",
                       description="Convert a checkpoint into npllama's memory-mappable format. SRC is a Meta "
                       "directory (consolidated.*.pth + params.json), an HF directory (config.json + "
                       "*.safetensors) or a .gguf file.")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="store every tensor as this "
                   "(default: as in the source; GGUF's quantized tensors become float32)")
    c.add_argument("--force", action="store_true", help="replace an existing DST, if it is a checkpoint npllama "
                   "wrote (anything else is refused and left untouched)")
    c.add_argument("--shard-size", type=float, default=None, metavar="GB", help="largest shard (default 2 GB)")
    c.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a converted checkpoint", description="Print a converted "
                       "checkpoint's params, tensor count, bytes and dtypes.")
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 against the index and "
                   "every weight for NaN or infinity")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="continue a prompt (streams text)",
                       description="Generate text from a prompt, streaming it to stdout; a tokens/s line goes "
                       "to stderr.")
    g.add_argument("prompt", nargs="?")
    add_model_args(g)
    add_sampling_args(g)
    add_token_args(g)
    g.add_argument("--show-ids", action="store_true", help="one line per token: the prompt's ids, then each "
                   "generated id with its text and log-probability")
    g.add_argument("--logprobs", type=int, default=0, metavar="K", help="also the K most likely tokens of every "
                   "step, with their log-probabilities (implies one line per token)")
    g.add_argument("--json", action="store_true", help="one JSON object per generated token, then one with the "
                   "whole result")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="send the prompt as a user message in the model's chat format "
                      "(default for instruct models)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="plain completion of the prompt")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    g.add_argument("--system", help="system prompt (implies --chat)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive multi-turn chat",
                        description="Chat with the model: one user message per line of stdin (Ctrl-D or "
                        "Ctrl-C ends). The KV cache is kept across turns.")
    add_model_args(ch)
    add_sampling_args(ch)
    ch.add_argument("--system", help="system prompt")
    ch.set_defaults(func=cmd_chat)

    t = sub.add_parser("trace", help="record every intermediate of a forward pass",
                       description="Run the prompt through the model and save every intermediate (names in the "
                       "README's Trace format) to an .npz.")
    t.add_argument("prompt", nargs="?")
    t.add_argument("-o", "--output", required=True, help="the .npz to write")
    t.add_argument("--layers", help="only these layers, e.g. 0,1,31 (default all)")
    t.add_argument("--no-scores", action="store_true", help="leave out the (n_heads, T, T) scores and probs "
                   "(kept, they may take at most 2 GiB)")
    add_model_args(t)
    add_token_args(t)
    t.set_defaults(func=cmd_trace)

    cp = sub.add_parser("compare", help="compare two traces, tensor by tensor, in forward order",
                        description="Print max abs error, max relative error (to the largest |B|) and bf16 ulps per "
                        "shared tensor; mark the first outside tolerance; exit 1 if any is.")
    cp.add_argument("a")
    cp.add_argument("b", help="the reference")
    cp.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max |B| (default 1e-4)")
    cp.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (default 1e-6)")
    cp.add_argument("--ulps", type=float, default=None, help="instead: tolerance in bf16 ulps at max |B|")
    cp.add_argument("--plot", metavar="PNG", help="also draw the error of every tensor along the layers "
                    "(needs matplotlib: pip install 'npllama[plot]')")
    cp.set_defaults(func=cmd_compare)

    pl = sub.add_parser("plot", help="draw a trace's attention as heatmaps",
                        description="Heatmaps of one layer's attention probabilities (or scores) from a trace: "
                        "one head, or every head in a grid, with the tokens' text on the axes. Needs matplotlib "
                        "(pip install 'npllama[plot]').")
    pl.add_argument("trace", help="an .npz from npllama trace (or any trace in the same format)")
    pl.add_argument("--layer", type=int, required=True)
    pl.add_argument("--head", type=int, default=None, help="only this head (default: all, in a grid)")
    pl.add_argument("--what", choices=["probs", "scores"], default="probs",
                    help="softmax probabilities (default) or the masked scores before it")
    pl.add_argument("-o", "--output", required=True, help="the image to write (.png, .svg, .pdf, ...)")
    pl.set_defaults(func=cmd_plot)

    gd = sub.add_parser("golden", help="write a golden-vector bundle for other implementations' tests",
                        description="Write tokens, selected intermediates, logits and a greedy continuation as "
                        "plain .npy/.json files, with a README, into a directory.")
    gd.add_argument("-o", "--output", required=True, help="the bundle directory")
    gd.add_argument("--prompt", default=None, help="the prompt (default: a fixed English sentence)")
    gd.add_argument("--force", action="store_true", help="replace an existing bundle npllama wrote (anything "
                    "else is refused and left untouched)")
    gd.add_argument("--max-new-tokens", type=int, default=32, help="length of the greedy continuation (default 32)")
    add_model_args(gd)
    add_token_args(gd)
    gd.set_defaults(func=cmd_golden)

    pp = sub.add_parser("perplexity", help="perplexity and KL divergence, exactly as llama.cpp's llama-perplexity",
                        description="llama-perplexity's method: tokenize the text, cut it into chunks of -c tokens, "
                        "score the second half of each. Prints the PPL after each chunk and the final estimate "
                        "with its uncertainty; progress and tokens/s go to stderr. --kl-divergence-base writes "
                        "the logits in llama.cpp's base-file format; --kl-divergence reads one (from llama.cpp or "
                        "npllama) and prints llama.cpp's KL statistics.")
    pp.add_argument("-f", "--file", help="the text to score (UTF-8)")
    pp.add_argument("-c", "--ctx-size", dest="n_ctx", type=at_least(1), default=None, metavar="N",
                    help="tokens per chunk (default 512; with --kl-divergence, the base file's)")
    pp.add_argument("-b", "--batch", type=int, default=None, metavar="N",
                    help="tokens per forward pass (default: one chunk); below -c a chunk is fed in pieces, a "
                    "multiple of -c runs that many chunks together")
    pp.add_argument("--chunks", type=int, default=None, metavar="N", help="score only the first N chunks")
    kl = pp.add_mutually_exclusive_group()
    kl.add_argument("--kl-divergence-base", metavar="FILE", help="also write the logits to FILE in "
                    "llama-perplexity's --kl-divergence-base format")
    kl.add_argument("--kl-divergence", metavar="FILE", help="compare against the base file FILE: llama.cpp's "
                    "KL divergence, PPL ratio and top-token statistics")
    pp.add_argument("--json", action="store_true", help="one JSON object per chunk, then one with the result")
    add_model_args(pp, ctx=False)
    add_token_args(pp)
    pp.set_defaults(func=cmd_perplexity)

    mm = sub.add_parser("memory", help="what a model needs in memory at given contexts",
                        description="Print the memory model (weights, KV cache, scratch of a forward pass) at "
                        "several contexts, and the default context that fits in this machine's available memory.")
    src = mm.add_mutually_exclusive_group()
    src.add_argument("-m", "--model", metavar="DIR", help="a converted model directory (its params.json)")
    src.add_argument("--shape", default="llama3.2-1b", help="a released shape instead (default llama3.2-1b; "
                     "llama3-8b, llama3.1-8b, llama3.1-70b, ...)")
    mm.add_argument("--ctx", default="8192,32768,131072", help="context lengths, comma-separated")
    mm.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    mm.add_argument("--weights", choices=["resident", "tiled"], default="resident")
    mm.add_argument("--batch", type=int, default=1)
    mm.set_defaults(func=cmd_memory)

    b = sub.add_parser("bench", help="prefill/decode speed on random weights at real shapes",
                       description="Build (once, cached) a random-weight bf16 checkpoint at a real shape and "
                       "report prefill tok/s for a 128-token prompt (pp128), decode tok/s over 32 tokens (tg32), "
                       "load time and peak RSS, with median and range over repetitions.")
    b.add_argument("--shape", default="tiny", choices=["tiny", "llama3.2-1b", "llama3.2-3b", "llama3-8b"])
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    b.add_argument("--weights", choices=["auto", "resident", "tiled"], default="auto")
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--vs", action="append", metavar="PEER", help="also run PEER on the same weights: torch")
    b.add_argument("--llama-bench", metavar="PATH", help="also run llama.cpp's llama-bench program PATH on a GGUF "
                   "export of the same weights, its repetitions interleaved with npllama's")
    b.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0"], help="the GGUF llama-bench runs on "
                   "(default: f32, or bf16 when npllama holds the weights tiled)")
    b.add_argument("--bound", action="store_true", help="measure bandwidth (every core streaming) and GEMM "
                   "rate; print the limits and each implementation's share")
    b.add_argument("--workdir", help="where the checkpoints are cached (default: the npllama cache /bench)")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)
    from .serve.cli import add_parser as add_serve_parser
    add_serve_parser(sub, add_model_args, open_model)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except NpllamaError as e:  # anything else is a bug, and keeps its traceback
        print(f"npllama: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `npllama compare a b | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
