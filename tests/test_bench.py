"""The benchmark runs end to end on the tiny shape (no timing assertions: timings belong in
benchmarks, not in pass/fail tests)."""
import json
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
