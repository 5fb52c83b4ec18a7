#!/usr/bin/env python3
"""Converter speed and memory on a large synthetic Meta checkpoint.

    python tools/bench_convert.py --shape llama3.2-1b --mp 2 --workdir /tmp/npllama-bench

Writes random bf16 weights at a real shape as Meta's consolidated.NN.pth (torch.save; needs
torch), split into --mp model-parallel shards, then times `npllama convert` in a child
process and reports its wall time, throughput and peak RSS against the checkpoint's size.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def build_meta(path, args, mp, seed=0):
    import torch
    from npllama.bench.peers import random_tensor
    from npllama.io.formats.meta_pth import mp_axis
    from npllama.model.weights import expected_shapes
    os.makedirs(path, exist_ok=True)
    block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(np.float32)
    for s in range(mp):
        sd = {}
        for name, shape in expected_shapes(args).items():
            axis = mp_axis(name)
            shape = list(shape)
            if axis is not None:
                shape[axis] //= mp
            sd[name] = torch.from_numpy(random_tensor(tuple(shape), block)).bfloat16()
        torch.save(sd, os.path.join(path, f"consolidated.{s:02d}.pth"))
        del sd
    params = {k: v for k, v in args.to_dict().items() if k != "hidden_dim"}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)


def main():
    from npllama.model.config import PRESETS, preset
    from npllama.model.weights import expected_shapes
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--mp", type=int, default=1, help="model-parallel shards")
    p.add_argument("--workdir", default="/tmp/npllama-bench-convert")
    a = p.parse_args()
    args = preset(a.shape)
    src = os.path.join(a.workdir, f"{a.shape}-mp{a.mp}")
    if not os.path.isdir(src):
        print(f"building {src} ...", file=sys.stderr)
        build_meta(src, args, a.mp)
        # Start afresh: a child forked from this (torch-sized) process would inherit its
        # RSS high-water mark, and the measurement is of the converter alone.
        os.execv(sys.executable, [sys.executable, *sys.argv])
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    dst = os.path.join(a.workdir, "out")
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "npllama", "convert", src, dst, "--quiet"])
    # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would report the largest child
    # ever, and a forked child starts with its parent's RSS).
    _, status, usage = os.wait4(child.pid, 0)
    dt = time.perf_counter() - t0
    if status != 0:
        sys.exit("convert failed")
    peak = usage.ru_maxrss * 1024
    largest = max(int(np.prod(s)) for s in expected_shapes(args).values()) * 2
    print(f"{a.shape} mp={a.mp}: {size / 1e9:.2f} GB in {dt:.1f} s ({size / dt / 1e6:.0f} MB/s), "
          f"peak RSS {peak / 1e6:.0f} MB ({peak / size:.1%} of the checkpoint; "
          f"{peak / largest:.1f}x its largest tensor)")
    shutil.rmtree(dst, ignore_errors=True)


if __name__ == "__main__":
    main()
