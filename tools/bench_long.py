#!/usr/bin/env python3
"""Long prompts: prefill tok/s and peak RSS at several prompt lengths, and decode tok/s with
the long prompt in the KV cache; npllama beside HF transformers (torch, sdpa attention, float32)
on the same random weights. Every (implementation, length) runs in a process of its own, so
each peak RSS is that run's alone; the two implementations alternate.

    python tools/bench_long.py --shape llama3.2-1b --T 512,2048,8192
    python tools/bench_long.py --shape llama3.2-1b --T 32768 --layers 4      # fewer layers, same shapes

The weights are `npllama bench`'s (random bf16 at a real shape, built once and cached);
--layers keeps the first N. npllama runs resident float32 weights and prefills in chunks of
--chunk tokens. Memory target: npllama's peak RSS <= its RSS with the weights loaded
(float32 copies made, checkpoint pages read) + the KV cache + 1 GiB, the peak measured
from the prompt on (loading has its own, printed apart: widening a weight holds it twice
for a moment). torch needs
torch + transformers (the test extras); --vs none skips it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from npllama.model import memory  # noqa: E402
from npllama.bench.peers import build, machine, proc_status, reset_peak_rss  # noqa: E402
from npllama.io.checkpoint import open_tensors  # noqa: E402
from npllama.model.config import ModelArgs  # noqa: E402

GiB = 1024**3


def first_layers(path: str, layers: int | None):
    """The checkpoint's params and weights, keeping the first `layers` layers."""
    args = ModelArgs.from_json(os.path.join(path, "params.json"))
    n = layers or args.n_layers
    args = ModelArgs.from_dict(args.to_dict(), n_layers=n)
    weights = {k: v for k, v in open_tensors(path).items()
               if not (k.startswith("layers.") and int(k.split(".")[1]) >= n)}
    return args, weights


class AnonPeak:
    """The peak of RssAnon (memory the process allocated itself, not file pages it maps),
    sampled every 20 ms from a thread while the block runs: VmHWM counts the checkpoint's
    mapped pages too, which the kernel may drop at any time."""

    def __enter__(self):
        self.peak, self.done = proc_status("RssAnon") or 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, proc_status("RssAnon") or 0)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, proc_status("RssAnon") or 0)


def run_npllama(path, T, decode, layers, chunk, reps):
    from npllama.model.model import Transformer
    args, weights = first_layers(path, layers)
    model = Transformer(args, weights, max_seq_len=T + decode, weights_mode="resident", prefill_chunk=chunk)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, T + decode)
    model.forward(tokens[:8], last_only=True)              # first use: every weight made float32
    weights["tok_embeddings.weight"].sum(dtype=np.uint64)  # ...and every page of the embedding table read
    load_peak, base = proc_status("VmHWM"), proc_status("VmRSS")
    anon, mapped = proc_status("RssAnon"), proc_status("RssFile")
    reset_peak_rss()
    prefill, steps = [], []
    with AnonPeak() as own:
        for _ in range(reps):                              # each rep prefills from position 0 again
            t0 = time.perf_counter()
            logits = model.forward(tokens[:T], last_only=True)
            prefill.append(time.perf_counter() - t0)
    token = int(np.argmax(logits))
    for i in range(decode):
        t0 = time.perf_counter()
        token = int(np.argmax(model.forward(np.array([token]), start_pos=T + i, last_only=True)))
        steps.append(time.perf_counter() - t0)
    return {"impl": "npllama", "base": base, "peak": proc_status("VmHWM"), "load_peak": load_peak,
            "prefill_s": prefill, "decode_s": steps, "kv_cache": memory.kv_cache_bytes(args, T + decode),
            "weights_model": memory.weight_bytes(args), "anon_loaded": anon, "file_loaded": mapped,
            "anon_peak_prefill": own.peak}


def run_torch(path, T, decode, layers, chunk, reps):
    import torch
    from transformers import DynamicCache
    from trace_hf import hf_model
    torch.set_num_threads(os.cpu_count())
    args, weights = first_layers(path, layers)
    model = hf_model(args, weights, attn_implementation="sdpa")
    tokens = torch.tensor(np.random.default_rng(0).integers(0, args.vocab_size, T + decode))[None]
    prefill, steps = [], []
    with torch.inference_mode():
        model(tokens[:, :8])
        load_peak, base = proc_status("VmHWM"), proc_status("VmRSS")
        reset_peak_rss()
        for _ in range(reps):
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            out = model(tokens[:, :T], past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
    return {"impl": f"torch {torch.__version__} (HF sdpa)", "base": base, "peak": proc_status("VmHWM"),
            "load_peak": load_peak, "prefill_s": prefill, "decode_s": steps}


def worker(a) -> None:
    fn = run_npllama if a.worker == "npllama" else run_torch
    print(json.dumps(fn(a.path, a.T, a.decode, a.layers, a.chunk, a.reps)))


def spawn(impl, path, T, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--path", path, "--T", str(T),
           "--decode", str(a.decode), "--chunk", str(a.chunk), "--reps", str(a.reps)]
    cmd += ["--layers", str(a.layers)] if a.layers else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{impl} at T={T} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # medians: the first prefill at a new length and the first decode steps carry one-time costs
    res.update(T=T, prefill_tps=T / statistics.median(res["prefill_s"]),
               decode_tps=1 / statistics.median(res["decode_s"]) if a.decode else 0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="a shape of `npllama bench` (default tiny)")
    p.add_argument("--T", default="512,2048,8192", help="prompt lengths, comma-separated")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--decode", type=int, default=8, help="tokens decoded after each prompt (default 8; the "
                   "median step is reported)")
    p.add_argument("--reps", type=int, default=1, help="prefills of the prompt in each process (the median is "
                   "reported; default 1)")
    p.add_argument("--chunk", type=int, default=memory.PREFILL_CHUNK, help="npllama's prefill chunk")
    p.add_argument("--vs", choices=["torch", "none"], default="torch")
    p.add_argument("--workdir", help="where the bench checkpoints are cached (default: the npllama cache /bench)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=["npllama", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.T = int(a.T)
        worker(a)
        return 0
    import npllama
    path = build(a.shape, a.workdir or os.path.join(npllama.hub.cache_dir(), "bench"), quiet=True)
    lengths = [int(t) for t in a.T.split(",")]
    m = machine()
    print(f"machine: {m['cores']} cores, numpy {m['numpy']}, {m.get('blas', '')}")
    print(f"{a.shape}" + (f", first {a.layers} layers" if a.layers else "") + f", float32; npllama prefill chunk "
          f"{a.chunk}; prefill: median of {a.reps}; decode: median of {a.decode} steps after the prompt")
    print(f"{'T':>6} {'implementation':<28} {'prefill tok/s':>13} {'decode tok/s':>12} {'load peak':>9} "
          f"{'loaded':>8} {'peak RSS':>9} {'KV cache':>9} {'peak-loaded-KV':>14}")
    results = []
    for T in lengths:
        row = [spawn("npllama", path, T, a)] + ([spawn("torch", path, T, a)] if a.vs == "torch" else [])
        for r in row:
            extra = ""
            if r["impl"] == "npllama":
                over = r["peak"] - r["base"] - r["kv_cache"]
                extra = f" {r['kv_cache'] / GiB:8.2f}G {over / GiB:13.2f}G" + (" ok" if over <= GiB else " OVER 1 GiB")
                if r.get("anon_peak_prefill"):
                    own = r["anon_peak_prefill"] - r["weights_model"] - r["kv_cache"]
                    extra += (f"\n{'':>6} {'  own memory (RssAnon)':<28} loaded {r['anon_loaded'] / GiB:.2f}G, prefill "
                              f"peak {r['anon_peak_prefill'] / GiB:.2f}G = weights {r['weights_model'] / GiB:.2f}G + KV "
                              f"+ {own / GiB:.2f}G" + (" ok" if own <= GiB else " OVER 1 GiB") +
                              f"; mapped checkpoint pages (RssFile) {r['file_loaded'] / GiB:.2f}G")
            print(f"{T:>6} {r['impl']:<28} {r['prefill_tps']:13.2f} {r['decode_tps']:12.2f} "
                  f"{r['load_peak'] / GiB:8.2f}G {r['base'] / GiB:7.2f}G {r['peak'] / GiB:8.2f}G{extra}", flush=True)
        if len(row) == 2:
            print(f"{T:>6} {'npllama / torch':<28} {row[0]['prefill_tps'] / row[1]['prefill_tps']:12.2f}x "
                  f"{row[0]['decode_tps'] / row[1]['decode_tps'] if a.decode else 0:11.2f}x", flush=True)
        results += row
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"shape": a.shape, "layers": a.layers, "chunk": a.chunk, "reps": a.reps, "machine": m,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
