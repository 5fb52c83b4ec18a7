#!/usr/bin/env python3
"""The measurements behind the README's "Scaling out".

    python tools/bench_scale.py stream --shape llama3-8b --store float32 --tokens 4
    python tools/bench_scale.py layer --shape llama3.2-1b --weights tiled --reps 20
    python tools/bench_scale.py hop --stages 2 --tokens 24
    python tools/bench_scale.py plan --model llama3.1-70b --stages 2 --ctx 8192 --ms-per-gb 200 --hop-ms 3

stream: a model larger than memory. Builds (once, cached, as `npllama bench` does) random
weights at the shape stored as --store, opens them with --weights (default tiled: what auto
picks when the float32 copies do not fit), prefills --prompt tokens and decodes --tokens.
Per token: seconds, and the bytes this process had read from disk (/proc/self/io
read_bytes; /proc/vmstat pgpgin, the whole machine's, beside it); then the peak RSS (VmHWM)
and the anonymous (arrays) and file-backed (mapped weights) parts of the RSS at the end.

layer: one layer's decode step (one token at position --pos) alone, median over --reps,
for the first, a middle and the last layer, and the final norm with the head: the time a
pipeline's stages add up, per byte of weights, to scale to other shapes.

hop: the default model (SmolLM2) decoding token by token in one process and, alternately,
as --stages Ray actors on this machine: the difference per token is what the pipeline's
object passing and actor calls cost here (no network).

plan: a capacity plan on paper for a released shape (bf16 weights, npllama's float32 KV
cache): the stages split_layers makes, each one's weights and KV cache at --ctx tokens, the
bytes that cross between stages per token, and the decode latency that --ms-per-gb (a
measured `layer` figure: milliseconds per GB of a layer's weights) and --hop-ms (a measured
`hop` figure, per stage) give, plus --link-gbps for the hidden states on the wire.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import npllama  # noqa: E402
from npllama.bench.peers import build  # noqa: E402
from npllama.io.hub import cache_dir  # noqa: E402
from tools.bench_limits import median_time  # noqa: E402


def proc_value(path: str, key: str) -> int:
    """A number from a /proc file of `key value [kB]` lines, in bytes for kB."""
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    raise KeyError(key)


def read_bytes() -> tuple[int, int]:
    """(bytes this process caused to be read from storage, KB the machine paged in)."""
    return proc_value("/proc/self/io", "read_bytes:"), proc_value("/proc/vmstat", "pgpgin ")


def median_range(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def checkpoint(a) -> str:
    return build(a.shape, a.workdir or os.path.join(cache_dir(), "bench"), quiet=True, store=a.store)


def stream(a) -> dict:
    path = checkpoint(a)
    stored = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".npz"))
    t0 = time.perf_counter()
    model = npllama.load(path, weights_mode=a.weights, max_seq_len=a.prompt + a.tokens)
    load_s = time.perf_counter() - t0
    tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, a.prompt + a.tokens)
    steps = []
    for i in range(a.tokens + 1):
        start, n = (0, a.prompt) if i == 0 else (a.prompt + i - 1, 1)
        (r0, p0), t0 = read_bytes(), time.perf_counter()
        model.forward(tokens[start:start + n], start_pos=start, last_only=True)
        dt = time.perf_counter() - t0
        r1, p1 = read_bytes()
        steps.append({"seconds": dt, "read_bytes": r1 - r0, "pgpgin_bytes": (p1 - p0) * 1024})
        s = steps[-1]
        print(f"{'prefill ' + str(n) + ' tokens' if i == 0 else 'token ' + str(i):>18}: {dt:8.2f} s, read "
              f"{s['read_bytes'] / 1e9:6.2f} GB ({s['read_bytes'] / dt / 1e6:6.0f} MB/s; machine "
              f"{s['pgpgin_bytes'] / dt / 1e6:6.0f} MB/s)", flush=True)
    decode = steps[1:]
    out = {"shape": a.shape, "store": a.store, "weights_mode": model.weights_mode, "stored_bytes": stored,
           "mem_total": proc_value("/proc/meminfo", "MemTotal:"), "load_s": load_s, "steps": steps,
           "decode_s_per_token": statistics.median(d["seconds"] for d in decode),
           "decode_read_Bps": sum(d["read_bytes"] for d in decode) / sum(d["seconds"] for d in decode),
           "peak_rss": proc_value("/proc/self/status", "VmHWM:"),
           "rss_anon": proc_value("/proc/self/status", "RssAnon:"),
           "rss_file": proc_value("/proc/self/status", "RssFile:")}
    print(f"{a.shape} stored {a.store}: {stored / 1e9:.1f} GB of weights, {out['mem_total'] / 1e9:.1f} GB of memory, "
          f"weights {model.weights_mode}; load {load_s:.2f} s")
    print(f"decode: {median_range([d['seconds'] for d in decode])} s/token, reading "
          f"{out['decode_read_Bps'] / 1e6:.0f} MB/s from disk")
    print(f"peak RSS {out['peak_rss'] / 1e9:.2f} GB; at the end {out['rss_anon'] / 1e9:.2f} GB anonymous (arrays), "
          f"{out['rss_file'] / 1e9:.2f} GB file pages (the mapped weights)")
    return out


def layer(a) -> dict:
    from npllama.io.checkpoint import open_tensors, read_checked
    from npllama.model.model import Transformer
    from npllama.model.weights import held_names
    path = checkpoint(a)
    args, index = read_checked(path)
    tied = "output.weight" not in index["tensors"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, args.dim)).astype(np.float32)
    per_layer = {}
    for i in sorted({0, args.n_layers // 2, args.n_layers - 1}):
        # A stage of this one layer (and the head, for the last): only its tensors are mapped,
        # so the 8B shape stored float32 is measured a layer (0.9 GB) at a time.
        held = range(i, i + 1)
        model = Transformer(args, open_tensors(path, index, held_names(args, held, tied)), a.dtype,
                            a.pos + 1, 1, a.weights, layers=held)
        model.forward_layers(rng.standard_normal((1, a.pos, args.dim)).astype(np.float32), 0, i, i + 1)   # its cache
        model.forward_layers(x, a.pos, i, i + 1)                      # warm: weights read, compute forms made
        per_layer[i] = median_time(lambda: model.forward_layers(x, a.pos, i, i + 1), a.reps)
    model.head(x)
    head = median_time(lambda: model.head(x), a.reps)
    layer_bytes = sum(model.weights[n].nbytes for n in model.weights if n.startswith(f"layers.{i}."))
    head_bytes = model.weights[model.output].nbytes
    s = statistics.median(per_layer.values())
    out = {"shape": a.shape, "store": a.store, "dtype": a.dtype, "weights_mode": model.weights_mode, "pos": a.pos,
           "layer_s": per_layer, "layer_bytes": layer_bytes, "head_s": head, "head_bytes": head_bytes,
           "s_per_GB": s / (layer_bytes / 1e9)}
    print(f"{a.shape} stored {a.store}, {a.dtype} numerics, weights {model.weights_mode}, decode at position {a.pos}")
    for i, t in per_layer.items():
        print(f"  layer {i:>3}: {t * 1e3:8.2f} ms")
    print(f"  one layer {layer_bytes / 1e6:.0f} MB of weights: {s * 1e3:.2f} ms, {out['s_per_GB'] * 1e3:.1f} ms per GB; "
          f"norm + head {head_bytes / 1e6:.0f} MB: {head * 1e3:.2f} ms")
    return out


def hop(a) -> dict:
    from npllama.run import distributed
    from npllama.io import hub
    path = hub.default_model()
    distributed.connect("local")
    ctx = 64 + a.tokens
    one = npllama.load(path, max_seq_len=ctx)
    with distributed.Pipeline(path, a.stages, max_seq_len=ctx) as pipe:
        prompt = np.random.default_rng(0).integers(0, one.args.vocab_size, 64)
        one.forward(prompt)
        pipe.forward(prompt)
        t_one, t_pipe = [], []
        for i in range(a.tokens):
            tok = prompt[i:i + 1]
            for model, ts in ((one, t_one), (pipe, t_pipe)):
                t0 = time.perf_counter()
                model.forward(tok, start_pos=64 + i, last_only=True)
                ts.append(time.perf_counter() - t0)
    diff = [p - o for p, o in zip(t_pipe, t_one)]
    out = {"stages": a.stages, "one_s": t_one, "pipeline_s": t_pipe, "extra_s_per_token": statistics.median(diff)}
    print(f"SmolLM2 decode, one process: {median_range(t_one)} s/token; {a.stages} stages on Ray: "
          f"{median_range(t_pipe)} s/token; the pipeline adds {median_range(diff)} s per token "
          f"({a.stages + 1} transfers: driver, stages, driver)")
    return out


def plan(a) -> dict:
    from npllama.model.config import preset
    from npllama.run.distributed import split_layers
    from npllama.model.weights import expected_shapes, held_names
    args = preset(a.model)
    nbytes = {name: int(np.prod(s)) * 2 for name, s in expected_shapes(args).items()}      # bf16
    kv_per_token_layer = 2 * args.n_kv_heads * args.head_dim * 4                          # k and v, float32
    hidden, logits = args.dim * 4, args.vocab_size * 4                                   # float32, per token
    stages, total_s = [], 0.0
    for r in split_layers(args, nbytes, a.stages):
        names = held_names(args, r, False)
        layer_bytes = sum(nbytes[n] for n in names if n.startswith("layers."))
        weights = sum(nbytes[n] for n in names)
        kv = len(r) * kv_per_token_layer * a.ctx
        # every weight is read once per decoded token but the embedding table (a row is
        # gathered): a stage's decode time scales with the bytes it reads
        read = weights - (nbytes["tok_embeddings.weight"] if r.start == 0 else 0)
        seconds = read / 1e9 * a.ms_per_gb / 1e3
        total_s += seconds
        stages.append({"layers": [r.start, r.stop - 1], "weights_GB": weights / 1e9, "kv_GB": kv / 1e9,
                       "seconds": seconds, "layer_GB": layer_bytes / len(r) / 1e9})
        print(f"stage layers {r.start:>3}..{r.stop - 1:<3} ({len(r):>2}): weights {weights / 1e9:6.1f} GB + KV cache "
              f"{kv / 1e9:5.2f} GB at {a.ctx} tokens = {(weights + kv) / 1e9:6.1f} GB; decode {seconds:6.2f} s/token")
    wire = ((a.stages - 1) * hidden + logits) / (a.link_gbps * 1e9 / 8)  # the logits, if the driver is elsewhere
    latency = total_s + a.stages * a.hop_ms / 1e3 + wire
    print(f"{a.model}: {sum(nbytes.values()) / 1e9:.1f} GB bf16 in {a.stages} stages; a layer {stages[0]['layer_GB']:.2f} "
          f"GB; per token between stages {hidden / 1024:.0f} KB of hidden states (a T-token prompt: T times that), "
          f"{logits / 1024:.0f} KB of logits back to the driver")
    print(f"decode latency, one sequence: {total_s:.1f} s of layers and head + {a.stages} x {a.hop_ms} ms of hops + "
          f"{wire * 1e3:.2f} ms on a {a.link_gbps:g} Gb/s link = {latency:.1f} s/token")
    return {"model": a.model, "stages": stages, "hidden_bytes": hidden, "logits_bytes": logits,
            "latency_s": latency}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name, fn in (("stream", stream), ("layer", layer), ("hop", hop), ("plan", plan)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--json", help="also write the results here")
        if name in ("stream", "layer"):
            s.add_argument("--shape", default="tiny", choices=["tiny", "llama3.2-1b", "llama3.2-3b", "llama3-8b"])
            s.add_argument("--store", default="bfloat16", choices=["bfloat16", "float32"])
            s.add_argument("--weights", default="tiled", choices=["auto", "resident", "tiled"])
            s.add_argument("--workdir", help="where the checkpoints are cached (default: the npllama cache /bench)")
    sub.choices["stream"].add_argument("--prompt", type=int, default=4)
    sub.choices["stream"].add_argument("--tokens", type=int, default=4)
    sub.choices["layer"].add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    sub.choices["layer"].add_argument("--pos", type=int, default=128)
    sub.choices["layer"].add_argument("--reps", type=int, default=20)
    sub.choices["hop"].add_argument("--stages", type=int, default=2)
    sub.choices["hop"].add_argument("--tokens", type=int, default=24)
    pl = sub.choices["plan"]
    pl.add_argument("--model", default="llama3.1-70b", choices=["llama3.1-8b", "llama3.1-70b", "llama3.1-405b"])
    pl.add_argument("--stages", type=int, default=2)
    pl.add_argument("--ctx", type=int, default=8192)
    pl.add_argument("--ms-per-gb", type=float, required=True, help="from `layer`: decode ms per GB of weights")
    pl.add_argument("--hop-ms", type=float, default=0.0, help="from `hop`: what a stage adds per token")
    pl.add_argument("--link-gbps", type=float, default=10.0)
    a = p.parse_args()
    out = a.fn(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
