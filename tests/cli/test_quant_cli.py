"""`-m x.gguf --weights quantized` on the command line: the GGUF runs as it is (no conversion
into the cache, no float copy), and generates the tokens that the float32 model converted from
the same file (the gguf library's dequantization: an independent implementation) generates."""
import json
import os

import pytest

from npllama import cli
from npllama.errors import UsageError
from npllama.model import weights
from npllama.model.config import ModelArgs
from tools.random_gguf import BYTE_VOCAB, write

# K-quants need rows of 256; the byte vocabulary of tools/random_gguf.py (256 bytes, bos, eos)
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=BYTE_VOCAB, multiple_of=256,
                 max_seq_len=64)
STEPS = 10
# The two runs' logits differ only by float32 summation order (tests/model/test_quant_model.py:
# within 1e-5 of their scale), so greedy picks the same token wherever the reference's best
# two log-probabilities are further apart than that; the test checks its own data has that
# margin at every step rather than hoping for it.
MARGIN = 1e-3


def generate(capsys, path: str, mode: str, *more: str) -> list[dict]:
    """npllama generate, in this process: its per-token JSON lines and the result line."""
    capsys.readouterr()
    assert cli.main(["generate", "-m", path, "--weights", mode, "--raw", "--json", "--logprobs", "2",
                     "--max-new-tokens", str(STEPS), "-t", "1", *more, "Quantized weights"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def converted(cache: str) -> list[str]:
    folder = os.path.join(cache, "converted")
    return [n for n in os.listdir(folder) if n != "hashes.json"] if os.path.isdir(folder) else []


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantized_runs_the_gguf_as_it_is_and_generates_what_float32_does(tmp_path, monkeypatch, capsys, qtype):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("NPLLAMA_CACHE", cache)
    path = write(str(tmp_path / "m.gguf"), ARGS, qtype, seed=3, byte_vocab=True)
    got = generate(capsys, path, "quantized")
    assert converted(cache) == []                       # nothing written: the file itself ran
    want = generate(capsys, path, "resident")           # converted once into the cache, float32
    assert len(converted(cache)) == 1
    # The same tokens and the same end (the byte vocabulary's eos may come before STEPS).
    assert got[-1]["ids"] == want[-1]["ids"] and got[-1]["stop_reason"] == want[-1]["stop_reason"]
    assert len(want[-1]["ids"]) >= 5
    for step in want[:-1]:
        best, second = step["top"]
        assert best["logprob"] - second["logprob"] > MARGIN


def test_llama_cpp_numerics_run_the_gguf_as_it_is_whatever_holds_its_weights(tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("NPLLAMA_CACHE", cache)
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q4_1", seed=3, byte_vocab=True)
    resident = generate(capsys, path, "resident", "--numerics", "llama.cpp")
    quantized = generate(capsys, path, "quantized", "--numerics", "llama.cpp")
    assert converted(cache) == []                       # the blocks decide the activations: never converted
    assert resident[-1]["ids"] == quantized[-1]["ids"]  # float32 copies or tiles: summation order only
    for step in resident[:-1]:
        best, second = step["top"]
        assert best["logprob"] - second["logprob"] > MARGIN
    # and they are not float32's numerics: 8-bit activations move log-probabilities by ~1e-3
    float32 = generate(capsys, path, "quantized")
    assert abs(float32[0]["top"][0]["logprob"] - resident[0]["top"][0]["logprob"]) > 1e-5


def test_auto_runs_a_gguf_quantized_when_float32_copies_would_not_fit(tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("NPLLAMA_CACHE", cache)
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q4_0", byte_vocab=True)
    monkeypatch.setattr(weights, "available_memory", lambda: 10**6)    # float32 copies: 3.3 MB
    small = generate(capsys, path, "auto")
    assert converted(cache) == []
    monkeypatch.setattr(weights, "available_memory", lambda: 10**10)
    assert generate(capsys, path, "auto")[-1]["ids"] == small[-1]["ids"] and len(converted(cache)) == 1


def test_quantized_with_ray_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys):
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q8_0", byte_vocab=True)
    assert cli.main(["generate", "-m", path, "--weights", "quantized", "--ray", "local", "hi"]) != 0
    assert "--ray runs converted checkpoints" in capsys.readouterr().err


def test_a_gguf_without_a_tokenizer_says_so_in_one_line(tmp_path, capsys):
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q8_0")
    assert cli.main(["generate", "-m", path, "--weights", "quantized", "hi"]) != 0
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
