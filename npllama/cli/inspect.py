"""`npllama trace`, `compare`, `plot`, `golden` and `perplexity`: looking inside a model and
measuring it against others."""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from ..errors import UsageError
from ..inspect import llamacpp, logits, perplexity as pp, plot, tracefile
from ..inspect.compare import compare
from ..inspect.golden import check_destination, write_golden
from ..inspect.namemaps import MAPS
from ..io.atomic import check_file
from ..io.atomic import refuse_overlap
from .common import (add_model_args, add_token_args, at_least, encode_prompt, open_model, piece, prompt_or_tokens,
                     refuse_output_in_inputs, token_ids, utf8)


def add_parser(sub) -> None:
    for add in (add_trace, add_compare, add_plot, add_golden, add_perplexity):
        add(sub)


def add_trace(sub) -> None:
    t = sub.add_parser("trace", help="record every intermediate of a forward pass",
                       description="Run the prompt through the model and save every intermediate (names in the "
                       "README's Trace format) to an .npz.")
    t.add_argument("prompt", nargs="?", type=utf8)
    t.add_argument("-o", "--output", required=True, help="the .npz to write")
    t.add_argument("--layers", help="only these layers, e.g. 0,1,31 (default all)")
    t.add_argument("--no-scores", action="store_true", help="leave out the (n_heads, T, T) scores and probs "
                   "(kept, they may take at most 2 GiB)")
    add_chunks_arg(t)
    add_model_args(t)
    add_token_args(t)
    t.set_defaults(func=cmd_trace)


def add_chunks_arg(p) -> None:
    p.add_argument("--chunks", type=parse_chunks, default=None, metavar="N,N,...",
                   help="run the prompt as KV-cache calls of these lengths, then one token a call (e.g. 3,1,1); "
                   "every intermediate is recorded at its absolute position (default: one pass)")


def parse_chunks(spec: str) -> list[int]:
    try:
        chunks = [int(x) for x in spec.split(",")]
    except ValueError:
        chunks = []
    if not chunks or min(chunks) < 1:
        raise argparse.ArgumentTypeError(f"takes positive chunk lengths separated by commas, e.g. 3,1,1; got {spec!r}")
    return chunks


def tolerance(text: str) -> float:
    """A tolerance: a finite number >= 0 (NaN or inf would make every comparison pass)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"takes a finite number >= 0, got {text!r:.40}")
    return v


def add_compare(sub) -> None:
    cp = sub.add_parser("compare", help="compare two traces, tensor by tensor, in forward order",
                        description="Print max abs error, max relative error (to the largest |B|) and bf16 ulps per "
                        "shared tensor; mark the first outside tolerance; exit 1 if any is. A or B may be a "
                        "saved-logits file (llama-perplexity's or npllama perplexity's --kl-divergence-base): then "
                        "the log-probabilities are compared at the positions both hold, chunk by chunk. One may be a "
                        "llama-eval-callback dump (its text, or gzipped): its printed values and sums are "
                        "compared with the other, a trace, within --rtol of each tensor's scale.")
    cp.add_argument("a", help="a trace (.npz), golden bundle directory, saved-logits file or eval-callback dump")
    cp.add_argument("b", help="the reference, likewise")
    cp.add_argument("--rtol", type=tolerance, default=1e-4, help="tolerance relative to max |B| (default 1e-4)")
    cp.add_argument("--atol", type=tolerance, default=1e-6, help="absolute tolerance (default 1e-6)")
    cp.add_argument("--ulps", type=tolerance, default=None, help="instead: tolerance in bf16 ulps at max |B|")
    cp.add_argument("--allow-missing", action="store_true", help="pass although tensors of the reference are "
                    "missing from A (default: fail, naming them)")
    cp.add_argument("--allow-unknown", action="store_true", help="pass although a trace holds names its name map "
                    "does not know (default: fail, naming them)")
    cp.add_argument("--names-a", choices=sorted(MAPS), default=None, help="the naming of A's tensors (default: "
                    "its __meta__ \"names\", else npllama's)")
    cp.add_argument("--names-b", choices=sorted(MAPS), default=None, help="the naming of B's tensors, likewise")
    cp.add_argument("--plot", metavar="PNG", help="also draw the error of every tensor along the layers "
                    "(needs matplotlib: pip install 'npllama[plot]')")
    cp.set_defaults(func=cmd_compare)


def add_plot(sub) -> None:
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


def add_golden(sub) -> None:
    gd = sub.add_parser("golden", help="write a golden-vector bundle for other implementations' tests",
                        description="Write tokens, selected intermediates, logits and a greedy continuation as "
                        "plain .npy/.json files, with a README, into a directory.")
    gd.add_argument("prompt", nargs="?", type=utf8, help="the prompt (default: a fixed English sentence)")
    gd.add_argument("-o", "--output", required=True, help="the bundle directory")
    gd.add_argument("--prompt", dest="prompt_option", type=utf8, metavar="PROMPT", help="the same as PROMPT (as "
                    "earlier versions took it)")
    gd.add_argument("--force", action="store_true", help="replace an existing bundle npllama wrote (anything "
                    "else is refused and left untouched)")
    gd.add_argument("--max-new-tokens", type=at_least(0), default=32,
                    help="length of the greedy continuation (default 32)")
    add_model_args(gd)
    add_token_args(gd)
    add_chunks_arg(gd)
    gd.set_defaults(func=cmd_golden)


def add_perplexity(sub) -> None:
    pp_ = sub.add_parser("perplexity", help="perplexity and KL divergence, exactly as llama.cpp's llama-perplexity",
                         description="llama-perplexity's method: tokenize the text, cut it into chunks of -c tokens, "
                         "score the second half of each. Prints the PPL after each chunk and the final estimate "
                         "with its uncertainty; progress and tokens/s go to stderr. --kl-divergence-base writes "
                         "the logits in llama.cpp's base-file format; --kl-divergence reads one (from llama.cpp or "
                         "npllama) and prints llama.cpp's KL statistics.")
    pp_.add_argument("-f", "--file", help="the text to score (UTF-8)")
    pp_.add_argument("-c", "--ctx-size", dest="n_ctx", type=at_least(1), default=None, metavar="N",
                     help="tokens per chunk (default 512; with --kl-divergence, the base file's)")
    pp_.add_argument("-b", "--batch", type=int, default=None, metavar="N",
                     help="tokens per forward pass (default: one chunk); below -c a chunk is fed in pieces, a "
                     "multiple of -c runs that many chunks together")
    pp_.add_argument("--chunks", type=at_least(1), default=None, metavar="N", help="score only the first N chunks")
    kl = pp_.add_mutually_exclusive_group()
    kl.add_argument("--kl-divergence-base", metavar="FILE", help="also write the logits to FILE in "
                    "llama-perplexity's --kl-divergence-base format")
    kl.add_argument("--kl-divergence", metavar="FILE", help="compare against the base file FILE: llama.cpp's "
                    "KL divergence, PPL ratio and top-token statistics")
    pp_.add_argument("--json", action="store_true", help="one JSON object per chunk, then one with the result")
    add_model_args(pp_, ctx=False)
    add_token_args(pp_)
    pp_.set_defaults(func=cmd_perplexity)


def parse_layers(spec: str | None):
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers takes comma-separated layer numbers, got {spec!r}") from None


def cmd_trace(a) -> int:
    check_file(a.output, "trace")   # before the model runs
    refuse_output_in_inputs(a, a.output, "trace")
    layers = parse_layers(a.layers)
    gen = open_model(a)
    refuse_overlap(a.output, [getattr(gen.model, "path", None)], "trace")   # the converted folder -m resolved to
    bad = [i for i in layers or [] if not 0 <= i < gen.model.args.n_layers]
    if bad:
        raise UsageError(f"--layers: layer {bad[0]} does not exist (the model has {gen.model.args.n_layers})")
    tok = gen.tokenizer
    text, ids = prompt_or_tokens(a, gen)
    ids = ids if ids is not None else encode_prompt(tok, text)
    t = tracefile.trace(gen.model, ids, layers, scores=not a.no_scores, chunks=a.chunks)
    t["__meta__"]["prompt"] = text
    t["__meta__"]["pieces"] = [piece(tok, i) for i in ids]   # token text, for `npllama plot`'s axes
    tracefile.save(a.output, t)
    print(f"wrote {a.output}: {len(t) - 1} tensors for {len(t['tokens'])} tokens", file=sys.stderr)
    # NaN anywhere (masked scores are -inf by design), or non-finite logits: kept, to show
    # where it starts, but not a trace to compare against
    bad = next((n for n, v in t.items() if n != "__meta__" and np.issubdtype(np.asarray(v).dtype, np.floating)
                and (np.isnan(v).any() or n == "logits" and not np.isfinite(v).all())), None)
    if bad is not None:
        print(f"npllama: the trace holds non-finite values, first at {bad}; the weights may hold a NaN or "
              f"infinity (`npllama info DIR --verify`)", file=sys.stderr)
        return 1
    return 0


def cmd_compare(a) -> int:
    dumps = [llamacpp.read_dump(p) for p in (a.a, a.b)]
    is_logits = [logits.is_logits_file(p) for p in (a.a, a.b)]
    if any(d is not None for d in dumps) and any(is_logits):
        raise UsageError("a llama-eval-callback dump compares only with a trace, not with a saved-logits file")
    if any(is_logits):
        return compare_logits(a)
    if any(d is not None for d in dumps):
        return compare_dump(a, dumps)
    if a.plot:
        refuse_overlap(a.plot, [a.a, a.b], "plot")
    ok, first, rows = compare(tracefile.load(a.a), tracefile.load(a.b), rtol=a.rtol, atol=a.atol, ulps=a.ulps,
                              out=sys.stdout, names_a=a.names_a, names_b=a.names_b, allow_missing=a.allow_missing,
                              allow_unknown=a.allow_unknown)
    if a.plot:
        plot.comparison(rows, a.plot, title=f"{a.a} vs {a.b}", rtol=None if a.ulps is not None else a.rtol)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0 if ok else 1


def compare_logits(a) -> int:
    """compare with a saved-logits file on either side: log-probabilities, not tensors."""
    if a.plot:
        raise UsageError("--plot draws the error of each tensor; a saved-logits file holds log-probabilities only")
    rep = logits.compare_logits(logits.load_side(a.a, a.names_a), logits.load_side(a.b, a.names_b), rtol=a.rtol,
                                atol=a.atol, ulps=a.ulps, allow_missing=a.allow_missing, out=sys.stdout)
    return 0 if rep.ok else 1


def compare_dump(a, dumps: list) -> int:
    """compare with a llama-eval-callback dump on one side and a trace on the other."""
    if all(d is not None for d in dumps) or a.plot:
        raise UsageError("a llama-eval-callback dump compares with a trace (and draws no --plot)")
    if a.ulps is not None:
        raise UsageError("--ulps: a llama-eval-callback dump prints 4 decimals, so dumps compare by relative error "
                         "(--rtol, --atol)")
    i = 0 if dumps[0] is not None else 1
    if (a.names_a, a.names_b)[i] not in (None, "llamacpp"):
        raise UsageError(f"--names-{'ab'[i]}: the dump's names are llama.cpp's (the llamacpp name map)")
    path, other = (a.a, a.b)[i], (a.a, a.b)[1 - i]
    ok, _, _ = llamacpp.compare_dump(llamacpp.parse(dumps[i], path), tracefile.load(other), a.rtol, out=sys.stdout,
                                     allow_missing=a.allow_missing, atol=a.atol,
                                     allow_unknown=a.allow_unknown, names=(a.names_a, a.names_b)[1 - i])
    return 0 if ok else 1


def cmd_plot(a) -> int:
    refuse_overlap(a.output, [a.trace], "image")
    plot.attention(tracefile.load(a.trace), a.layer, a.output, head=a.head, what=a.what, source=a.trace)
    print(f"wrote {a.output}", file=sys.stderr)
    return 0


def cmd_golden(a) -> int:
    if a.prompt is not None and a.prompt_option is not None:
        raise UsageError("give the prompt once: as PROMPT or as --prompt")
    prompt = a.prompt if a.prompt is not None else a.prompt_option
    refuse_output_in_inputs(a, a.output, "golden bundle")   # whatever --force says
    check_destination(a.output, a.force)   # before the model runs
    gen = open_model(a)
    ids = token_ids(a, gen)
    if ids is not None and prompt is not None:
        raise UsageError("give a prompt or --tokens/--tokens-file, not both")
    write_golden(gen, a.output, prompt, a.max_new_tokens, force=a.force, tokens=ids, chunks=a.chunks)
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
    base = pp.BaseFile.open(a.kl_divergence) if a.kl_divergence else None
    if base is not None and a.n_ctx is not None and a.n_ctx != base.n_ctx:
        raise UsageError(f"-c {a.n_ctx}: {a.kl_divergence} was made with -c {base.n_ctx}")
    n_ctx = base.n_ctx if base is not None else (a.n_ctx or 512)
    if a.kl_divergence_base:
        refuse_output_in_inputs(a, a.kl_divergence_base, "KL-divergence base file", a.file)
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
