"""A model larger than memory: with weights_mode "tiled" the weights stay in the memory-mapped
file as stored (float32 read in place by the matmuls, bf16 widened a tile at a time), so no
copy of a weight is made and the page cache streams them from disk. "auto" picks it when the
float32 copies would not fit."""
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import npllama
from npllama.model import bf16, weights
from npllama.io.checkpoint import write_checkpoint
from oracles import ROOT, TESTS, gguf_float32, random_weights, small_args
from tools.random_gguf import write as write_gguf

pytestmark = pytest.mark.slow

FP32_TOL = 1e-5   # float32, only the summation order inside the matmuls differs (as test_model's)


def write_model(path, args, dtype="float32", seed=0):
    w = random_weights(args, seed=seed)
    if dtype == "bfloat16":
        w = {k: bf16.to_bits(v) for k, v in w.items()}
    write_checkpoint(str(path), args, iter(w.items()), 0, len(w), quiet=True)
    return str(path)


def test_tiled_float32_weights_are_used_where_they_are(tmp_path):
    args = small_args(dim=128, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=8192)
    model = npllama.load(write_model(tmp_path / "m", args), weights_mode="tiled")
    largest = max(w.nbytes for w in model.weights.values())            # the head: 4 MB
    tokens = np.array([5, 17, 300, 8000])
    tracemalloc.start()                                                # numpy reports its arrays to it
    try:
        base = tracemalloc.get_traced_memory()[0]
        model.forward(tokens)
        model.forward(np.array([9]), start_pos=4)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # activations only (4 positions' logits are 128 KB): not one weight was copied, even for a moment
    assert peak < largest / 4
    assert all(v.ndim == 1 for v in model._ready.values())             # norms only are kept
    assert all(isinstance(w, np.memmap) for w in model.weights.values())


def test_auto_goes_tiled_when_float32_copies_would_not_fit(monkeypatch):
    tensors = {"a": np.zeros((1000, 1000), np.float32)}                 # 4 MB as float32
    monkeypatch.setattr(weights, "available_memory", lambda: 10 * 10**6)
    assert weights.choose_mode(tensors, "auto") == "resident"          # 4 MB <= 0.6 * 10 MB
    assert weights.choose_mode(tensors, "auto", share=2) == "tiled"    # half the memory each
    monkeypatch.setattr(weights, "available_memory", lambda: 6 * 10**6)
    assert weights.choose_mode(tensors, "auto") == "tiled"
    assert weights.choose_mode(tensors, "resident") == "resident"      # asked for: as asked


def test_tiled_weights_larger_than_memory_are_not_refused_a_context():
    from npllama.model import memory
    from npllama.model.config import preset
    args = preset("llama3.1-70b")                                       # 141 GB bf16
    available = 20 * 2**30                                             # a 24 GB machine's
    assert memory.weight_bytes(args, "tiled") > 6 * available
    need = memory.needed_bytes(args, 4096, weights_mode="tiled")
    assert need["total"] - need["weights"] < available                 # all but the weights fits
    # tiled: the page cache streams the weights, so the context needs only the rest to fit
    assert memory.choose_context(args, 4096, available, weights_mode="tiled") == 4096
    assert 0 < memory.choose_context(args, None, available, weights_mode="tiled") <= args.max_seq_len
    with pytest.raises(npllama.errors.UsageError, match="positions"):   # resident copies must fit
        memory.choose_context(args, 4096, available, weights_mode="resident")
    with pytest.raises(npllama.errors.UsageError, match="positions"):   # and so must the KV cache
        memory.choose_context(args, 131072, 2**30, weights_mode="tiled")


# RLIMIT_DATA caps a process's private writable memory (heap, anonymous maps: every numpy
# array) but not read-only maps of files, which is what the weights are: under it, a model
# whose float32 copies exceed the cap runs only if no copy is made. (RLIMIT_AS would count
# the maps too.)
CAPPED = """
import resource, sys
import numpy as np
import npllama
sys.path[:0] = sys.argv[5].split(":")      # this test module's folder, and tests/ for oracles
from test_larger_than_memory import greedy_logits
path, mode, out, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = npllama.load(path, weights_mode=mode, max_seq_len=16)
np.ones((256, 256), np.float32) @ np.ones((256, 256), np.float32)   # BLAS's own buffers, before the cap

def vm_data():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))

cap = vm_data() + headroom
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
try:
    logits = greedy_logits(model, int(sys.argv[6]))
except MemoryError:
    sys.exit(3)
np.save(out, logits)
"""

def greedy_logits(model, steps: int = 1) -> np.ndarray:
    """A prompt's logits, then `steps` greedy decoding steps' (the capped run's and its
    reference's): (8 + steps, vocab)."""
    tokens = np.array([1, 2, 3, 5, 8, 13, 21, 34])
    logits = [model.forward(tokens)]
    token = tokens[-1]
    for i in range(steps):
        logits.append(model.forward(np.array([token]), start_pos=len(tokens) + i, last_only=True)[None])
        token = int(np.argmax(logits[-1]))
    return np.concatenate(logits)


ARGS = small_args(dim=512, n_heads=8, n_kv_heads=4, n_layers=4, vocab_size=32000, multiple_of=256)
HEADROOM = 64 * 2**20


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_larger_than_its_memory_cap_runs_tiled(tmp_path, dtype):
    path = write_model(tmp_path / "m", ARGS, dtype)
    as_float32 = sum(int(np.prod(s)) * 4 for s in weights.expected_shapes(ARGS).values())
    assert as_float32 > 2.5 * HEADROOM                                  # 181 MB of float32 weights

    def run(mode):
        out = str(tmp_path / f"{mode}.npy")
        return capped(path, mode, out), out

    r, _ = run("resident")
    assert r.returncode == 3, r.stderr                                  # the cap bites: copies do not fit
    r, out = run("tiled")
    assert r.returncode == 0, r.stderr
    want = greedy_logits(npllama.load(path, weights_mode="resident", max_seq_len=16))
    got = np.load(out)
    assert np.abs(got - want).max() < FP32_TOL * np.abs(want).max()


def capped(path: str, mode: str, out: str, steps: int = 1) -> subprocess.CompletedProcess:
    """CAPPED in a fresh interpreter: its exit code 3 when the cap refused memory."""
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run([sys.executable, "-c", CAPPED, path, mode, out, str(HEADROOM), f"{here}:{TESTS}", str(steps)],
                          capture_output=True, text=True, timeout=300, cwd=os.getcwd())


def test_a_quantized_model_whose_float32_copy_exceeds_the_cap_runs_quantized(tmp_path):
    # Q4_K, as most of a Q4_K_M file is, the head Q8_0 (widened in place) and one matrix Q6_K
    types = {"output.weight": "Q8_0", "layers.1.feed_forward.w2.weight": "Q6_K"}
    path = write_gguf(str(tmp_path / "m.gguf"), ARGS, "Q4_K", types=types)
    as_float32 = sum(int(np.prod(s)) * 4 for s in weights.expected_shapes(ARGS).values())
    assert as_float32 > 2.5 * HEADROOM and os.path.getsize(path) < HEADROOM    # 181 MB; 34 MB
    assert capped(path, "resident", str(tmp_path / "resident.npy")).returncode == 3
    r = capped(path, "quantized", str(tmp_path / "quantized.npy"), steps=4)
    assert r.returncode == 0, r.stderr
    # the float32 model of the gguf library's dequantization (FP32_TOL: the summation order only)
    want = greedy_logits(npllama.Transformer(ARGS, gguf_float32(path), weights_mode="resident", max_seq_len=16), 4)
    got = np.load(str(tmp_path / "quantized.npy"))
    assert np.abs(got - want).max() < FP32_TOL * np.abs(want).max()


SCALE = os.path.join(ROOT, "tools", "bench_scale.py")


def test_scale_tool_measures_and_plans(tmp_path):
    """tools/bench_scale.py runs end to end on the tiny shape (its figures are for the README,
    not for pass/fail)."""
    def run(*argv):
        r = subprocess.run([sys.executable, SCALE, *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = run("stream", "--shape", "tiny", "--store", "float32", "--tokens", "2", "--workdir", str(tmp_path))
    assert "weights tiled" in out and "s/token, reading" in out and "peak RSS" in out
    out = run("layer", "--shape", "tiny", "--reps", "2", "--workdir", str(tmp_path))
    assert "layer   0:" in out and "layer   1:" in out and "ms per GB" in out
    # Llama 3.1 70B: 80 equal layers, and embeddings equal to the head, so 40 layers a stage; 80 x
    # 855,654,400 + 2 x 1,050,673,152 + 8,192 (final norm) parameters, 2 bytes each: 141.1 GB
    out = run("plan", "--model", "llama3.1-70b", "--stages", "2", "--ms-per-gb", "100")
    assert "layers   0..39  (40)" in out and "layers  40..79  (40)" in out and "141.1 GB bf16" in out
