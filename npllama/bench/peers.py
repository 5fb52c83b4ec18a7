"""Benchmark: prefill (pp128) and decode (tg32) speed, load time and peak RSS on random
weights at real shapes, against this machine's limits and, in the same run, peers on the
same weights: HF transformers' LlamaForCausalLM (--vs torch) and llama.cpp's llama-bench
(--llama-bench PATH, on a GGUF export of the weights, its repetitions interleaved with
npllama's)."""
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

from ..errors import UsageError
from ..io.atomic import check_file, write_file
from ..io.checkpoint import load, open_tensors, write_checkpoint
from ..io.hub import cache_dir
from ..model import bf16, parallel
from ..model.config import ModelArgs, preset
from ..model.weights import choose_mode, expected_shapes

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


def run_npllama(path: str, dtype: str, reps: int, weights: str, prompt_len: int = 128, gen_len: int = 32,
                between=lambda: None) -> dict:
    """npllama's pp and tg rates; between() runs after each repetition (an interleaved peer's)."""
    t0 = time.perf_counter()
    model = load(path, dtype=dtype, weights_mode=weights, max_seq_len=prompt_len + gen_len)
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
        between()
    return {"impl": f"npllama {dtype} ({model.weights_mode})", "load_s": load_s, "first_use_s": warm_s,
            "pp": summary(pp), "tg": summary(tg), "peak_rss": peak_rss()}


def measure_bounds(args: ModelArgs, seconds: float = 1.0) -> dict:
    """This machine's streaming bandwidth and GEMM rate (128 rows), measured with numpy.

    The bandwidth is read the way the fastest reader of weights reads them: every core at
    once, each through its own large block (llama.cpp's threads each take rows of a matrix).
    A float32 GEMV far larger than the caches is timed both as one BLAS call (BLAS's
    threads) and split between npllama's threads (BLAS on one thread each); the faster wins."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8192, 8192), dtype=np.float32)        # 256 MB, 8x the largest L3 here
    x = rng.standard_normal((1, 8192), dtype=np.float32)
    xs = rng.standard_normal((128, 8192), dtype=np.float32)
    y = np.empty((1, 8192), np.float32)
    step = -(-w.shape[0] // parallel.threads())
    # w as (out, in), the layout npllama keeps resident weights in, used as x @ w.T
    blocks = [lambda r=r: np.matmul(x, w[r:r + step].T, out=y[:, r:r + step]) for r in range(0, w.shape[0], step)]
    ways = {"one BLAS call": lambda: np.matmul(x, w.T, out=y),
            f"{parallel.threads()} threads": lambda: parallel.run(blocks)}
    best = dict.fromkeys(ways, float("inf"))
    best_gemm = float("inf")
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for way, gemv in ways.items():
            t0 = time.perf_counter(); gemv(); best[way] = min(best[way], time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); xs @ w.T; best_gemm = min(best_gemm, time.perf_counter() - t0)  # noqa: E702
    way = min(best, key=best.get)
    params = sum(int(np.prod(s)) for s in expected_shapes(args).values())
    per_token = params - args.vocab_size * args.dim      # the embedding table is gathered, not read
    return {"bandwidth_GBps": w.nbytes / best[way] / 1e9, "bandwidth_by": way,
            "bandwidth_GBps_by_way": {k: w.nbytes / t / 1e9 for k, t in best.items()},
            "gemm_GFLOPs": 2 * xs.shape[0] * w.size / best_gemm / 1e9, "weight_params_per_token": per_token}


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
    print(f"{'implementation':<52} {'pp128 tok/s':>20} {'tg32 tok/s':>18} {'load s':>7} {'peak RSS':>9}", file=out)
    for r in results:
        fmt = lambda s: f"{s['median']:7.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
        load = f"{r['load_s']:7.2f}" if r.get("load_s") is not None else f"{'-':>7}"
        rss = f"{r['peak_rss'] / 1e9:7.2f}GB" if r.get("peak_rss") is not None else f"{'-':>9}"
        print(f"{r['impl']:<52} {fmt(r['pp']):>20} {fmt(r['tg']):>18} {load} {rss}", file=out)
    a = results[0]
    for b in results[1:]:
        print(f"ratio npllama / {b['name']}: pp128 {a['pp']['median'] / b['pp']['median']:.2f}x, "
              f"tg32 {a['tg']['median'] / b['tg']['median']:.2f}x", file=out)
    if bounds:
        per_token = bounds["weight_params_per_token"]
        nbytes = a["bytes_per_weight"]
        decode_limit = bounds["bandwidth_GBps"] * 1e9 / (per_token * nbytes)
        prefill_limit = bounds["gemm_GFLOPs"] * 1e9 / (2 * per_token)
        ways = ", ".join(f"{k} {v:.1f}" for k, v in bounds["bandwidth_GBps_by_way"].items())
        print(f"limits: bandwidth {bounds['bandwidth_GBps']:.1f} GB/s ({ways}) -> decode <= {decode_limit:.2f} "
              f"tok/s ({nbytes:g}-byte weights); GEMM {bounds['gemm_GFLOPs']:.0f} GFLOP/s -> prefill <= "
              f"{prefill_limit:.0f} tok/s", file=out)
        print(f"npllama reaches {a['tg']['median'] / decode_limit:.0%} of the decode limit and "
              f"{a['pp']['median'] / prefill_limit:.0%} of the prefill limit", file=out)
        # Each implementation's decode as the weight bytes it streams per second.
        for r in results:
            rate = r["tg"]["median"] * per_token * r["bytes_per_weight"] / 1e9
            print(f"{r['name']} decode streams {rate:.1f} GB/s of {r['bytes_per_weight']:g}-byte weights "
                  f"({rate / bounds['bandwidth_GBps']:.0%} of the bandwidth)", file=out)


def run_tool(module: str, argv: list[str], flag: str) -> str:
    """A tools/ script run by module name in its own process (its memory is its own, and
    torch, a cross-check extra, is never imported by npllama) -> its stdout."""
    r = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        hint = f" ({flag} runs {module.replace('.', '/')}.py: run from the root of a checkout of npllama)" \
            if "No module named 'tools'" in last else \
            f" ({flag} needs the test extras: pip install -e '.[test]')" if "No module named" in last else ""
        raise UsageError(f"{module} failed: {last}{hint}")
    return r.stdout


def run_torch(path: str, dtype: str, reps: int) -> dict:
    """The torch peer, tools/bench_torch.py."""
    r = json.loads(run_tool("tools.bench_torch", [path, dtype, str(reps)], "--vs torch").strip().splitlines()[-1])
    return {**r, "name": "torch", "bytes_per_weight": 2 if dtype == "bfloat16" else 4}


GGUF_TYPES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}   # bytes per weight (q8_0: 32 int8 and a scale)


def export_gguf(path: str, root: str, shape: str, gguf_type: str) -> str:
    """The bench weights as a GGUF (tools/export_gguf.py), made once and cached beside them."""
    out = os.path.join(root, f"{shape}-{gguf_type}.gguf")
    if not os.path.isfile(out):
        run_tool("tools.export_gguf", [path, out, "--type", gguf_type], "--llama-bench")
    return out


class LlamaBench:
    """llama.cpp's llama-bench on a GGUF of the same weights, one repetition per call, so its
    runs interleave with npllama's and both see the same machine. Its own defaults otherwise
    (a warm-up run, KV cache f16, flash attention auto); its tg runs from an empty cache,
    npllama's after the 128-token prompt (a few MB more KV cache read per token)."""

    @staticmethod
    def check(binary: str) -> None:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise UsageError(f"--llama-bench {binary}: not an executable file (the llama-bench program of a "
                             "llama.cpp build; see the README's Performance section)")

    def __init__(self, binary: str, gguf: str, gguf_type: str, threads: int, prompt_len: int = 128, gen_len: int = 32):
        self.check(binary)
        self.cmd = [binary, "-m", gguf, "-p", str(prompt_len), "-n", str(gen_len), "-t", str(threads), "-r", "1",
                    "-o", "json"]
        self.gguf_type, self.threads = gguf_type, threads
        self.pp: list[float] = []
        self.tg: list[float] = []
        self.build = "?"

    def __call__(self) -> None:
        r = subprocess.run(self.cmd, capture_output=True, text=True)
        try:
            rows = json.loads(r.stdout) if r.returncode == 0 else None
            for row in rows:
                (self.tg if row["n_gen"] > 0 else self.pp).extend(float(t) for t in row["samples_ts"])
            self.build = str(rows[0].get("build_commit", "?"))
        except (ValueError, TypeError, KeyError, IndexError):
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise UsageError(f"llama-bench did not give its JSON results (exit {r.returncode}): {last}") from None

    def result(self) -> dict:
        if not (self.pp and self.tg):
            raise UsageError("llama-bench gave no pp or no tg figures")
        return {"impl": f"llama.cpp {self.build} {self.gguf_type.upper()} GGUF (-t {self.threads})", "name": "llama.cpp",
                "pp": summary(self.pp), "tg": summary(self.tg), "load_s": None, "peak_rss": None,
                "bytes_per_weight": GGUF_TYPES[self.gguf_type]}


def main(a) -> int:
    peers = a.vs or []
    for peer in peers:
        if peer != "torch":
            raise UsageError(f"--vs: bench runs torch only (got {peer!r}); --llama-bench PATH runs llama.cpp")
    if a.json:
        check_file(a.json, "results")
    if a.llama_bench:
        LlamaBench.check(a.llama_bench)      # before minutes of building and exporting
    root = a.workdir or os.path.join(cache_dir(), "bench")
    path = build(a.shape, root, quiet=a.quiet)
    args = shape_args(a.shape)
    mode = choose_mode(open_tensors(path), a.weights)
    llama = None
    if a.llama_bench:
        # The format npllama's own weights are in: float32 copies, or bf16 when held tiled.
        gguf_type = a.gguf_type or ("bf16" if mode == "tiled" else "f32")
        llama = LlamaBench(a.llama_bench, export_gguf(path, root, a.shape, gguf_type), gguf_type, parallel.threads())
    results = [run_npllama(path, a.dtype, a.reps, mode, between=llama or (lambda: None))]
    results[0].update(name="npllama", bytes_per_weight=2 if mode == "tiled" else 4)
    if llama:
        results.append(llama.result())
    results += [run_torch(path, a.dtype, a.reps) for _ in peers]
    bounds = measure_bounds(args) if a.bound else None
    report(args, results, bounds)
    if a.json:
        data = {"shape": a.shape, "machine": machine(), "results": results, "bounds": bounds}

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
        write_file(a.json, write, "results")
    return 0
