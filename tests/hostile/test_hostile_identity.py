"""Issue 24, class 3: the identity of what is read. The conversion cache key covers every
file the HF converter reads (shards its index puts in a subfolder or names without the
usual suffix); files are sized and checked before they are hashed (a 1 TB sparse file is
refused, not hashed); and through the Python API a file replaced after its checks is read
through the descriptor that was checked, a truncated one giving an npllama error. Every
test here fails on main c1182df (checked): the stale conversion is used, the sparse file
is hashed for minutes, the outside file is read, numpy's ValueError escapes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npllama.errors import CheckpointError
from npllama.io import checkpoint, hub
from npllama.io.convert import convert
from npllama.io.formats.hf import read_hf
from tools import fuzz


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def hf_with_odd_shard(d, vocab: int = 8):
    """fuzz's HF seed with its second shard moved to sub/part-b (no .safetensors suffix),
    where its index says it is."""
    d.mkdir()
    fuzz.seed_hf(str(d), vocab)
    (d / "sub").mkdir()
    os.rename(d / "model-00002-of-00002.safetensors", d / "sub" / "part-b")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "sub/part-b" if v.startswith("model-00002") else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def edit_last_float(path, value):
    """The last 4 bytes of a safetensors file are its last tensor's data: overwrite them,
    size unchanged."""
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(value).tobytes())


def test_an_edited_shard_in_a_subfolder_converts_again(tmp_path, cache):
    src = hf_with_odd_shard(tmp_path / "hf")
    first = hub.resolve_model(str(src))
    edit_last_float(src / "sub" / "part-b", 1234.5)
    second = hub.resolve_model(str(src))
    assert second != first
    fresh = str(tmp_path / "fresh")
    convert(str(src), fresh, quiet=True)
    used, made = checkpoint.open_tensors(second), checkpoint.open_tensors(fresh)
    assert used.keys() == made.keys()
    for name in made:     # the cache's conversion is the edited source's, bit for bit
        np.testing.assert_array_equal(used[name], made[name])


def test_a_huge_sparse_file_is_refused_before_it_is_hashed(tmp_path):
    src = hf_with_odd_shard(tmp_path / "hf")
    with open(src / "model-00001-of-00002.safetensors", "r+b") as f:
        f.truncate(2**40)        # 1 TB, sparse: hashing it would take hours
    code = ("import sys; from npllama.io import hub; from npllama.errors import NpllamaError\n"
            "try: hub.resolve_model(sys.argv[1])\nexcept NpllamaError as e: print(e); sys.exit(3)")
    env = dict(os.environ, NPLLAMA_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 3 and "model-00001-of-00002.safetensors" in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "hashing" not in r.stderr


def test_a_big_tokenizer_model_is_refused_by_its_size(tmp_path, cache):
    src = hf_with_odd_shard(tmp_path / "hf")
    with open(src / "tokenizer.model", "wb") as f:
        f.truncate(hub.MAX_SIDE_FILE + 1)
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        hub.resolve_model(str(src))


def test_a_shard_replaced_by_a_link_after_the_checks_is_not_read(tmp_path):
    src = hf_with_odd_shard(tmp_path / "hf")
    source = read_hf(str(src))
    before = {n: source.load(n) for n in source.shapes}
    shard = src / "sub" / "part-b"
    outside = tmp_path / "outside"
    outside.write_bytes(shard.read_bytes().replace(b"\x00", b"\x01"))   # other bytes, same size
    os.remove(shard)
    os.symlink(outside, shard)
    for n in source.shapes:
        np.testing.assert_array_equal(source.load(n), before[n])   # still the checked file's bytes


def test_a_shard_truncated_after_the_checks_is_an_npllama_error(tmp_path):
    src = hf_with_odd_shard(tmp_path / "hf")
    source = read_hf(str(src))
    with open(src / "sub" / "part-b", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="part-b"):
        for n in source.shapes:
            source.load(n)


def test_a_side_file_linked_out_of_the_folder_is_refused_before_it_is_hashed(tmp_path, cache, capsys):
    src = hf_with_odd_shard(tmp_path / "hf", vocab=256)   # room for the tokenizer's 250 tokens
    fuzz.seed_hf_tokenizer(str(src))    # a tokenizer.json: the converter itself never opens tokenizer.model
    (tmp_path / "outside").write_bytes(b"IQ== 0\n")      # a valid tokenizer.model, elsewhere
    os.symlink(tmp_path / "outside", src / "tokenizer.model")
    with pytest.raises(CheckpointError, match="tokenizer.model: leads outside"):
        hub.resolve_model(str(src))
    assert "hashing" not in capsys.readouterr().err     # refused before any file was read for the key


def swap_in(path, data):
    """path replaced by a new file holding data, as a downloader or `cp` then `mv` would."""
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("when", ["before it is read", "and back while it is read"])
def test_a_source_swapped_while_it_is_converted_is_not_cached_under_the_old_key(tmp_path, cache, monkeypatch, when):
    """The hub hashes the source, then the converter opens it again by path: a file swapped
    in between (or swapped and swapped back, a new file of the old bytes) was converted and
    cached under the first file's key. Sources: fuzz's GGUF seed and the same with another
    chat template (same size), told apart by what the converted tokenizer holds."""
    fuzz.seed_gguf(str(tmp_path))
    m = tmp_path / "model.gguf"
    a = m.read_bytes()
    b = a.replace(b"Be brief.", b"Be BRIEF.")
    assert a != b and len(a) == len(b)
    real = hub.convert

    def swapping(src, dst, **kw):
        swap_in(m, b)                   # after the hash, before the converter opens it
        if when == "before it is read":
            return real(src, dst, **kw)
        real_write = checkpoint.write_checkpoint

        def write(*args, **kws):         # the converter has B open; A's bytes come back under the name
            swap_in(m, a)
            return real_write(*args, **kws)
        monkeypatch.setattr("npllama.io.convert.write_checkpoint", write)
        return real(src, dst, **kw)
    monkeypatch.setattr(hub, "convert", swapping)
    with pytest.raises(CheckpointError, match="changed while it was being converted.*run again"):
        hub.resolve_model(str(m))
    converted = cache / "converted"
    assert sorted(os.listdir(converted)) == ["hashes.json"]   # nothing kept, not even a partial folder
    monkeypatch.setattr(hub, "convert", real)
    monkeypatch.setattr("npllama.io.convert.write_checkpoint", checkpoint.write_checkpoint)
    out = hub.resolve_model(str(m))     # run again: what is there now, under its own key
    want = b"Be brief." if when != "before it is read" else b"Be BRIEF."
    with open(os.path.join(out, "tokenizer.json"), "rb") as f:
        assert want in f.read()
