"""What an independent red-team pass found in checkpoints that keep a GGUF's blocks (and
around them), each now one line: a zero-size block entry with a 2**62-row loop behind it,
dimensions numpy cannot make, an ignored tensor of any shape, a derived FFN width of 0, a
shard no tensor uses, and a trace of NaN logits that exited 0."""
import os
import shutil

import gguf
import numpy as np
import pytest

from npllama import cli
from npllama.errors import ConfigError, NpllamaError
from npllama.io import checkpoint
from npllama.io.convert import convert
from npllama.model.config import ModelArgs
from test_hostile import edit_index
from tools.random_gguf import BYTE_VOCAB, write

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=BYTE_VOCAB, multiple_of=256, max_seq_len=64)


@pytest.fixture(scope="module")
def q4_k_gguf(tmp_path_factory):
    return write(str(tmp_path_factory.mktemp("gguf") / "m.gguf"), ARGS, "Q4_K", byte_vocab=True)


@pytest.fixture
def blocks(q4_k_gguf, tmp_path):
    convert(q4_k_gguf, str(tmp_path / "orig"), quiet=True, blocks=True)
    return str(tmp_path / "orig")


def edited_index(src, dst, edit):
    shutil.copytree(src, dst)
    edit_index(dst, edit)
    return dst


def extra_entry(name, entry):
    def edit(index):
        shard = next(iter(index["shards"]))
        index["tensors"][name] = {"shard": shard, **entry}
    return edit


@pytest.mark.parametrize("name, entry, says", [
    ("rope.freqs", {"dtype": "Q4_K", "shape": [2**62, 0]}, "more elements than any file can hold"),
    ("rope.freqs", {"dtype": "Q4_K", "shape": [2**40, 0]}, "must be a matrix with rows and columns"),
    ("rope.freqs", {"dtype": "float32", "shape": [2**70, 0]}, "more elements than any file can hold"),
    ("rope.freqs", {"dtype": "float32", "shape": [7]}, "rope.freqs: shape (7,), the params say (32,)"),
    ("layers.0.attention.wq.weight", {"dtype": "Q4_K", "shape": [0, 256]}, "must be a matrix with rows and columns"),
])
def test_entries_that_loop_or_cannot_be_made_are_refused(blocks, tmp_path, capsys, name, entry, says):
    path = edited_index(blocks, str(tmp_path / "ck"), extra_entry(name, entry))
    for argv in (["info", path, "--verify"], ["generate", "-m", path, "--tokens", "1,2", "--max-new-tokens", "1"]):
        assert cli.main(argv) != 0
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_shard_no_tensor_uses_is_refused(blocks, tmp_path):
    def edit(index):
        index["shards"]["phantom.npz"] = {"size": 10**30, "sha256": "0" * 64}
    path = edited_index(blocks, str(tmp_path / "ck"), edit)
    with pytest.raises(NpllamaError, match="phantom.npz.* holds no tensor the index lists"):
        checkpoint.read_index(path)


def test_a_feed_forward_width_that_derives_to_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="feed-forward width derives to 0.*ffn_dim_multiplier"):
        ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=256,
                  ffn_dim_multiplier=1e-9)


def test_a_trace_with_nan_logits_is_written_but_fails(tmp_path, capsys):
    path = write(str(tmp_path / "f32.gguf"), ARGS, "F32", byte_vocab=True)
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    with open(path, "r+b") as f:                     # an F32 matrix has no scales to refuse: one NaN weight
        f.seek(t.data_offset + 4 * 7)
        f.write(np.array([np.nan], np.float32).tobytes())
    out = str(tmp_path / "t.npz")
    assert cli.main(["trace", "-m", path, "--numerics", "llama.cpp", "hi", "-o", out]) == 1
    err = capsys.readouterr().err
    assert os.path.exists(out) and "non-finite values, first at layers.0.q" in err


def test_force_never_replaces_a_checkpoint_holding_files_npllama_did_not_write(blocks, tmp_path, q4_k_gguf):
    # second red-team pass: a folder was "ours" by its index.json alone, and --force deleted it whole
    for extra in ("NOTES.md", os.path.join("sub", "deep.txt")):
        dst = str(tmp_path / extra.replace(os.sep, "_"))
        shutil.copytree(blocks, dst)
        os.makedirs(os.path.dirname(os.path.join(dst, extra)), exist_ok=True)
        with open(os.path.join(dst, extra), "w") as f:
            f.write("precious")
        with pytest.raises(NpllamaError, match="not a converted checkpoint npllama wrote.*nothing was touched"):
            convert(q4_k_gguf, dst, force=True, quiet=True, blocks=True)
        with open(os.path.join(dst, extra)) as f:
            assert f.read() == "precious"
    convert(q4_k_gguf, blocks, force=True, quiet=True, blocks=True)   # its own checkpoint: replaced


def test_a_gguf_norm_stored_as_blocks_is_refused(tmp_path):
    from npllama.io.formats.gguf_file import open_gguf
    path = write(str(tmp_path / "m.gguf"), ARGS, "Q8_0", byte_vocab=True)
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_norm.weight")
    with open(path, "r+b") as f:              # its type field, after name, n_dims and dims
        f.seek(t.field.offset + 8 + len(t.name) + 4 + 8 * len(t.shape))
        f.write(np.array([8], np.uint32).tobytes())   # Q8_0: fits inside the F32 bytes
    with pytest.raises(NpllamaError, match="attn_norm.weight.*is a vector of type Q8_0"):
        open_gguf(path)
