#!/usr/bin/env python3
"""Quantized GGUFs: speed, where a decode token's time goes, and peak RSS.

    python tools/bench_quant.py speed --shape llama3.2-1b --reps 3 --llama-bench BIN [--llama-quantize BIN]
    python tools/bench_quant.py budget FILE.gguf
    python tools/bench_quant.py rss FILE.gguf --ctx 256 --new 2

speed: prefill (pp128) and decode (tg32) tok/s of npllama on one random-weight model at a
real shape held four ways (float32 resident and bf16 tiled from the bench's bf16 checkpoint;
--weights quantized on its Q8_0 and Q4_K_M GGUFs) and of llama-bench on the same GGUFs, one
repetition of each in turn, each npllama run in a fresh process (so each has the machine's
memory to itself). Q8_0 is tools/export_gguf.py's export of the bf16 weights; Q4_K_M is
llama-quantize's of their F16 export when --llama-quantize is given, else random Q4_K blocks
with a Q6_K head (tools/random_gguf.py: the same sizes and kernels, other values).
budget: one decode token's matrices, tile by tile on one thread as the tiled matmul takes
them: the time to read the blocks (a copy), to widen them to float32, and the GEMV.
rss: a prompt of 16 tokens and `--new` decoded ones, quantized; peak RSS against the file's
size + the KV cache + 1 GiB.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import npllama  # noqa: E402
from npllama.bench import peers  # noqa: E402
from npllama.io.hub import cache_dir  # noqa: E402
from npllama.model import parallel, tiled  # noqa: E402
from npllama.model.quant import PARTS, pad_q8_0  # noqa: E402
from tools.random_gguf import write as write_random_gguf  # noqa: E402

GiB = 2**30


def q4_k_m(root: str, shape: str, bf16_dir: str, quantize: str | None) -> str:
    """The Q4_K_M GGUF of the bench (made once): llama-quantize's, or random blocks."""
    out = os.path.join(root, f"{shape}-q4_k_m{'' if quantize else '-random'}.gguf")
    if not os.path.isfile(out):
        if quantize:
            f16 = peers.export_gguf(bf16_dir, root, shape, "f16")
            subprocess.run([quantize, f16, out, "Q4_K_M"], check=True, capture_output=True)
        else:
            write_random_gguf(out, peers.shape_args(shape), "Q4_K", types={"output.weight": "Q6_K"})
    return out


def one_run(path: str, mode: str, threads: int) -> dict:
    """One repetition of npllama in a fresh process (`speed` calls this script's `one`)."""
    r = subprocess.run([sys.executable, __file__, "one", path, mode, "-t", str(threads)], capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"npllama {mode} on {path} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def speed(a) -> None:
    root = a.workdir
    bf16_dir = peers.build(a.shape, root, quiet=True)
    q8 = peers.export_gguf(bf16_dir, root, a.shape, "q8_0")
    q4 = q4_k_m(root, a.shape, bf16_dir, a.llama_quantize)
    runs = {"npllama float32 (resident)": (bf16_dir, "resident"), "npllama bf16 (tiled)": (bf16_dir, "tiled"),
            "npllama Q8_0 (quantized)": (q8, "quantized"), "npllama Q4_K_M (quantized)": (q4, "quantized")}
    llama = {f"llama.cpp {t}": peers.LlamaBench(a.llama_bench, p, t.lower(), a.threads)
             for t, p in (("Q8_0", q8), ("Q4_K_M", q4))} if a.llama_bench else {}
    samples = {name: {"pp": [], "tg": []} for name in runs}
    for rep in range(a.reps):
        for name, (path, mode) in runs.items():
            r = one_run(path, mode, a.threads)
            samples[name]["pp"] += [r["pp"]["median"]]
            samples[name]["tg"] += [r["tg"]["median"]]
            print(f"rep {rep + 1}: {name}: pp128 {r['pp']['median']:.2f} tg32 {r['tg']['median']:.2f}",
                  file=sys.stderr, flush=True)
        for bench in llama.values():
            bench()
    results = {name: {k: peers.summary(v) for k, v in s.items()} for name, s in samples.items()}
    results.update({name: {"pp": peers.summary(b.pp), "tg": peers.summary(b.tg)} for name, b in llama.items()})
    table(results, {"Q8_0": q8, "Q4_K_M": q4})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "machine": peers.machine(), "results": results}, f, indent=1)


def table(results: dict, files: dict) -> None:
    fmt = lambda s: f"{s['median']:8.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    print(f"{'':<30} {'pp128 tok/s':>22} {'tg32 tok/s':>22}")
    for name, r in results.items():
        print(f"{name:<30} {fmt(r['pp']):>22} {fmt(r['tg']):>22}")
    tiled_tg = results["npllama bf16 (tiled)"]["tg"]["median"]
    for t in files:
        ours = results[f"npllama {t} (quantized)"]
        line = f"{t}: decode {ours['tg']['median'] / tiled_tg:.2f}x tiled bf16's"
        if f"llama.cpp {t}" in results:
            peer = results[f"llama.cpp {t}"]
            line += (f", {ours['tg']['median'] / peer['tg']['median']:.2f}x llama.cpp's decode, "
                     f"{ours['pp']['median'] / peer['pp']['median']:.2f}x its prefill")
        print(line + f" ({os.path.getsize(files[t]) / 1e9:.2f} GB file)")


def one(a) -> None:
    parallel.set_threads(a.threads)
    r = peers.run_npllama(a.path, "float32", 1, a.mode)
    print(json.dumps(r))


def decode_matrices(model) -> list:
    """The matrices one decode token reads, in forward order (the head: the embeddings if tied)."""
    names = [n for n in model.weights if model.weights[n].ndim == 2 and n != "tok_embeddings.weight"]
    return [model.weights[n] for n in names] + [model.weights[model.output]]


def _tile_steps(w, xk):
    """(rows per tile, widen(r, buf), multiply(f, out)) as the tiled matmul decodes with w:
    Q8_0 as integers then a batched GEMV over its blocks (tiled._q8_0_decode), other block
    types as their parts (integers, scales) then block_dots, float types widened then a GEMV."""
    if w.qtype == 8:
        xb = tiled.q8_0_x_blocks(xk)
        return (tiled.q8_0_decode_rows(xk.shape[1]), lambda r, n, buf: w.block_integers(r, r + n, buf),
                lambda r, n, f, out: tiled.q8_0_dots(f, xb, w.block_scales(r, r + n), out))
    if w.qtype in PARTS:
        return (max(1, tiled.TILE_BYTES // (4 * xk.shape[1])), lambda r, n, buf: w.parts(r, r + n),
                lambda r, n, f, out: np.copyto(out, tiled.block_dots(*f, xk)))
    rows = max(1, min(w.shape[0], tiled.TILE_BYTES // (4 * xk.shape[1])))
    return (rows, lambda r, n, buf: w.rows(r, r + n, buf if w.in_place else None),
            lambda r, n, f, out: np.matmul(xk, f.T, out=out))


def budget(a) -> None:
    model = npllama.load(a.path, weights_mode="quantized", max_seq_len=16)
    parallel.set_threads(1)
    x = np.random.default_rng(0).standard_normal((1, model.args.dim)).astype(np.float32)
    read = widen = gemv = 0.0
    for w in decode_matrices(model):
        w.check()
        xk = np.resize(x, (1, w.shape[1]))
        xk = pad_q8_0(xk) if w.qtype == 8 else xk           # as the tiled matmul multiplies Q8_0
        rows, widen_rows, multiply = _tile_steps(w, xk)
        rows = min(rows, w.shape[0])
        buf, copy = np.empty((rows, xk.shape[1]), np.float32), np.empty((rows, w.raw.shape[1]), np.uint8)
        out = np.empty((1, rows), np.float32)
        for r in range(0, w.shape[0] - rows + 1, rows):
            t0 = time.process_time()
            np.copyto(copy, w.raw[r:r + rows])
            t1 = time.process_time()
            f = widen_rows(r, rows, buf)
            t2 = time.process_time()
            multiply(r, rows, f, out)
            t3 = time.process_time()
            read, widen, gemv = read + t1 - t0, widen + t2 - t1, gemv + t3 - t2
    total = widen + gemv
    print(f"{a.path}: one decode token's matrices on one core (CPU time): widening {widen * 1e3:.0f} ms "
          f"({widen / total:.0%}; of it, reading the blocks, timed as a copy of them: {read * 1e3:.0f} ms), "
          f"GEMV {gemv * 1e3:.0f} ms ({gemv / total:.0%}; block types: the batched block dots and their scaling)")


def rss(a) -> None:
    t0 = time.perf_counter()
    model = npllama.load(a.path, weights_mode="quantized", max_seq_len=a.ctx)
    t1 = time.perf_counter()
    logits = model.forward(np.arange(1, 17), last_only=True)
    t2 = time.perf_counter()
    token = int(np.argmax(logits))
    for i in range(a.new):
        token = int(np.argmax(model.forward(np.array([token]), start_pos=16 + i, last_only=True)))
    t3 = time.perf_counter()
    kv = model.cache_k.nbytes + model.cache_v.nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = os.path.getsize(a.path)
    print(f"{a.path}: {model.weights_mode}; peak RSS {peak / GiB:.2f} GiB <= file {size / GiB:.2f} + KV cache "
          f"{kv / GiB:.3f} + 1 GiB = {(size + kv + GiB) / GiB:.2f} GiB: {peak <= size + kv + GiB}; load "
          f"{t1 - t0:.1f} s, prompt of 16 {t2 - t1:.0f} s, {(t3 - t2) / max(a.new, 1):.0f} s per decoded token")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--shape", default="llama3.2-1b", choices=list(peers.SHAPES))
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--llama-bench")
    s.add_argument("--llama-quantize")
    s.add_argument("--workdir", default=os.path.join(cache_dir(), "bench"))
    s.add_argument("--json")
    o = sub.add_parser("one")
    o.add_argument("path")
    o.add_argument("mode")
    for q in (s, o):
        q.add_argument("-t", "--threads", type=int, default=parallel.cores())
    b = sub.add_parser("budget")
    b.add_argument("path")
    r = sub.add_parser("rss")
    r.add_argument("path")
    r.add_argument("--ctx", type=int, default=256)
    r.add_argument("--new", type=int, default=2)
    a = p.parse_args()
    {"speed": speed, "one": one, "budget": budget, "rss": rss}[a.cmd](a)


if __name__ == "__main__":
    main()
