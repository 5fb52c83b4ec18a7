"""The benchmark runs end to end on the tiny shape (no timing assertions: timings belong in
benchmarks, not in pass/fail tests)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from npllama.bench import peers as bench
from npllama.io import checkpoint
from oracles import ROOT


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


LIMITS = os.path.join(ROOT, "tools", "bench_limits.py")


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
    from tools.bench_limits import stage_row
    row = stage_row("whole pipeline, 1 thread", "13.52", "102927.92 tok/s", "12345%")
    assert re.split(r"\s{2,}", row.strip()) == ["whole pipeline, 1 thread", "13.52", "102927.92 tok/s", "12345%"]


def test_limits_tool_compares_gemms_with_torch():
    out = run_limits("gemm", "--shape", "tiny", "--reps", "1")
    m = re.search(r"npllama <= ([\d.]+) tok/s, torch <= ([\d.]+) tok/s \(ratio ([\d.]+)x\)", out)
    assert m, out
    ours, theirs, ratio = map(float, m.groups())
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.01 * ratio + 0.005


def test_limits_tool_times_both_weight_layouts():
    from tools.bench_limits import layouts
    a = bench.shape_args("tiny")
    hd, kv, d, f, L = a.head_dim, a.n_kv_heads, a.dim, a.ffn_dim, a.n_layers
    r = layouts(a, T=8, mb=1, reps=1)
    # every matmul of a token, as npllama issues them (wq|wk|wv and w1|w3 fused), and the head
    assert list(r) == [(d, (a.n_heads + 2 * kv) * hd, L), (a.n_heads * hd, d, L), (d, 2 * f, L), (f, d, L),
                       (d, a.vocab_size, 1)]
    for forms in r.values():
        assert list(forms) == ["(out, in), x @ w.T", "(in, out), x @ w"]
        assert all(g > 0 and m > 0 for g, m in forms.values())
    out = run_limits("layout", "--shape", "tiny", "--mb", "1", "--reps", "1", "--tokens", "8")
    assert len(re.findall(r"the matmuls alone allow decode <= [\d.]+ tok/s, prefill <= [\d.]+ tok/s", out)) == 2, out


FAKE_LLAMA_BENCH = """#!{python}
# Stands in for llama.cpp's llama-bench: logs its argv, answers in its -o json form.
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if {fail!r}:
    sys.exit("error: failed to load model")
n = sum(1 for _ in open({log!r}))
row = dict(build_commit="0c1e570", n_prompt=128, n_gen=0, samples_ts=[100.0 + n])
print(json.dumps([row, dict(row, n_prompt=0, n_gen=32, samples_ts=[10.0 * n])]))
"""


def fake_llama_bench(tmp_path, fail=False):
    path, log = tmp_path / "llama-bench", tmp_path / "calls.log"
    path.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log), fail=fail))
    path.chmod(0o755)
    return str(path), log


def test_llama_bench_runs_on_a_gguf_of_the_same_weights_once_per_repetition(tmp_path):
    import gguf
    binary, log = fake_llama_bench(tmp_path)
    r = subprocess.run([sys.executable, "-m", "npllama", "bench", "--shape", "tiny", "--reps", "3", "--llama-bench",
                        binary, "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json"), "--quiet", "-t", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 3                                  # one llama-bench repetition per npllama one
    gguf_path = str(tmp_path / "tiny-f32.gguf")
    assert calls[0] == ["-m", gguf_path, "-p", "128", "-n", "32", "-t", "2", "-r", "1", "-o", "json"]  # npllama's -t
    # The GGUF holds the bench checkpoint's weights, as float32.
    reader = gguf.GGUFReader(gguf_path)
    t = {x.name: x for x in reader.tensors}
    src = checkpoint.open_tensors(str(tmp_path / "tiny-bf16"))
    from npllama.model import bf16
    want = bf16.from_bits(np.asarray(src["layers.1.feed_forward.w2.weight"]))
    got = np.asarray(t["blk.1.ffn_down.weight"].data).reshape(want.shape)
    assert t["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want)
    res = json.loads((tmp_path / "r.json").read_text())
    ours, theirs = res["results"]
    assert theirs["name"] == "llama.cpp" and theirs["bytes_per_weight"] == 4
    assert theirs["pp"] == {"median": 102.0, "min": 101.0, "max": 103.0}      # every sample the fake gave
    assert theirs["tg"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    m = re.search(r"ratio npllama / llama\.cpp: pp128 ([\d.]+)x, tg32 ([\d.]+)x", r.stdout)
    assert m, r.stdout
    assert float(m[1]) == round(ours["pp"]["median"] / 102.0, 2) and float(m[2]) == round(ours["tg"]["median"] / 20.0, 2)
    assert "llama.cpp 0c1e570 F32 GGUF" in r.stdout


def test_llama_bench_failures_are_one_line_errors(tmp_path):
    binary, _ = fake_llama_bench(tmp_path, fail=True)
    for path, message in [(binary, "llama-bench did not give its JSON results (exit 1): error: failed to load model"),
                          (str(tmp_path / "missing"), "not an executable file")]:
        r = subprocess.run([sys.executable, "-m", "npllama", "bench", "--shape", "tiny", "--reps", "1",
                            "--llama-bench", path, "--workdir", str(tmp_path), "--quiet"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_budget_splits_a_decode_token_between_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path))
    from tools.bench_limits import decode_budget
    a = bench.shape_args("tiny")
    hd, kv, d, f, L = a.head_dim, a.n_kv_heads, a.dim, a.ffn_dim, a.n_layers
    for dtype, weights, nbytes in [("float32", "resident", 4), ("float32", "tiled", 2), ("bfloat16", "resident", 4)]:
        mode, parts, total = decode_budget("tiny", dtype, weights, 3)
        cache = 2 if dtype == "bfloat16" else 4       # bf16 numerics keep a bf16 KV cache
        assert mode == weights
        # bytes each part reads per token, from the shapes (the first measured token is at
        # position 129: 130 cached positions)
        want = {"wq|wk|wv products": L * d * (a.n_heads + 2 * kv) * hd * nbytes, "wo products": L * a.n_heads * hd * d * nbytes,
                "w1|w3 products": L * d * 2 * f * nbytes, "w2 products": L * f * d * nbytes,
                "lm_head products": a.vocab_size * d * nbytes, "attention (reads the KV cache)": L * 2 * 130 * kv * hd * 4,
                "KV-cache writes": L * 2 * kv * hd * cache, "RMSNorm": 0, "RoPE": 0, "SwiGLU": 0,
                "rest (residual adds, reshapes, Python)": 0}
        if dtype == "bfloat16":
            want["KV-cache bf16 conversions"] = 0
        assert {p: b for p, (_, b) in parts.items()} == want
        assert all(t > 0 for p, (t, _) in parts.items() if not p.startswith("rest"))
        assert sum(t for t, _ in parts.values()) == pytest.approx(total, rel=1e-9)


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
