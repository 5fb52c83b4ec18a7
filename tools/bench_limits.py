#!/usr/bin/env python3
"""Where npllama's speed stops: the two ceilings behind the benchmark's figures.

    python tools/bench_limits.py gemm   --shape llama3.2-1b  # prefill: numpy's GEMM vs torch's (needs torch)
    python tools/bench_limits.py tiled  --shape llama3-8b    # tiled bf16 decode: each stage of the pipeline
    python tools/bench_limits.py budget --shape llama3.2-1b  # decode: where each token's time goes
    python tools/bench_limits.py layout --shape llama3.2-1b  # GEMV and GEMM rates in either weight layout

gemm: times every matmul of a 128-token prefill at the shape's sizes, npllama's (fused
wq|wk|wv and w1|w3, weights (out, in) as x @ w.T) with numpy and HF's (separate projections) with
torch, each in its own process, alternating, and prints the prefill rate each
implementation's GEMMs alone would allow. Everything else in a forward pass only lowers
that rate, so npllama's prefill / torch's cannot exceed the ratio printed (unless torch's
other work is larger).

tiled: on --mb megabytes of random bf16 weights (more than the last-level cache, so they
stream from memory), one core: the read rate (BLAS over the raw bytes), each step of
npllama.tiled's widening (mask from memory, shift in cache, GEMV in cache), and the whole
pipeline on 1 and on all threads; then the decode rate the shape would get at each rate,
as a fraction of the bf16 bandwidth limit that `npllama bench --bound` reports. The last
line, one thread's pipeline times the core count, is the most threads could give.

budget: decodes --tokens tokens after a 128-token prompt on the bench weights (`npllama
bench` builds them) and splits each token's time between the matrix products (by weight,
with the rate each streams its bytes at; lm_head is the output projection), attention (with
the KV-cache bytes it reads), RMSNorm, RoPE, SwiGLU, the KV-cache writes and the rest
(residual adds, reshapes, Python). The parts are timed by wrapping the functions the blocks
call (the KV-cache writes, inline in the model, by repeating them alone); the model's code
is not changed. Each part's figure is its median over the tokens.

layout: every matmul of a token at the shape's sizes (npllama's fused ones and the output
head), with the weights held (out, in) as Meta stores them and used as x @ w.T (what
npllama does), or transposed to (in, out) and used as x @ w: the GEMV rate (decode,
weights streamed from memory: --mb megabytes of copies of each matrix, cycled) and the
GEMM rate of a --tokens prefill, the two layouts alternating over --reps rounds, medians.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from npllama.model import bf16, tiled  # noqa: E402
from npllama.bench.peers import measure_bounds, shape_args  # noqa: E402


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layer_matmuls(args, impl: str) -> list[tuple[int, int]]:
    """(in, out) of each matmul of one layer, as each implementation issues them."""
    hd, kv, d, f = args.head_dim, args.n_kv_heads, args.dim, args.ffn_dim
    if impl == "numpy":  # npllama: wq|wk|wv and w1|w3 fused
        return [(d, (args.n_heads + 2 * kv) * hd), (args.n_heads * hd, d), (d, 2 * f), (f, d)]
    return [(d, args.n_heads * hd), (d, kv * hd), (d, kv * hd), (args.n_heads * hd, d), (d, f), (d, f), (f, d)]


def layer_gemm_time(args, impl: str, T: int, reps: int) -> float:
    """Median seconds for one layer's matmuls of a T-token prefill."""
    rng = np.random.default_rng(0)
    shapes = layer_matmuls(args, impl)
    # Weights (out, in), as Meta stores them and npllama and torch hold them.
    pairs = [(rng.standard_normal((T, i), dtype=np.float32), rng.standard_normal((o, i), dtype=np.float32))
             for i, o in shapes]
    if impl == "numpy":
        run = lambda: [x @ w.T for x, w in pairs]  # noqa: E731
    else:
        import torch
        torch.set_num_threads(os.cpu_count())
        tpairs = [(torch.from_numpy(x), torch.from_numpy(w)) for x, w in pairs]
        run = lambda: [torch.nn.functional.linear(x, w) for x, w in tpairs]  # noqa: E731
    run()
    return median_time(run, reps)


def gemm(args, shape: str, T: int, reps: int, rounds: int = 3) -> dict:
    # Each implementation in its own process, alternating: in one process, OpenBLAS's and
    # OpenMP's idle threads spin and take the cores from each other.
    times = {"numpy": [], "torch": []}
    for _ in range(rounds):
        for impl in times:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "gemm-worker", "--impl", impl,
                                "--shape", shape, "--tokens", str(T), "--reps", str(reps)],
                               capture_output=True, text=True, check=True)
            times[impl].append(float(r.stdout.split()[-1]))
    flops = 2 * T * sum(i * o for i, o in layer_matmuls(args, "numpy"))
    n, t = statistics.median(times["numpy"]), statistics.median(times["torch"])
    return {"numpy_GFLOPs": flops / n / 1e9, "torch_GFLOPs": flops / t / 1e9,
            "numpy_prefill_max": T / (n * args.n_layers), "torch_prefill_max": T / (t * args.n_layers)}


def layouts(args, T: int, mb: int, reps: int) -> dict:
    """For each of a token's matmuls, (in, out, times it runs per token) and per layout the
    median seconds of one GEMV (weights from memory) and of one T-row GEMM."""
    mats = [(i, o, args.n_layers) for i, o in layer_matmuls(args, "numpy")] + [(args.dim, args.vocab_size, 1)]
    forms = {"(out, in), x @ w.T": lambda x, w: x @ w.T, "(in, out), x @ w": lambda x, w: x @ w}
    out = {}
    for i, o, n in mats:
        copies = max(2, -(-mb * 2**20 // (4 * i * o)))
        x1, xT = np.ones((1, i), np.float32), np.ones((T, i), np.float32)
        held = {}
        for form in forms:  # small values: no overflow, nothing denormal
            held[form] = [np.full((o, i) if form.startswith("(out") else (i, o), 0.01, np.float32) for _ in range(copies)]
        times = {form: ([], []) for form in forms}
        for _ in range(reps):
            for form, f in forms.items():
                ws = held[form]
                f(x1, ws[0])
                t0 = time.perf_counter()
                for w in ws:
                    f(x1, w)
                times[form][0].append((time.perf_counter() - t0) / copies)
                times[form][1].append(median_time(lambda: f(xT, ws[0]), 1))
        out[(i, o, n)] = {form: (statistics.median(g), statistics.median(m)) for form, (g, m) in times.items()}
        del held
    return out


def tiled_stages(args, mb: int, reps: int) -> dict:
    """Rates in bf16 weights per second, on rows of the shape's dim. The mask and shift are
    tiled._rows's two steps, timed apart; the stages run on one core."""
    from threadpoolctl import threadpool_limits
    K = args.dim
    N = max(64, mb * 2**20 // (2 * K))
    rng = np.random.default_rng(0)
    w = np.empty((N, K), np.uint16)
    for r in range(0, N, 1024):  # weights like trained ones: finite, no overflow in the read-rate GEMV
        w[r:r + 1024] = bf16.to_bits(rng.standard_normal((min(1024, N - r), K), dtype=np.float32) * 0.02)
    u = w.view(np.uint32)                                       # (N, K/2) pairs
    x = rng.standard_normal((1, K), dtype=np.float32)
    rows = max(1, tiled.TILE_BYTES // (8 * (K // 2)))           # npllama's decode tile
    buf = np.empty((rows, K), np.uint32)
    f = buf.view(np.float32)
    half = K // 2
    y = np.empty((1, rows), np.float32)
    n = w.size

    def over_tiles(step):
        return lambda: [step(r) for r in range(0, N - rows + 1, rows)]
    stages = {
        "read (BLAS GEMV over the raw bytes)": over_tiles(lambda r: np.matmul(x[:, :half], u[r:r + rows].view(np.float32).T, out=y)),
        "mask: odd columns, from memory": over_tiles(lambda r: np.bitwise_and(u[r:r + rows], tiled.HIGH, out=buf[:, :half])),
        "shift: even columns, in cache": over_tiles(lambda r: np.multiply(u[:rows], tiled.LOW_TO_HIGH, out=buf[:, half:])),
        "GEMV on the widened tile, in cache": over_tiles(lambda r: np.matmul(x, f.T, out=y)),
    }
    out = {}
    with threadpool_limits(1):
        for name, fn in stages.items():
            out[name] = n / median_time(fn, reps)
        os.environ["NPLLAMA_THREADS"] = "1"
        out["whole pipeline, 1 thread"] = n / median_time(lambda: tiled.matmul(x, [w]), reps)
    os.environ["NPLLAMA_THREADS"] = str(os.cpu_count())
    out[f"whole pipeline, {os.cpu_count()} threads"] = n / median_time(lambda: tiled.matmul(x, [w]), reps)
    return out


def decode_budget(shape: str, dtype: str, weights: str, n_tokens: int) -> tuple[str, dict, float]:
    """(weights mode, part -> [seconds per token, bytes read per token], seconds per token),
    medians over n_tokens decode steps."""
    import npllama
    from npllama.bench import peers as bench
    from npllama.model import model, weights as weights_mod
    from npllama.io.hub import cache_dir
    path = bench.build(shape, os.path.join(cache_dir(), "bench"), quiet=True)
    m = npllama.load(path, dtype=dtype, weights_mode=weights, max_seq_len=128 + n_tokens + 1)
    step: dict[str, float] = {}
    nbytes: dict[str, int] = {}

    def timed(part, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                step[part] = step.get(part, 0.0) + time.perf_counter() - t0
        return wrapper

    def product_name(names) -> str:
        short = [n.split(".")[-2] for n in names]     # layers.0.attention.wq.weight -> wq
        return ("lm_head" if names[0] in ("output.weight", "tok_embeddings.weight") else "|".join(short)) + " products"

    fused = weights_mod.Weights.fused

    def fused_timed(self, x, names):
        part = product_name(names)
        nbytes[part] = nbytes.get(part, 0) + sum(self.tensors[n].size for n in names) * (
            2 if self.mode == "tiled" else 4)
        return timed(part, fused)(self, x, names)
    attention = timed("attention (reads the KV cache)", model.blocked_attention)

    def attention_timed(xq, keys, values, *a, **k):
        # keys and values: the KV cache's positions so far (float32), what attention reads
        nbytes["attention (reads the KV cache)"] = nbytes.get("attention (reads the KV cache)", 0) + \
            keys.nbytes + values.nbytes
        return attention(xq, keys, values, *a, **k)
    patches = {(weights_mod.Weights, "fused"): fused_timed,
               (model, "blocked_attention"): attention_timed,
               (model, "rms_norm"): timed("RMSNorm", model.rms_norm),
               (model, "apply_rotary_emb"): timed("RoPE", model.apply_rotary_emb),
               (model, "swiglu"): timed("SwiGLU", model.swiglu)}
    for layer in m.layers:       # a bf16 cache (bfloat16 numerics): its conversions, each token
        if layer.attention.to_cache is not model.identity:
            patches[layer.attention, "to_cache"] = timed("KV-cache bf16 conversions", layer.attention.to_cache)
            patches[layer.attention, "from_cache"] = timed("KV-cache bf16 conversions", layer.attention.from_cache)
    saved = {k: getattr(*k) for k in patches}
    rng = np.random.default_rng(0)
    m.forward(rng.integers(0, m.args.vocab_size, 128), last_only=True)
    token, per_step, totals = 0, [], []
    try:
        for (obj, name), fn in patches.items():
            setattr(obj, name, fn)
        for i in range(n_tokens + 1):                  # the first step warms up, and is dropped
            step.clear()
            nbytes.clear()
            t0 = time.perf_counter()
            token = int(np.argmax(m.forward(np.array([token]), start_pos=128 + i, last_only=True)))
            if i:
                totals.append(time.perf_counter() - t0)
                per_step.append((dict(step), dict(nbytes)))
    finally:
        for (obj, name), fn in saved.items():
            setattr(obj, name, fn)
    parts = {p: [statistics.median(s[0].get(p, 0.0) for s in per_step), per_step[0][1].get(p, 0)]
             for p in per_step[0][0]}
    # The KV-cache writes are two slice assignments inline in Attention (nothing to wrap):
    # timed alone, the same assignments at the next free position, for every layer.
    pos = 128 + n_tokens
    xk = np.zeros((1, 1, m.args.n_kv_heads, m.args.head_dim), m.cache_k.dtype)

    def write_kv():
        for layer in m.layers:
            layer.attention.cache_k[:1, pos:pos + 1] = xk
            layer.attention.cache_v[:1, pos:pos + 1] = xk
    parts["KV-cache writes"] = [median_time(write_kv, 21), 2 * xk.nbytes * len(m.layers)]
    total = statistics.median(totals)
    parts["rest (residual adds, reshapes, Python)"] = [total - sum(t for t, _ in parts.values()), 0]
    return m.weights_mode, parts, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["gemm", "tiled", "budget", "layout", "gemm-worker"])
    p.add_argument("--impl", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--shape", default="llama3.2-1b")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tokens", type=int, default=None, help="gemm, layout: prompt length (default 128, as pp128); "
                   "budget: tokens decoded (default 16)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="budget: the numerics")
    p.add_argument("--weights", choices=["auto", "resident", "tiled"], default="auto", help="budget: weights mode")
    p.add_argument("--mb", type=int, default=1024, help="tiled: megabytes of bf16 weights; layout: of each "
                   "matrix's copies (default 1024: past any cache)")
    a = p.parse_args(argv)
    args = shape_args(a.shape)
    if a.what == "gemm-worker":
        print(layer_gemm_time(args, a.impl, a.tokens or 128, a.reps))
        return 0
    print(f"shape {a.shape}, {os.cpu_count()} cores, numpy {np.__version__}")
    if a.what == "budget":
        mode, parts, total = decode_budget(a.shape, a.dtype, a.weights, a.tokens or 16)
        print(f"decode, {a.dtype} ({mode}): {total * 1e3:.1f} ms per token ({1 / total:.2f} tok/s), "
              f"medians over {a.tokens or 16} tokens")
        print(stage_row("part", "ms/token", "share", "GB/s"))
        for part, (t, nbytes) in sorted(parts.items(), key=lambda kv: -kv[1][0]):
            print(stage_row(part, f"{t * 1e3:.2f}", f"{t / total:.1%}", f"{nbytes / t / 1e9:.1f}" if nbytes else ""))
        return 0
    if a.what == "layout":
        T = a.tokens or 128
        r = layouts(args, T, a.mb, a.reps)
        print(stage_row("matmul (in -> out) x per token, layout", "GEMV GB/s", f"GEMM {T} GFLOP/s"))
        total = {}
        for (i, o, n), forms in r.items():
            for form, (g, m) in forms.items():
                print(stage_row(f"{i} -> {o} x {n}, {form}", f"{4 * i * o / g / 1e9:.1f}", f"{2 * T * i * o / m / 1e9:.0f}"))
                gt, mt = total.get(form, (0.0, 0.0))
                total[form] = (gt + n * g, mt + n * m)
        for form, (g, m) in total.items():
            print(f"{form}: the matmuls alone allow decode <= {1 / g:.2f} tok/s, prefill <= {T / m:.1f} tok/s")
        return 0
    if a.what == "gemm":
        a.tokens = a.tokens or 128
        r = gemm(args, a.shape, a.tokens, a.reps)
        print(f"GEMMs of a {a.tokens}-token prefill: numpy {r['numpy_GFLOPs']:.0f} GFLOP/s, torch {r['torch_GFLOPs']:.0f} GFLOP/s")
        print(f"prefill allowed by the GEMMs alone: npllama <= {r['numpy_prefill_max']:.1f} tok/s, "
              f"torch <= {r['torch_prefill_max']:.1f} tok/s (ratio {r['numpy_prefill_max'] / r['torch_prefill_max']:.2f}x)")
        return 0
    r = tiled_stages(args, a.mb, a.reps)
    b = measure_bounds(args)
    per_token = b["weight_params_per_token"]
    limit = b["bandwidth_GBps"] * 1e9 / (2 * per_token)
    print(f"bf16 decode limit: {b['bandwidth_GBps']:.1f} GB/s / {2 * per_token / 1e9:.3g} GB per token = {limit:.2f} tok/s")
    print(stage_row("stage (one core unless said)", "G weights/s", "alone allows", "of limit"))
    cores = os.cpu_count()
    r[f"1 thread's pipeline x {cores} cores (perfect)"] = cores * r["whole pipeline, 1 thread"]
    for name, rate in r.items():
        print(stage_row(name, f"{rate / 1e9:.2f}", f"{rate / per_token:.2f} tok/s", f"{rate / per_token / limit:.0%}"))
    return 0


def stage_row(*cells: str) -> str:
    """One row of the stage table. Columns are padded to a width but always parted by at
    least two spaces, so a figure wider than its column (a tiny shape's 100000 tok/s)
    still splits on runs of 2+ spaces."""
    name, *figures = cells
    return f"{name:<44}" + "".join(f"  {x:>{w}}" for x, w in zip(figures, (11, 15, 9)))


if __name__ == "__main__":
    sys.exit(main())
