"""Issue 24, class 6: Python's own limits as the error path. Depth (a deep pre-tokenizer, a
50,000-deep pickled tuple), digit count (a 6,021-digit shape or offset), metadata of the
wrong type in a GGUF, odd HF post-processors, logits spread over 1e5 nats and an index
without shards each end in one npllama error (or, for the post-processor, no bos), never
RecursionError, ValueError, TypeError, IndexError, AttributeError, OverflowError or KeyError.
Every test here fails on main c1182df (checked)."""
import json
import os

import gguf
import numpy as np
import pytest

from npllama import cli
from npllama.errors import CheckpointError, NpllamaError, TokenizerError
from npllama.inspect import perplexity as pp
from npllama.io.convert import convert
from npllama.io.formats.meta_pth import PthFile
from npllama.text.tokenizer_import import hf_tokenizer_spec
from oracles import small_args, write_random_model
from test_hostile import FakeStorage, FakeTensor, write_pth

from tools import fuzz


@pytest.fixture
def hf_tok(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    fuzz.seed_hf_tokenizer(str(d))
    return d


def test_a_deep_pre_tokenizer_is_refused_by_its_depth(hf_tok):
    tj = json.loads((hf_tok / "tokenizer.json").read_text())
    nested = fuzz._nested(tj["pre_tokenizer"], 450)   # 900 JSON levels: under json's own limit
    tj["pre_tokenizer"] = nested
    (hf_tok / "tokenizer.json").write_text(fuzz._dump_deep(tj))
    with pytest.raises(TokenizerError, match="nested too deeply"):
        hf_tokenizer_spec(str(hf_tok))


@pytest.mark.parametrize("single", [[], 5, "x", [5], [{"SpecialToken": 5}], [{"SpecialToken": {"id": []}}]])
def test_odd_post_processors_add_no_bos(hf_tok, single):
    tj = json.loads((hf_tok / "tokenizer.json").read_text())
    tj["post_processor"] = {"type": "TemplateProcessing", "single": single}
    (hf_tok / "tokenizer.json").write_text(json.dumps(tj))
    assert hf_tokenizer_spec(str(hf_tok))["add_bos"] is False


def deep_shape_pth(path, depth):
    """A .pth whose one tensor has a shape nested `depth` tuples deep (the pickle written by
    hand: pickle's own writer recurses)."""
    write_pth(path, {"a": FakeTensor(FakeStorage("0", 4), 0, (7,), (1,))}, {"0": np.zeros(4, np.float32)})
    import zipfile
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = members["archive/data.pkl"]
    shape = b"K\x07\x85"                 # BININT1 7, TUPLE1: the (7,) the pickler wrote
    assert pkl.count(shape) == 1
    members["archive/data.pkl"] = pkl.replace(shape, b"K\x07" + b"\x85" * depth)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_50000_deep_pickled_tuple_is_a_checkpoint_error(tmp_path):
    path = str(tmp_path / "consolidated.00.pth")
    deep_shape_pth(path, 50_000)
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        PthFile(path)


@pytest.mark.parametrize("where", ["offset", "shape", "stride"])
def test_a_6021_digit_integer_is_a_checkpoint_error(tmp_path, where):
    huge = 10**6020
    t = {"offset": FakeTensor(FakeStorage("0", 4), huge, (2,), (1,)),
         "shape": FakeTensor(FakeStorage("0", 4), 0, (huge,), (1,)),
         "stride": FakeTensor(FakeStorage("0", 4), 0, (2,), (huge,))}[where]
    path = str(tmp_path / "consolidated.00.pth")
    write_pth(path, {"a": t}, {"0": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="consolidated.00.pth") as e:
        PthFile(path)
    assert len(str(e.value)) < 400


@pytest.mark.parametrize("key,how", [("tokenizer.ggml.pre", "array"), ("tokenizer.ggml.merges", "int32"),
                                     ("tokenizer.ggml.tokens", "int32"), ("tokenizer.chat_template", "array")])
def test_gguf_metadata_of_the_wrong_type_is_an_npllama_error(tmp_path, monkeypatch, key, how):
    original = gguf.GGUFWriter.add_key_value

    def add_key_value(self, k, value, vtype, *a, **kw):
        if k == key:
            return original(self, k, ["a", "b"], gguf.GGUFValueType.ARRAY) if how == "array" else \
                original(self, k, 5, gguf.GGUFValueType.INT32)
        return original(self, k, value, vtype, *a, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "add_key_value", add_key_value)
    # the seed has no merges, which gguf's writer then leaves out: give the key a value to replace
    monkeypatch.setattr(gguf.GGUFWriter, "add_token_merges",
                        lambda self, m: add_key_value(self, "tokenizer.ggml.merges", ["a b"], gguf.GGUFValueType.ARRAY))
    fuzz.seed_gguf(str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(NpllamaError, match=key.replace(".", r"\.")):
        convert(str(tmp_path / "model.gguf"), str(tmp_path / "out"), quiet=True)


def test_logits_spread_over_1e5_nats_are_a_non_finite_error():
    result = pp.Perplexity()
    nll = pp.token_nll(np.array([[0.0, 1e5]], np.float32), np.array([0]))   # 1e5 nats: exp overflows
    with pytest.raises(NpllamaError, match="not a finite number"):
        result.add(nll, 0.1, 2)
        result.ppl


def test_info_verify_on_an_index_without_shards(tmp_path, capsys):
    path = write_random_model(str(tmp_path / "m"), small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                              vocab_size=8, multiple_of=32))
    index = json.loads(open(os.path.join(path, "index.json")).read())
    del index["shards"]
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)
    assert cli.main(["info", path, "--verify"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lists no shards" in err, err
