"""Issue 24, class 7: non-finite results are errors naming where, never printed as results.
NaN weights make perplexity and KL divergence stop at the chunk whose logits hold them (no
`PPL = nan` with exit 0, no base file of NaN rows); a conversion whose output would hold an
infinity (an F64 1e300 stored as float32, 1e6 stored with --dtype float16) or a NaN names
the tensor and writes nothing. Every test here fails on main c1182df (checked)."""
import io
import json
import os
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from npllama import cli
from npllama.errors import NpllamaError
from npllama.inspect import perplexity as pp
from npllama.io.convert import convert
from npllama.model.model import Transformer
from oracles import random_weights, small_args

from tools import fuzz

ARGS = small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, multiple_of=32, max_seq_len=16)


def nan_model():
    w = random_weights(ARGS)
    w["layers.0.feed_forward.w2.weight"][3, 5] = np.nan
    return Transformer(ARGS, w, max_seq_len=16)


def test_perplexity_of_nan_weights_is_an_error_not_nan(tmp_path, capsys):
    model = nan_model()
    base = str(tmp_path / "base.kld")
    with pytest.raises(NpllamaError, match="chunk 1: the model's logits hold nan"):
        pp.run_perplexity(model, list(range(10)) * 4, 16, base_path=base, out=io.StringIO(), err=io.StringIO())
    assert not os.path.exists(base)     # no base file of NaN rows either


def test_kl_divergence_against_nan_weights_is_an_error(tmp_path):
    good = Transformer(ARGS, random_weights(ARGS), max_seq_len=16)
    base = str(tmp_path / "base.kld")
    pp.run_perplexity(good, list(range(10)) * 4, 16, base_path=base, out=io.StringIO(), err=io.StringIO())
    model = nan_model()
    with pytest.raises(NpllamaError, match="chunk 1: the model's logits hold nan"):
        pp.run_kl_divergence(model, pp.BaseFile.open(base), out=io.StringIO(), err=io.StringIO())


def hf_with(tmp_path, name, value, dtype):
    """fuzz's HF seed with one element of tensor `name` set to value, stored as dtype."""
    d = tmp_path / "hf"
    d.mkdir()
    fuzz.seed_hf(str(d))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    file = d / index["weight_map"][name]
    tensors = load_file(str(file))
    x = tensors[name].astype(dtype)
    x.reshape(-1)[7] = value
    tensors[name] = x
    save_file(tensors, str(file))
    return d


@pytest.mark.parametrize("value,stored,dtype", [(1e300, np.float64, None), (1e6, np.float32, "float16"),
                                                (np.nan, np.float32, None), (np.inf, np.float16, "bfloat16")])
def test_a_conversion_that_would_store_a_non_finite_value_names_the_tensor(tmp_path, capsys, value, stored, dtype):
    src = hf_with(tmp_path, "model.norm.weight", value, stored)
    argv = ["convert", str(src), str(tmp_path / "out"), "--quiet"] + (["--dtype", dtype] if dtype else [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # numpy's overflow warning is no report
        code = cli.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "npllama: warning:" not in line]
    err = "\n".join(errors)
    assert code == 1 and len(errors) == 1, err
    assert f"{src}: tensor norm.weight: element 7 is NaN or infinite" in err, err
    assert not os.path.exists(tmp_path / "out")
