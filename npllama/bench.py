"""Benchmark: prefill (pp128) and decode (tg32) speed, load time and peak RSS on random
weights at real shapes, against this machine's limits and, with --vs torch, HF
transformers' LlamaForCausalLM on the same weights in the same run."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from .config import ModelArgs, preset
from .errors import UsageError
from .hub import cache_dir
from .weights import expected_shapes

SHAPES = {"tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
          "llama3.2-1b": None, "llama3.2-3b": None, "llama3-8b": None}


def shape_args(shape: str) -> ModelArgs:
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return ModelArgs(**SHAPES[shape]) if SHAPES[shape] else preset(shape)


def random_tensor(shape: tuple, rng_block: np.ndarray) -> np.ndarray:
    """A float32 array of `shape` tiled from a block of random values: statistically like
    trained weights for speed purposes, and fast to make at 8B scale."""
    n = int(np.prod(shape))
    reps = -(-n // rng_block.size)
    return np.tile(rng_block, reps)[:n].reshape(shape)


STORES = {"bfloat16": "bf16", "float32": "f32"}


def build(shape: str, root: str, quiet: bool = False, store: str = "bfloat16") -> str:
    """A checkpoint of random weights at `shape`, stored as `store` (bfloat16 or float32),
    written tensor by tensor (an 8B model is never held in memory), cached under root."""
    from . import bf16
    from .checkpoint import write_checkpoint
    out = os.path.join(root, f"{shape}-{STORES[store]}")
    if os.path.isfile(os.path.join(out, "index.json")):
        return out
    args = shape_args(shape)
    shapes = expected_shapes(args)
    block = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(np.float32)
    ones = np.ones(1, np.float32)
    stored = bf16.to_bits if store == "bfloat16" else (lambda w: w)

    def tensors():
        for name, s in shapes.items():
            yield name, stored(random_tensor(s, block if len(s) > 1 else ones))

    total = sum(int(np.prod(s)) * (2 if store == "bfloat16" else 4) for s in shapes.values())
    os.makedirs(root, exist_ok=True)   # the cache folder is ours to make
    write_checkpoint(out, args, tensors(), total, len(shapes), quiet=quiet)
    return out


def proc_status(field: str) -> int | None:
    """A byte count from /proc/self/status (Linux), e.g. VmRSS, VmHWM; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0), so a peak can be measured for
    one phase (a prompt) rather than since the process began (loading)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    # VmHWM is this process's own peak; ru_maxrss also counts the parent's RSS at the fork
    # (a peer started by a bench that holds a model would report at least that model).
    return proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_npllama(path: str, dtype: str, reps: int, weights: str, prompt_len: int = 128, gen_len: int = 32) -> dict:
    import npllama
    t0 = time.perf_counter()
    model = npllama.load(path, dtype=dtype, weights_mode=weights, max_seq_len=prompt_len + gen_len)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.args.vocab_size, prompt_len)
    t0 = time.perf_counter()
    model.forward(tokens[:8], last_only=True)  # warm-up: first use of every weight
    warm_s = time.perf_counter() - t0
    pp, tg = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        logits = model.forward(tokens, start_pos=0, last_only=True)
        pp.append(prompt_len / (time.perf_counter() - t0))
        token = int(np.argmax(logits))
        t0 = time.perf_counter()
        for i in range(gen_len):
            token = int(np.argmax(model.forward(np.array([token]), start_pos=prompt_len + i, last_only=True)))
        tg.append(gen_len / (time.perf_counter() - t0))
    return {"impl": f"npllama {dtype} ({model.weights_mode})", "load_s": load_s, "first_use_s": warm_s,
            "pp": summary(pp), "tg": summary(tg), "peak_rss": peak_rss()}


def measure_bounds(args: ModelArgs, seconds: float = 1.0) -> dict:
    """This machine's streaming bandwidth (a float32 GEMV too large for any cache) and GEMM
    rate (128 rows), measured with numpy."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8192, 8192), dtype=np.float32)        # 256 MB
    x = rng.standard_normal((1, 8192), dtype=np.float32)
    xs = rng.standard_normal((128, 8192), dtype=np.float32)
    best_gemv = best_gemm = float("inf")
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        # w as (in, out), the layout npllama keeps resident weights in (faster than x @ w.T)
        t0 = time.perf_counter(); x @ w; best_gemv = min(best_gemv, time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); xs @ w; best_gemm = min(best_gemm, time.perf_counter() - t0)  # noqa: E702
    params = sum(int(np.prod(s)) for s in expected_shapes(args).values())
    per_token = params - args.vocab_size * args.dim      # the embedding table is gathered, not read
    return {"bandwidth_GBps": w.nbytes / best_gemv / 1e9, "gemm_GFLOPs": 2 * xs.shape[0] * w.size / best_gemm / 1e9,
            "weight_params_per_token": per_token}


def machine() -> dict:
    info = {"cores": os.cpu_count(), "numpy": np.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    try:
        from threadpoolctl import threadpool_info
        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            info["blas"] = f"{blas[0].get('internal_api')} {blas[0].get('version')} " \
                           f"kernel={blas[0].get('architecture')} threads={blas[0].get('num_threads')}"
    except ImportError:
        info["blas"] = "(install threadpoolctl to report the BLAS kernel)"
    return info


def report(args, results, bounds, out=sys.stdout):
    m = machine()
    print(f"machine: {m['cores']} cores, numpy {m['numpy']}, {m.get('blas', '')}", file=out)
    print(f"{'implementation':<44} {'pp128 tok/s':>18} {'tg32 tok/s':>18} {'load s':>7} {'peak RSS':>9}", file=out)
    for r in results:
        fmt = lambda s: f"{s['median']:7.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
        print(f"{r['impl']:<44} {fmt(r['pp']):>18} {fmt(r['tg']):>18} {r['load_s']:7.2f} "
              f"{r['peak_rss'] / 1e9:7.2f}GB", file=out)
    if len(results) > 1:
        a = results[0]
        for b in results[1:]:
            print(f"ratio npllama / {b['impl'].split(' (')[0]}: pp128 {a['pp']['median'] / b['pp']['median']:.2f}x, "
                  f"tg32 {a['tg']['median'] / b['tg']['median']:.2f}x", file=out)
    if bounds:
        nbytes = 2 if "tiled" in results[0]["impl"] else 4
        decode_limit = bounds["bandwidth_GBps"] * 1e9 / (bounds["weight_params_per_token"] * nbytes)
        prefill_limit = bounds["gemm_GFLOPs"] * 1e9 / (2 * bounds["weight_params_per_token"])
        r = results[0]
        print(f"limits: bandwidth {bounds['bandwidth_GBps']:.1f} GB/s -> decode <= {decode_limit:.2f} tok/s "
              f"({nbytes}-byte weights); GEMM {bounds['gemm_GFLOPs']:.0f} GFLOP/s -> prefill <= {prefill_limit:.0f} "
              f"tok/s", file=out)
        print(f"npllama reaches {r['tg']['median'] / decode_limit:.0%} of the decode limit and "
              f"{r['pp']['median'] / prefill_limit:.0%} of the prefill limit", file=out)


def run_torch(path: str, dtype: str, reps: int) -> dict:
    """The torch peer, tools/bench_torch.py, run by module name in its own process: torch is
    a cross-check extra that npllama never imports, and the peer's memory is its own."""
    r = subprocess.run([sys.executable, "-m", "tools.bench_torch", path, dtype, str(reps)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        hint = " (--vs torch runs tools/bench_torch.py: run from the root of a checkout of npllama)" \
            if "No module named 'tools'" in last else \
            " (--vs torch needs the test extras: pip install -e '.[test]')" if "No module named" in last else ""
        raise UsageError(f"the torch run failed: {last}{hint}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(a) -> int:
    peers = a.vs or []
    for peer in peers:
        if peer != "torch":
            raise UsageError(f"--vs: bench runs torch only (got {peer!r}); "
                             "the README shows how to run llama.cpp beside it")
    root = a.workdir or os.path.join(cache_dir(), "bench")
    path = build(a.shape, root, quiet=a.quiet)
    args = shape_args(a.shape)
    results = [run_npllama(path, a.dtype, a.reps, a.weights)]
    results += [run_torch(path, a.dtype, a.reps) for _ in peers]
    bounds = measure_bounds(args) if a.bound else None
    report(args, results, bounds)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "machine": machine(), "results": results, "bounds": bounds}, f, indent=1)
    return 0
