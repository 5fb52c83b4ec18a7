"""The `npllama` command line."""
from __future__ import annotations

import argparse
import sys

from .errors import NpllamaError, UsageError


def cmd_convert(a) -> int:
    from .convert import convert
    index = convert(a.src, a.dst, dtype=a.dtype, force=a.force,
                    shard_bytes=int(a.shard_size * 1024**3) if a.shard_size else None, quiet=a.quiet)
    print(f"wrote {a.dst}: {len(index['tensors'])} tensors in {len(index['shards'])} shard(s)", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    import json
    from collections import Counter
    from .checkpoint import nonfinite, open_tensors, read_checked, verify
    from .hub import resolve_model
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
    from .tokenizer import TokenizerError, load as load_tokenizer
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
    from .config import runtime_context
    print(f"trained context: {args.max_seq_len} tokens; runs at {runtime_context(args)} by default (--ctx)")


def open_model(a):
    """The model directory named by -m (or the default model), loaded, with its tokenizer."""
    import npllama
    from .generate import Generator
    from .tokenizer import load as load_tokenizer
    from .checkpoint import read_checked
    from .hub import default_model, resolve_model
    if a.ctx is not None and a.ctx <= 0:
        raise UsageError(f"--ctx must be a positive number of tokens, got {a.ctx}")
    path = default_model() if a.model is None else resolve_model(a.model)
    trained = read_checked(path)[0].max_seq_len
    if a.ctx is not None and a.ctx > trained and not a.force_ctx:
        raise UsageError(f"--ctx {a.ctx} is longer than the {trained} tokens this model was trained for; "
                         "add --force-ctx to run it anyway (quality degrades past the trained context)")
    if a.stages is not None and a.ray is None:
        raise UsageError("--stages goes with --ray (local, or the address of a Ray cluster)")
    if a.ray is not None:
        from .distributed import load as load_pipeline
        model = load_pipeline(path, a.stages, a.ray, dtype=a.dtype, max_seq_len=a.ctx, weights_mode=a.weights_mode)
        print("\n".join(model.describe()), file=sys.stderr)
    else:
        model = npllama.load(path, dtype=a.dtype, max_seq_len=a.ctx, weights_mode=a.weights_mode)
    return Generator(model, load_tokenizer(path))


def encode_prompt(tok, text: str) -> list[int]:
    """A raw prompt's tokens; an empty one (with no begin-of-text token to start from) is an error."""
    tokens = tok.encode(text, bos=tok.add_bos)
    if not tokens:
        raise UsageError("the prompt is empty and this model adds no begin-of-text token: give some text")
    return tokens


def sampling_params(a):
    from .generate import SamplingParams
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed)


def cmd_generate(a) -> int:
    from .tokenizer import chat_format
    gen = open_model(a)
    sampling = sampling_params(a)  # validated before any work
    tok = gen.tokenizer
    if a.chat is False and a.system is not None:
        raise UsageError("--system fills the chat format's system message; it does not go with --raw")
    use_chat = a.chat if a.chat is not None else tok.chat_default or a.system is not None
    if use_chat:
        system = [{"role": "system", "content": a.system}] if a.system is not None else []
        prompt = chat_format(tok, tok.default_system).encode_dialog_prompt(
            system + [{"role": "user", "content": a.prompt}])
    else:
        prompt = encode_prompt(tok, a.prompt)
        sys.stdout.write(a.prompt)
    for piece, _, _ in gen.stream(prompt, a.max_new_tokens, sampling, stop_strings=a.stop or ()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(gen.timings.line(), file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from .tokenizer import chat_format
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
    from . import tracing as tr
    from .atomic import check_file
    check_file(a.output, "trace")   # before the model runs
    layers = parse_layers(a.layers)
    gen = open_model(a)
    bad = [i for i in layers or [] if not 0 <= i < gen.model.args.n_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} does not exist (the model has {gen.model.args.n_layers})")
    t = tr.trace(gen.model, encode_prompt(gen.tokenizer, a.prompt), layers)
    t["__meta__"]["prompt"] = a.prompt
    tr.save(a.output, t)
    print(f"wrote {a.output}: {len(t) - 1} tensors for {len(t['tokens'])} tokens", file=sys.stderr)
    return 0


def cmd_compare(a) -> int:
    from . import tracing as tr
    ok, first, _ = tr.compare(tr.load(a.a), tr.load(a.b), rtol=a.rtol, atol=a.atol, ulps=a.ulps, out=sys.stdout)
    return 0 if ok else 1


def cmd_golden(a) -> int:
    from .golden import check_destination, write_golden
    check_destination(a.output, a.force)   # before the model runs
    gen = open_model(a)
    write_golden(gen, a.output, a.prompt, a.max_new_tokens, force=a.force)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    from .bench import main as bench_main
    return bench_main(a)


def add_model_args(p):
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
    p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length in tokens (default: the "
                   "context the model was trained for, at most 8192)")
    p.add_argument("--force-ctx", action="store_true", help="allow --ctx beyond the model's trained context")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--max-new-tokens", type=int, default=256)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
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
    g.add_argument("prompt")
    add_model_args(g)
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
    ch.add_argument("--system", help="system prompt")
    ch.set_defaults(func=cmd_chat)

    t = sub.add_parser("trace", help="record every intermediate of a forward pass",
                       description="Run the prompt through the model and save every intermediate (names in the "
                       "README's Trace format) to an .npz.")
    t.add_argument("prompt")
    t.add_argument("-o", "--output", required=True, help="the .npz to write")
    t.add_argument("--layers", help="only these layers, e.g. 0,1,31 (default all)")
    add_model_args(t)
    t.set_defaults(func=cmd_trace)

    cp = sub.add_parser("compare", help="compare two traces, tensor by tensor, in forward order",
                        description="Print max abs error, max relative error (to the largest |B|) and bf16 ulps per "
                        "shared tensor; mark the first outside tolerance; exit 1 if any is.")
    cp.add_argument("a")
    cp.add_argument("b", help="the reference")
    cp.add_argument("--rtol", type=float, default=1e-4, help="tolerance relative to max |B| (default 1e-4)")
    cp.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (default 1e-6)")
    cp.add_argument("--ulps", type=float, default=None, help="instead: tolerance in bf16 ulps at max |B|")
    cp.set_defaults(func=cmd_compare)

    gd = sub.add_parser("golden", help="write a golden-vector bundle for other implementations' tests",
                        description="Write tokens, selected intermediates, logits and a greedy continuation as "
                        "plain .npy/.json files, with a README, into a directory.")
    gd.add_argument("-o", "--output", required=True, help="the bundle directory")
    gd.add_argument("--prompt", default="The answer to the ultimate question of life, the universe, and everything is")
    gd.add_argument("--force", action="store_true", help="replace an existing bundle npllama wrote (anything "
                   "else is refused and left untouched)")
    add_model_args(gd)
    gd.set_defaults(func=cmd_golden, max_new_tokens=32)

    b = sub.add_parser("bench", help="prefill/decode speed on random weights at real shapes",
                       description="Build (once, cached) a random-weight bf16 checkpoint at a real shape and "
                       "report prefill tok/s for a 128-token prompt (pp128), decode tok/s over 32 tokens (tg32), "
                       "load time and peak RSS, with median and range over repetitions.")
    b.add_argument("--shape", default="tiny", choices=["tiny", "llama3.2-1b", "llama3.2-3b", "llama3-8b"])
    b.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    b.add_argument("--weights", choices=["auto", "resident", "tiled"], default="auto")
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--vs", action="append", metavar="PEER", help="also run PEER on the same weights: torch")
    b.add_argument("--bound", action="store_true", help="measure bandwidth and GEMM rate; print the limits")
    b.add_argument("--workdir", help="where the checkpoints are cached (default: the npllama cache /bench)")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)
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
