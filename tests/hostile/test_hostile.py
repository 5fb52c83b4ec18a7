"""Hostile and damaged files, built here by hand, one test per way a reader can be abused:
crashes and memory bombs (run in a worker under an address-space limit), paths leading
out of the checkpoint, files that are not files, JSON and zip tricks, tracebacks, --force
destroying data, silent NaNs and arguments outside the model's terms."""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import npllama
from npllama.io import checkpoint
from npllama.io.convert import convert
from npllama.errors import CheckpointError, ConfigError, UsageError, WeightError
from oracles import ROOT, random_weights, small_args, write_random_model

from tools import fuzz

pytestmark = pytest.mark.torch

ARGS = small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, multiple_of=32)
PARAMS = {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 8, "multiple_of": 32}


def run_cli(*argv, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


# --- .pth files written by hand: any storage, offset, size and stride ---------------------

class FakeStorage:
    def __init__(self, key, numel, cls=torch.FloatStorage):
        self.key, self.numel, self.cls = key, numel, cls


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, FakeTensor):
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict()))
        return NotImplemented


def write_pth(path, state, storages, deflate_pickle_bytes=0):
    """A torch.save-layout zip: archive/data.pkl (protocol 2, as torch writes) and one
    stored archive/data/<key> per storage."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as z:
        if deflate_pickle_bytes:
            zi = zipfile.ZipInfo("archive/data.pkl")
            zi.compress_type = zipfile.ZIP_DEFLATED
            with z.open(zi, "w") as out:
                out.write(buf.getvalue())
                zeros = bytes(1 << 20)
                for _ in range(deflate_pickle_bytes >> 20):
                    out.write(zeros)
        else:
            z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", np.ascontiguousarray(data).tobytes())
        z.writestr("archive/version", "3\n")


def meta_dir(root, state, storages, **kw):
    os.makedirs(root, exist_ok=True)
    write_pth(os.path.join(root, "consolidated.00.pth"), state, storages, **kw)
    with open(os.path.join(root, "params.json"), "w") as f:
        json.dump(PARAMS, f)
    return str(root)


def test_handwritten_pth_is_what_torch_reads(tmp_path):
    # The writer above makes real torch files: torch's own safe loader agrees.
    data = np.arange(40, dtype=np.float32)
    s = FakeStorage("0", 40)
    state = {"t": FakeTensor(s, 2, (6, 4), (1, 6)), "u": FakeTensor(s, 0, (5,), (8,))}
    write_pth(tmp_path / "x.pth", state, {"0": data})
    ref = torch.load(tmp_path / "x.pth", weights_only=True)
    from npllama.io.formats.meta_pth import PthFile
    f = PthFile(str(tmp_path / "x.pth"))
    for k in state:
        assert np.array_equal(f.array(k), ref[k].numpy()), k


BIG = 50000
HOSTILE_TENSORS = {
    # name: (tensor, storage elements, expected message)
    "negative stride": (lambda s: FakeTensor(s, 36, (4, 6), (-6, 1)), 40, "must be positive"),
    "negative offset": (lambda s: FakeTensor(s, -1000000, (4, 6), (6, 1)), 40, "storage offset -1000000"),
    "zero strides, 10 GB view of 4 bytes": (lambda s: FakeTensor(s, 0, (BIG, BIG), (0, 0)), 1, "must be positive"),
    "overlapping strides": (lambda s: FakeTensor(s, 0, (BIG, BIG), (1, 1)), 2 * BIG, "overlap"),
    "past its storage": (lambda s: FakeTensor(s, 0, (10, 10), (10, 1)), 50, "extends past its storage"),
    "overflowing shape": (lambda s: FakeTensor(s, 0, (2**40, 2**40), (2**40, 1)), 4, "more elements than"),
    "storage that is no storage": (lambda s: FakeTensor(5, 0, (4,), (1,)), 4, "is not a tensor over a storage"),
    "value that is no tensor": (lambda s: "hello", 4, "is not a tensor over a storage"),
    "stride list of strings": (lambda s: FakeTensor(s, 0, (4,), ("1",)), 4, "strides"),
}


def test_hostile_pth_tensors_are_refused_before_any_read(tmp_path):
    cases, expected = [], []
    for i, (name, (make, numel, message)) in enumerate(HOSTILE_TENSORS.items()):
        s = FakeStorage("0", numel)
        cases.append(meta_dir(tmp_path / f"c{i}", {"tok_embeddings.weight": make(s)},
                              {"0": np.zeros(numel, np.float32)}))
        expected.append((name, message))
    # In a worker under an address-space limit: a regression fails here, not the machine.
    for r, (name, message) in zip(fuzz.run_batch("meta", cases), expected):
        assert r["outcome"] == "error" and message in r["message"] and "consolidated.00.pth" in r["message"], \
            (name, r)


def test_torch_save_stores_members_uncompressed(tmp_path):
    # What makes refusing compressed members safe: torch.save never deflates.
    torch.save({"w": torch.zeros(1000, dtype=torch.bfloat16), "b": torch.ones(3)}, tmp_path / "x.pth")
    with zipfile.ZipFile(tmp_path / "x.pth") as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}


def test_compressed_pickle_bomb_is_refused_unread(tmp_path):
    # 256 MB of zeros deflate to ~250 KB; torch.save never compresses, so neither is read.
    src = meta_dir(tmp_path / "bomb", {"x": 1}, {}, deflate_pickle_bytes=256 << 20)
    assert os.path.getsize(os.path.join(src, "consolidated.00.pth")) < 1 << 20
    (r,) = fuzz.run_batch("meta", [src])
    assert r["outcome"] == "error" and "compressed" in r["message"], r


def test_malicious_globals_and_duplicate_members_are_refused(tmp_path):
    src = meta_dir(tmp_path / "m", {"x": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))},
                   {"0": np.zeros(4, np.float32)})
    pth = os.path.join(src, "consolidated.00.pth")
    with zipfile.ZipFile(pth, "a") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("archive/data/0", b"\0" * 16)  # a second member of the same name
    with pytest.raises(CheckpointError, match="appears twice"):
        convert(src, str(tmp_path / "out"))


# --- paths that lead out, files that are not files ---------------------------------------

@pytest.fixture
def converted(tmp_path):
    return write_random_model(str(tmp_path / "model"), ARGS)


def edit_index(path, fn):
    p = os.path.join(path, "index.json")
    with open(p) as f:
        index = json.load(f)
    fn(index)
    with open(p, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize("shard", ["../outside.npz", "/etc/passwd", "a/../../outside.npz", "\ud800.npz"])
def test_index_shard_names_stay_inside_the_checkpoint(converted, shard):
    def point_outside(index):
        old = next(iter(index["shards"]))
        index["shards"][shard] = index["shards"].pop(old)
        for t in index["tensors"].values():
            t["shard"] = shard
    edit_index(converted, point_outside)
    with pytest.raises(CheckpointError, match="is not a file name inside"):
        npllama.load(converted)
    one_line_error(run_cli("info", converted, "--verify"), "is not a file name inside")


def test_symlinks_inside_are_followed_and_out_refused(converted, tmp_path):
    shard = next(iter(checkpoint.read_index(converted)["shards"]))
    os.rename(os.path.join(converted, shard), os.path.join(converted, "real.npz"))
    os.symlink("real.npz", os.path.join(converted, shard))
    npllama.load(converted).forward(np.array([1, 2]))   # a link that stays inside is fine
    os.rename(os.path.join(converted, "real.npz"), tmp_path / "outside.npz")
    os.remove(os.path.join(converted, shard))
    os.symlink(tmp_path / "outside.npz", os.path.join(converted, shard))
    with pytest.raises(CheckpointError, match="leads outside"):
        npllama.load(converted)
    os.remove(os.path.join(converted, shard))
    os.symlink("/dev/zero", os.path.join(converted, shard))
    one_line_error(run_cli("info", converted, "--verify"), "leads outside")


def test_a_fifo_shard_is_refused_without_blocking(converted):
    shard = next(iter(checkpoint.read_index(converted)["shards"]))
    os.remove(os.path.join(converted, shard))
    os.mkfifo(os.path.join(converted, shard))
    one_line_error(run_cli("info", converted, "--verify", timeout=60), "not a regular file")
    one_line_error(run_cli("convert", "/dev/zero", os.path.join(os.path.dirname(converted), "o")), "FIFO or device")


def test_hf_weight_map_and_tokenizer_links_stay_inside(tmp_path):
    from safetensors.numpy import save_file
    from npllama.io.formats.names import meta_to_hf
    src = tmp_path / "hf"
    src.mkdir()
    save_file({meta_to_hf(k): v for k, v in random_weights(ARGS).items()}, str(tmp_path / "secret.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 8, "intermediate_size": ARGS.ffn_dim}))
    os.link(tmp_path / "secret.safetensors", src / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../secret.safetensors"}}))
    one_line_error(run_cli("convert", str(src), str(tmp_path / "out")), "is not a file name inside")
    os.remove(src / "model.safetensors.index.json")
    convert(str(src), str(tmp_path / "ok"), quiet=True)  # the same files, no index: fine
    # tokenizer.model linked to a file outside would be copied into the output: refused
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    os.symlink(tmp_path / "id_rsa", src / "tokenizer.model")
    one_line_error(run_cli("convert", str(src), str(tmp_path / "out")), "leads outside")
    assert not (tmp_path / "out").exists()


def test_hf_hub_cache_layout_is_accepted(tmp_path):
    # snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub stores downloads
    from safetensors.numpy import save_file
    from npllama.io.formats.names import meta_to_hf
    repo = tmp_path / "models--meta-llama--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({meta_to_hf(k): v for k, v in random_weights(ARGS).items()}, str(repo / "blobs" / "h1"))
    (repo / "blobs" / "h2").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 8, "intermediate_size": ARGS.ffn_dim}))
    os.symlink("../../blobs/h1", snap / "model.safetensors")
    os.symlink("../../blobs/h2", snap / "config.json")
    convert(str(snap), str(tmp_path / "out"), quiet=True)
    assert len(checkpoint.open_tensors(str(tmp_path / "out"))) == len(random_weights(ARGS))


# --- JSON ---------------------------------------------------------------------------------

def test_json_bombs_and_tricks_are_refused(converted):
    index_path = os.path.join(converted, "index.json")
    with open(index_path) as f:
        text = f.read()
    with open(index_path, "w") as f:
        f.write('{"format": "npllama", "format": "other", ' + text[1:])
    with pytest.raises(CheckpointError, match="duplicate key 'format'"):
        npllama.load(converted)
    with open(index_path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        npllama.load(converted)
    with open(index_path, "w") as f:
        f.write(" " * (64 * 1024**2) + text)
    with pytest.raises(CheckpointError, match="more than the"):
        npllama.load(converted)
    with open(os.path.join(converted, "params.json"), "w") as f:
        json.dump(dict(PARAMS, norm_eps=float("nan")), f)   # json.dump writes NaN
    with open(index_path, "w") as f:
        f.write(text)
    with pytest.raises(ConfigError, match="NaN is not a JSON number"):
        npllama.load(converted)


@pytest.mark.parametrize("edit,message", [
    (lambda i: i.update(version="2"), "version should be int"),
    (lambda i: next(iter(i["tensors"].values())).pop("shard"), "missing shard"),
    (lambda i: next(iter(i["tensors"].values())).update(shape=[-1, 32]), "shape [-1, 32] is not a list"),
    (lambda i: next(iter(i["tensors"].values())).update(dtype="object"), "unknown dtype 'object'"),
    (lambda i: i.update(tensors=[]), "tensors should be dict"),
    (lambda i: i["tensors"].pop("norm.weight"), "missing tensor norm.weight"),
])
def test_damaged_index_is_one_line(converted, edit, message):
    edit_index(converted, edit)
    one_line_error(run_cli("info", converted), message, "index.json")


def test_unsupported_zip_version_is_one_line(converted):
    # Found by tools/fuzz.py: zipfile raises NotImplementedError for a "version needed" it lacks.
    shard = os.path.join(converted, next(iter(checkpoint.read_index(converted)["shards"])))
    with open(shard, "r+b") as f:
        f.seek(f.read().index(b"PK\x01\x02") + 6)
        f.write(struct.pack("<H", 109))
    with pytest.raises(CheckpointError, match="zip file version 10.9"):
        npllama.load(converted)


def test_npy_header_is_parsed_without_numpys_tokenizer(converted):
    # Found by tools/fuzz.py: a flipped byte left numpy's header parser raising
    # tokenize.TokenError. npllama matches the header np.save writes instead.
    shard = os.path.join(converted, next(iter(checkpoint.read_index(converted)["shards"])))
    with open(shard, "rb") as f:
        data = f.read()
    i = data.index(b", }") + 2
    with open(shard, "wb") as f:
        f.write(data[:i] + b"(" + data[i + 1:])
    with pytest.raises(CheckpointError, match="not a .npy header numpy wrote"):
        npllama.load(converted)


# --- each traceback the issue lists is now one line ---------------------------------------

def safetensors_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,message", [
    ([1, 2], b"", "header is not a JSON object"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [32]}}, bytes(128), "missing data_offsets"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
      "lm_head.weight": {"dtype": "F32", "shape": [32], "data_offsets": [64, 192]}}, bytes(192), "overlapping"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 128]}}, bytes(128),
     "more elements than"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [33], "data_offsets": [0, 128]}}, bytes(128),
     "bytes do not hold shape"),
    ({"model.norm.weight": {"dtype": "I8", "shape": [128], "data_offsets": [0, 128]}}, bytes(128),
     "unsupported dtype"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 2**70]}}, bytes(128), "lie outside"),
])
def test_bad_safetensors_headers(tmp_path, header, data, message):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8, "intermediate_size": 32}))
    safetensors_file(src / "model.safetensors", header, data)
    one_line_error(run_cli("convert", str(src), str(tmp_path / "out")), message, "model.safetensors")
    (src / "model.safetensors.index.json").write_text("{}")
    one_line_error(run_cli("convert", str(src), str(tmp_path / "out")), "missing weight_map")


def gguf_with(path, eos=257, extra=None):
    """A small llama GGUF written by gguf's writer (tools/fuzz.py's seed), then patched."""
    d = os.path.dirname(path)
    fuzz.seed_gguf(d)
    os.rename(os.path.join(d, "model.gguf"), path)
    if eos != 257:
        import gguf
        r = gguf.GGUFReader(path, "r+")
        r.fields["tokenizer.ggml.eos_token_id"].parts[-1][0] = eos
        del r
    return path


def patch_tensor_info(path, name, offset_delta=None, offset=None, dim0=None):
    import gguf
    r = gguf.GGUFReader(path)
    t = next(t for t in r.tensors if t.name == name)
    pos = t.field.offset + 8 + len(name.encode()) + 4
    with open(path, "r+b") as f:
        if dim0 is not None:
            f.seek(pos)
            f.write(struct.pack("<Q", dim0))
        f.seek(pos + 8 * len(t.shape) + 4)
        old = struct.unpack("<Q", f.read(8))[0]
        f.seek(pos + 8 * len(t.shape) + 4)
        f.write(struct.pack("<Q", old + offset_delta if offset_delta is not None else offset))
    return path


def test_gguf_tokenizer_ids_and_tensor_extents_are_checked(tmp_path):
    import gguf
    one_line_error(run_cli("convert", gguf_with(str(tmp_path / "a.gguf"), eos=99999), str(tmp_path / "o")),
                   "tokenizer.ggml.eos_token_id 99999 is not a control token", "a.gguf")
    # Found by tools/fuzz.py: gguf decodes strings only when asked, and raised UnicodeDecodeError.
    path = gguf_with(str(tmp_path / "utf8.gguf"))
    with open(path, "r+b") as f:
        data = f.read()
        f.seek(data.index(b"<|im_end|>"))
        f.write(b"\xc0")
    one_line_error(run_cli("convert", path, str(tmp_path / "o")), "tokenizer.ggml.tokens is unreadable")
    path = gguf_with(str(tmp_path / "b.gguf"))
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    with pytest.raises(CheckpointError, match="is not aligned"):
        convert(patch_tensor_info(path, names[1], offset_delta=4), str(tmp_path / "o"))
    path = gguf_with(str(tmp_path / "c.gguf"))
    with pytest.raises(CheckpointError, match="overlaps"):
        convert(patch_tensor_info(path, names[2], offset=0), str(tmp_path / "o"))
    path = gguf_with(str(tmp_path / "d.gguf"))
    with pytest.raises(CheckpointError, match="lie outside|not a readable GGUF"):
        convert(patch_tensor_info(path, names[-1], offset=2**40), str(tmp_path / "o"))
    path = gguf_with(str(tmp_path / "e.gguf"))
    with pytest.raises(CheckpointError):
        convert(patch_tensor_info(path, names[-1], offset_delta=0, dim0=2**40), str(tmp_path / "o"))
    for at, count in ((8, len(names) + 1), (8, 2**63), (16, 2**62)):   # tensor count, metadata count
        path = gguf_with(str(tmp_path / f"count-{at}-{count}.gguf"))
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(struct.pack("<Q", count))
        with pytest.raises(CheckpointError, match="does not fit the file|runs past the end"):
            convert(path, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_gguf_array_longer_than_the_file_is_refused_at_once(tmp_path):
    # Found by tools/fuzz.py: gguf's reader walks a metadata array element by element and,
    # given a length past the end of the file, loops (and allocates) without end.
    case = tmp_path / "case"
    case.mkdir()
    path = gguf_with(str(case / "model.gguf"))
    with open(path, "r+b") as f:
        data = f.read()
        at = data.index(b"tokenizer.ggml.token_type") + len(b"tokenizer.ggml.token_type") + 8
        f.seek(at)
        f.write(struct.pack("<Q", 2**54))
    (r,) = fuzz.run_batch("gguf", [str(case)], timeout=60)
    assert r["outcome"] == "error" and "array count 18014398509481984" in r["message"], r


def test_trace_headers_cannot_allocate_what_the_file_lacks(tmp_path):
    # Found by tools/fuzz.py: np.load allocated a member's claimed shape (16 GB) before
    # reading it. Traces are now memory-mapped from headers checked against the member.
    from npllama.inspect import tracefile as tracing
    tracing.save(str(tmp_path / "t.npz"), {"logits": np.zeros((2, 3), np.float32), "__meta__": {}})
    data = (tmp_path / "t.npz").read_bytes()
    old = b"'shape': (2, 3), }" + b" " * 10
    new = b"'shape': (4294967295,), }"
    assert old in data
    (tmp_path / "t.npz").write_bytes(data.replace(old, new + b" " * (len(old) - len(new))))   # same length
    with pytest.raises(CheckpointError, match="logits.npy.*lie outside"):
        tracing.load(str(tmp_path / "t.npz"))


def test_compare_given_a_npy_and_trace_hf_without_torch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    one_line_error(run_cli("compare", str(tmp_path / "x.npy"), str(tmp_path / "x.npy")),
                   "x.npy: not a readable zip archive")
    # torch missing: a stand-in package that fails to import, first on the path
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    tool = os.path.join(ROOT, "tools", "trace_hf.py")
    r = subprocess.run([sys.executable, tool, "hi", "-o", str(tmp_path / "t.npz")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=120)
    one_line_error(r, "needs torch and transformers", "pip install")


# --- writes that never destroy -------------------------------------------------------------

def listing(path):
    return sorted(os.listdir(path))


def test_force_replaces_only_what_npllama_wrote(tmp_path, converted):
    src = str(tmp_path / "src.gguf")
    gguf_with(src)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    before = listing(tmp_path)
    for dst in (home, home / "thesis.tex"):
        one_line_error(run_cli("convert", src, str(dst), "--force"), "nothing was touched")
        assert (home / "thesis.tex").read_text() == "years of work"
        assert listing(tmp_path) == before and listing(home) == ["thesis.tex"]  # no debris either
    one_line_error(run_cli("convert", src, str(tmp_path / "missing" / "out")), "not an existing directory")
    # a checkpoint npllama wrote is replaced, and so is an empty directory
    r = run_cli("convert", src, converted, "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    assert npllama.load(converted).args.vocab_size == 258
    (tmp_path / "empty").mkdir()
    assert run_cli("convert", src, str(tmp_path / "empty"), "--force", "--quiet").returncode == 0
    assert listing(tmp_path) == sorted(before + ["empty"])


def test_golden_force_replaces_only_a_bundle(tmp_path, converted):
    tok = tmp_path / "model" / "tokenizer.json"
    write_byte_tokenizer(tok)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    one_line_error(run_cli("golden", "-m", converted, "-o", str(tmp_path / "notes"), "--force"), "nothing was touched")
    one_line_error(run_cli("golden", "-m", converted, "-o", str(tmp_path / "notes" / "a.txt"), "--force"),
                   "nothing was touched")
    assert listing(tmp_path / "notes") == ["a.txt"]
    assert run_cli("golden", "-m", converted, "-o", str(tmp_path / "g")).returncode == 0
    assert run_cli("golden", "-m", converted, "-o", str(tmp_path / "g"), "--force").returncode == 0
    assert (tmp_path / "g" / "golden.json").exists() and listing(tmp_path) == ["g", "model", "notes"]


def test_zip64_members_stay_aligned():
    # zipfile adds a 20-byte zip64 field once size * 1.05 > ZIP64_LIMIT (members of
    # ~1.9-2.0 GiB): the data must still start on a 64-byte boundary.
    from npllama.io.checkpoint import _aligned_zipinfo
    for size in (1000, int(1.95 * 2**30), zipfile.ZIP64_LIMIT + 10):
        buf = io.BytesIO()
        buf.write(b"\0" * 17)
        z = zipfile.ZipFile(buf, "w", allowZip64=True)
        z.start_dir = 17
        zi = _aligned_zipinfo("layers.0.attention.wq.weight.npy", 17, size)
        z.open(zi, "w")   # writes the local header; the data would start here
        assert buf.tell() % 64 == 0, size
        z._writing = False
        z.fp = None


# --- no silent wrong answers -----------------------------------------------------------------

def write_byte_tokenizer(path, add_bos=True):
    """npllama's tokenizer.json for a byte-level vocabulary of 8 tokens (ids 0..5 bytes,
    6 bos, 7 eos), so a random 8-token model can talk."""
    import base64
    from npllama.text.tokenizer import spec_json
    spec = {"pre_tokenizer": "gpt2", "tokens": [base64.b64encode(b).decode() for b in
                                                         (b"a", b"b", b"c", b" ", b"d", b"e")] + [None, None],
            "special_tokens": {"<s>": 6, "</s>": 7}, "bos": "<s>" if add_bos else None, "eos": "</s>",
            "stop": ["</s>"], "add_bos": add_bos}
    with open(path, "wb") as f:
        f.write(spec_json(spec))


def test_nan_weights_stop_generation_and_verify_names_them(tmp_path):
    w = random_weights(ARGS)
    w["layers.0.feed_forward.w2.weight"][3, 5] = np.nan
    path = str(tmp_path / "m")
    checkpoint.write_checkpoint(path, ARGS, iter(w.items()), 0, len(w), quiet=True, allow_nonfinite=True)
    write_byte_tokenizer(os.path.join(path, "tokenizer.json"))
    one_line_error(run_cli("generate", "-m", path, "abc", "--raw"), "non-finite logits at position 3",
                   f"npllama info {path} --verify")
    r = run_cli("info", path, "--verify")
    assert r.returncode == 1 and "NaN or infinity in layers.0.feed_forward.w2.weight" in r.stderr
    from npllama.run.generate import Generator
    from npllama.text.tokenizer import load as load_tokenizer
    with pytest.raises(WeightError, match="non-finite logits"):
        Generator(npllama.load(path), load_tokenizer(path)).generate([6, 0, 1])
    # bf16 infinities are found too (uint16 bit patterns)
    from npllama.model import bf16
    w = random_weights(ARGS)
    w = {k: bf16.to_bits(v) for k, v in w.items()}
    w["norm.weight"][0] = 0x7F80
    checkpoint.write_checkpoint(str(tmp_path / "b"), ARGS, iter(w.items()), 0, len(w), quiet=True,
                                allow_nonfinite=True)
    assert checkpoint.nonfinite(str(tmp_path / "b")) == ["norm.weight"]
    assert checkpoint.nonfinite(path) == ["layers.0.feed_forward.w2.weight"]


# --- arguments in the user's terms ------------------------------------------------------------

@pytest.fixture
def talking_model(tmp_path):
    path = write_random_model(str(tmp_path / "m"), small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                              vocab_size=8, multiple_of=32, max_seq_len=64))
    write_byte_tokenizer(os.path.join(path, "tokenizer.json"), add_bos=False)
    return path


def test_context_and_prompt_arguments(talking_model, tmp_path):
    m = talking_model
    for ctx in ("0", "-5"):
        one_line_error(run_cli("generate", "-m", m, "ab", "--raw", "--ctx", ctx), "--ctx must be a positive")
    one_line_error(run_cli("generate", "-m", m, "ab", "--raw", "--ctx", "100"),
                   "longer than the 64 tokens this model was trained for", "--force-ctx")
    r = run_cli("generate", "-m", m, "ab", "--raw", "--ctx", "100", "--force-ctx", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    one_line_error(run_cli("generate", "-m", m, "", "--raw"), "the prompt is empty")
    one_line_error(run_cli("trace", "-m", m, "", "-o", str(tmp_path / "t.npz")), "the prompt is empty")
    one_line_error(run_cli("trace", "-m", str(tmp_path / "nope"), "ab", "-o", "/missing/dir/x.npz"),
                   "/missing/dir is not an existing directory")   # before the model is even looked for
    one_line_error(run_cli("trace", "-m", m, "ab", "-o", str(tmp_path)), "is a directory")
    r = run_cli("generate", "-m", m, "a" * 80, "--raw")   # longer than the context
    one_line_error(r, "exceeds the context of 64 tokens")
    assert "max_seq_len" not in r.stderr


def test_params_beyond_any_llama_are_refused_before_listing_tensors(tmp_path):
    # n_layers = 2**40 would make the expected tensor list itself a memory bomb.
    src = meta_dir(tmp_path / "m", {"x": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))},
                   {"0": np.zeros(4, np.float32)})
    with open(os.path.join(src, "params.json"), "w") as f:
        json.dump(dict(PARAMS, n_layers=2**40), f)
    (r,) = fuzz.run_batch("meta", [src], timeout=60)
    assert r["outcome"] == "error" and "n_layers 1099511627776 is beyond any Llama" in r["message"], r


def test_trained_context_is_recorded_uncapped(tmp_path):
    from npllama.io.formats.hf import hf_config_to_args
    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8,
           "intermediate_size": 32, "max_position_embeddings": 131072}
    assert hf_config_to_args(cfg).max_seq_len == 131072
    assert npllama.ModelArgs.from_dict(dict(PARAMS, use_scaled_rope=True)).max_seq_len == 131072
    assert npllama.ModelArgs.from_dict(PARAMS).max_seq_len == 8192
    args = npllama.ModelArgs.from_dict(dict(PARAMS, use_scaled_rope=True))
    model = npllama.Transformer(args, random_weights(args))
    assert model.max_seq_len == 131072   # the runtime default: the trained context, as it fits in memory
    with pytest.raises(UsageError, match="positive"):
        npllama.Transformer(args, random_weights(args), max_seq_len=0)


# --- issue 24: untrusted computation under limits the OS enforces ---------------------------

def tiny_tokenizer(special=None, name="evil/tokenizer.json"):
    from npllama.text.tokenizer import Tokenizer
    special = special or {"<s>": 256, "</s>": 257}
    return Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", special, None, "</s>", ["</s>"], None, name=name)


def test_control_tokens_that_abort_tiktoken_are_refused_in_a_worker():
    # 6,000 control tokens of 3,000 characters (inside every cap of the file): tiktoken's
    # Rust regex for them aborted the whole process at 3.2 GB. Now compiled first in a worker
    # whose address space the OS bounds; its abort is one error naming the file.
    from npllama.errors import TokenizerError
    special = {f"<|{i:05d}" + "x" * 2990 + "|>": 256 + i for i in range(6000)}
    special["</s>"] = 256 + 6000
    with pytest.raises(TokenizerError, match=r"evil/tokenizer.json: its control tokens: crashed \(signal 6"):
        tiny_tokenizer(special)


def test_a_large_but_harmless_control_token_set_still_loads():
    # Past the inline threshold (so it is probed in the worker) yet cheap: it must load.
    from npllama.text.tokenizer import MAX_INLINE_CONTROL_CHARS
    special = {f"<|tok_{i}_" + "y" * 100 + "|>": 256 + i for i in range(MAX_INLINE_CONTROL_CHARS // 100)}
    special["</s>"] = 256 + len(special)
    tok = tiny_tokenizer(special)
    name = next(iter(special))
    assert tok.encode(name, allowed_special="all") == [256]


C_LEVEL_TEMPLATES = {
    # jinja filters running in C, where the line tracer never fires (still running at 25 s on
    # main), and memory growth the budgets did not predict (0.6-1.6 GB on main)
    "sum of lists in C": "{{ ([[0]] * 150000)|sum(start=[]) }}",
    "set block doubling": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set x %}{{ ns.s }}{{ ns.s }}"
                          "{% endset %}{% set ns.s = x %}{% endfor %}{{ ns.s|length }}",
    "120 nested blocks": "{% if true %}" * 120 + "x" + "{% endif %}" * 120,
}


@pytest.mark.parametrize("name", C_LEVEL_TEMPLATES)
def test_templates_beyond_the_tracer_are_stopped_by_the_os(monkeypatch, name):
    from npllama.errors import TokenizerError
    from npllama.text import chat_template
    monkeypatch.setattr(chat_template, "TIME_LIMIT", 0.5)   # so the worker's CPU limit is 2 s
    with pytest.raises((UsageError, TokenizerError), match="evil/tokenizer.json: chat template") as e:
        chat_template.ChatTemplate(tiny_tokenizer(), C_LEVEL_TEMPLATES[name]).render(
            [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


def test_a_template_worker_renders_repeatedly_and_survives_a_refusal():
    from npllama.text.chat_template import ChatTemplate
    ct = ChatTemplate(tiny_tokenizer(), "{% if messages[0].content == 'no' %}{{ raise_exception('refused') }}"
                                        "{% endif %}[{{ messages[0].content }}]")
    assert ct.render([{"role": "user", "content": "a"}]) == "[a]"
    with pytest.raises(UsageError, match="chat template: refused"):
        ct.render([{"role": "user", "content": "no"}])
    assert ct.render([{"role": "user", "content": "b"}]) == "[b]"
    ct.worker.process.kill()   # a worker that dies is replaced at the next render
    ct.worker.process.wait()
    with pytest.raises(UsageError, match="chat template: was killed"):
        ct.render([{"role": "user", "content": "c"}])
    assert ct.render([{"role": "user", "content": "d"}]) == "[d]"


# --- issue 24: file-derived text is printable wherever it reaches the user ----------------------

FORGED = "w\x1b[2J\x07\nnpllama: all weights verified\u2028"


def test_raise_exception_messages_cannot_forge_lines():
    from npllama.text.chat_template import ChatTemplate
    ct = ChatTemplate(tiny_tokenizer(), "{{ raise_exception(" + json.dumps(FORGED) + ") }}")
    with pytest.raises(UsageError) as e:
        ct.render([{"role": "user", "content": "hi"}])
    text = str(e.value)
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text and "\u2028" not in text
    assert "\\x1b[2J\\x07\\nnpllama: all weights verified\\u2028" in text


def test_tensor_names_in_errors_are_printable(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8, "intermediate_size": 32}))
    safetensors_file(src / "model.safetensors", {FORGED: {"dtype": "F32", "shape": [33], "data_offsets": [0, 128]}},
                     bytes(128))
    r = run_cli("convert", str(src), str(tmp_path / "out"))
    one_line_error(r, "model.safetensors")
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\u2028" not in r.stderr
