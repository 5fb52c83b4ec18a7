"""The benchmark runs end to end on the tiny shape (no timing assertions: timings belong in
benchmarks, not in pass/fail tests)."""
import json
import os
import re
import subprocess
import sys

import numpy as np

from npllama import bench, checkpoint


def test_bench_runs_end_to_end_with_torch_and_bounds(tmp_path):
    r = subprocess.run([sys.executable, "-m", "npllama", "bench", "--shape", "tiny", "--reps", "1", "--vs", "torch",
                        "--bound", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json"), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pp128 tok/s" in out and "npllama float32 (resident)" in out and "HF LlamaForCausalLM" in out
    assert "ratio npllama / torch" in out and "limits: bandwidth" in out and "machine: " in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["results"]) == 2 and all(x["tg"]["median"] > 0 and x["pp"]["median"] > 0 for x in res["results"])
    # the checkpoint is cached: bf16 random weights at the shape
    index = checkpoint.read_index(str(tmp_path / "tiny-bf16"))
    assert {t["dtype"] for t in index["tensors"].values()} == {"bfloat16"}


def test_random_tensor_tiles_a_block():
    block = np.arange(5, dtype=np.float32)
    t = bench.random_tensor((3, 4), block)
    assert t.shape == (3, 4) and np.array_equal(t.ravel(), np.resize(block, 12))


LIMITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_limits.py")


def run_limits(*argv):
    r = subprocess.run([sys.executable, LIMITS, *argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_limits_tool_times_every_tiled_stage():
    out = run_limits("tiled", "--shape", "tiny", "--mb", "2", "--reps", "1")
    rows = [line for line in out.splitlines() if line.endswith("%")]
    stages = [re.split(r"\s{2,}", line)[0] for line in rows]
    assert stages == ["read (BLAS GEMV over the raw bytes)", "mask: odd columns, from memory",
                      "shift: even columns, in cache", "GEMV on the widened tile, in cache",
                      "whole pipeline, 1 thread", f"whole pipeline, {os.cpu_count()} threads",
                      f"1 thread's pipeline x {os.cpu_count()} cores (perfect)"]
    rates = [float(re.split(r"\s{2,}", line.strip())[1]) for line in rows]
    assert all(np.isfinite(rates)) and min(rates) > 0


def test_limits_table_splits_whatever_the_figures_width():
    # A fast machine on the tiny shape prints rates wider than their columns.
    sys.path.insert(0, os.path.dirname(LIMITS))
    from bench_limits import stage_row
    row = stage_row("whole pipeline, 1 thread", "13.52", "102927.92 tok/s", "12345%")
    assert re.split(r"\s{2,}", row.strip()) == ["whole pipeline, 1 thread", "13.52", "102927.92 tok/s", "12345%"]


def test_limits_tool_compares_gemms_with_torch():
    out = run_limits("gemm", "--shape", "tiny", "--reps", "1")
    m = re.search(r"npllama <= ([\d.]+) tok/s, torch <= ([\d.]+) tok/s \(ratio ([\d.]+)x\)", out)
    assert m, out
    ours, theirs, ratio = map(float, m.groups())
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.01 * ratio + 0.005


def test_long_bench_runs_end_to_end(tmp_path):
    tool = os.path.join(os.path.dirname(LIMITS), "bench_long.py")
    r = subprocess.run([sys.executable, tool, "--shape", "tiny", "--T", "40,70", "--chunk", "32", "--decode", "2",
                        "--reps", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["40"], ["70"])]
    assert [(x[0], x[1]) for x in rows] == [("40", "npllama"), ("40", "torch"), ("40", "npllama"),
                                            ("70", "npllama"), ("70", "torch"), ("70", "npllama")]
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [x["impl"].split()[0] for x in res] == ["npllama", "torch"] * 2
    for x in res:
        assert x["prefill_tps"] > 0 and x["decode_tps"] > 0 and x["peak"] >= x["base"] > 0
        assert len(x["prefill_s"]) == 2 and len(x["decode_s"]) == 2
    # npllama's KV cache is the memory model's, for the prompt and the decoded tokens
    assert res[2]["kv_cache"] == 2 * 2 * 72 * 2 * 16 * 4      # tiny: 2 layers, 2 KV heads x 16
