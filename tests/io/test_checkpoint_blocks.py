"""`npllama convert x.gguf DIR` keeps a GGUF's quantized matrices as their blocks: the
checkpoint is the file's size, not float32's, runs exactly as the GGUF itself does, and is
checked on reading as every other tensor is (a hostile index or member is one line)."""
import json
import os

import gguf
import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.errors import NonFiniteError, NpllamaError
from npllama.io import checkpoint
from npllama.io.convert import convert
from npllama.model.config import ModelArgs
from npllama.model.quant import QuantTensor
from tools.random_gguf import write

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=256, max_seq_len=64)
PROMPT = np.array([1, 17, 42, 299, 5])


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    # a Q4_K_M-like mix: Q4_K, with the untied head and the w2s in Q6_K
    types = {"output.weight": "Q6_K"} | {f"layers.{i}.feed_forward.w2.weight": "Q6_K" for i in range(2)}
    return write(str(tmp_path_factory.mktemp("gguf") / "m.gguf"), ARGS, "Q4_K", seed=1, types=types)


def test_blocks_are_kept_and_run_as_the_gguf_does(q4_k_m, tmp_path):
    out = str(tmp_path / "blocks")
    index = convert(q4_k_m, out, quiet=True, blocks=True)
    kinds = {t["dtype"] for t in index["tensors"].values()}
    assert kinds == {"Q4_K", "Q6_K", "float32"}                     # the norms are vectors: float32
    assert index["tensors"]["output.weight"] == {**index["tensors"]["output.weight"], "dtype": "Q6_K",
                                                   "shape": [300, 256]}
    stored = sum(s["size"] for s in index["shards"].values())
    assert stored < 1.1 * os.path.getsize(q4_k_m)                   # float32 would be ~7x the file
    model = npllama.load(out, weights_mode="quantized")
    assert isinstance(model.weights["layers.0.attention.wq.weight"], QuantTensor)
    # the same blocks through the same code: the same logits, bit for bit
    same = npllama.load(q4_k_m, weights_mode="quantized")
    assert np.array_equal(model.forward(PROMPT), same.forward(PROMPT))
    # widened when float32 fits, and with --dtype float32 dequantized by gguf's own code: the
    # same values (tests/model/test_quant.py), so float32 summation order apart (1e-5 of scale)
    floats = str(tmp_path / "floats")
    convert(q4_k_m, floats, dtype="float32", quiet=True, blocks=True)
    want = npllama.load(floats).forward(PROMPT)
    assert np.abs(npllama.load(out, weights_mode="resident").forward(PROMPT) - want).max() <= 1e-5 * np.abs(want).max()
    assert checkpoint.verify(out) == [] and checkpoint.nonfinite(out) == []


def test_the_command_line_keeps_blocks_and_info_reports_them(q4_k_m, tmp_path, capsys):
    out = str(tmp_path / "m-np")
    assert cli.main(["convert", q4_k_m, out, "--quiet"]) == 0
    assert cli.main(["info", out, "--verify"]) == 0
    text = capsys.readouterr().out
    assert "Q4_K x13" in text and "Q6_K x3" in text and "every weight finite" in text


def test_a_nan_scale_is_refused_before_anything_is_written(q4_k_m, tmp_path):
    bad = str(tmp_path / "nan.gguf")
    with open(q4_k_m, "rb") as f:
        data = bytearray(f.read())
    t = next(t for t in gguf.GGUFReader(q4_k_m).tensors if t.name == "blk.1.attn_q.weight")
    data[t.data_offset + 144 * 3:t.data_offset + 144 * 3 + 2] = np.array([0x7C00], np.uint16).tobytes()  # +inf d
    with open(bad, "wb") as f:
        f.write(data)
    with pytest.raises(NonFiniteError, match=r"nan\.gguf: .*layers\.1\.attention\.wq\.weight.*NaN or infinite"):
        convert(bad, str(tmp_path / "out"), quiet=True, blocks=True)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("entry, says", [
    ({"shape": [256, 100]}, "not a whole number of Q4_K blocks"),
    ({"shape": [256]}, "blocks must be a matrix"),
    ({"shape": [128, 256]}, "is |u1[256, 144], index says |u1[128, 144]"),
    ({"dtype": "Q9_9"}, "unknown dtype"),
])
def test_a_hostile_index_entry_for_blocks_is_one_line(q4_k_m, tmp_path, entry, says):
    out = str(tmp_path / "blocks")
    convert(q4_k_m, out, quiet=True, blocks=True)
    path = os.path.join(out, "index.json")
    with open(path) as f:
        index = json.load(f)
    index["tensors"]["layers.0.attention.wq.weight"].update(entry)
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(NpllamaError) as e:
        checkpoint.open_tensors(out)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_golden_digest_covers_the_blocks(q4_k_m, tmp_path):
    from npllama.inspect.golden import weights_digest
    out = str(tmp_path / "blocks")
    convert(q4_k_m, out, quiet=True, blocks=True)
    gguf_digest = weights_digest(npllama.load(q4_k_m, weights_mode="quantized").weights)
    assert weights_digest(npllama.load(out).weights) == gguf_digest          # the same blocks, the same digest
    weights = dict(npllama.load(out).weights)
    w = weights["layers.1.attention.wq.weight"]
    raw = w.raw.copy()
    raw[3, 20] ^= 1                                                           # one bit of one block's integers
    weights[w.name] = QuantTensor(raw.reshape(-1), w.qtype, w.shape, w.name)
    assert weights_digest(weights) != gguf_digest
