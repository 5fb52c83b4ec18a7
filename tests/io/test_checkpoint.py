"""Converters (Meta .pth without torch, HF safetensors, GGUF), the format and the loader.
Source checkpoints are written here by torch.save, HF save_pretrained and the gguf writer."""
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import npllama
from npllama.model import bf16
from npllama.io import checkpoint
from npllama.io.checkpoint import CheckpointError
from npllama.io.convert import convert
from npllama.errors import UsageError
from npllama.io.formats.meta_pth import PthFile, mp_axis
from oracles import hf_logits, hf_model, random_weights, small_args

pytestmark = pytest.mark.torch

ARGS = small_args(dim=128, n_heads=8, n_kv_heads=4, n_layers=2, vocab_size=128)  # splits 4 ways


def params_json(args):
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta}


def save_meta(path, weights, args=ARGS, n_shards=1, dtype=torch.bfloat16, perturb_norms=False):
    """Meta's layout: consolidated.NN.pth, split by Llama 3's model-parallel rules."""
    os.makedirs(path, exist_ok=True)
    for s in range(n_shards):
        sd = {}
        for name, w in weights.items():
            axis = mp_axis(name)
            part = w if axis is None else np.split(w, n_shards, axis=axis)[s]
            if axis is None and perturb_norms and s > 0:
                part = part + 0.5  # Meta's replicated norms are not bit-identical across shards
            sd[name] = torch.from_numpy(np.ascontiguousarray(part)).to(dtype)
        torch.save(sd, os.path.join(path, f"consolidated.{s:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params_json(args), f)
    with open(os.path.join(path, "tokenizer.model"), "w") as f:
        f.write("not really a tokenizer\n")
    return path


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True)


@pytest.fixture(scope="module")
def weights():
    return random_weights(ARGS, seed=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_meta_pth_converts_bit_for_bit(tmp_path, weights, dtype):
    src = save_meta(tmp_path / "meta", weights, dtype=dtype)
    convert(str(src), str(tmp_path / "out"), quiet=True)
    index = checkpoint.read_index(str(tmp_path / "out"))
    got = checkpoint.open_tensors(str(tmp_path / "out"))
    assert set(got) == set(weights)
    for name, w in weights.items():
        expected = torch.from_numpy(w).to(dtype)
        if dtype == torch.bfloat16:
            assert index["tensors"][name]["dtype"] == "bfloat16" and got[name].dtype == np.uint16
            assert np.array_equal(got[name], expected.view(torch.int16).numpy().view(np.uint16))
        else:
            assert np.array_equal(got[name], expected.numpy())
    assert (tmp_path / "out" / "tokenizer.model").read_text() == "not really a tokenizer\n"
    assert json.loads((tmp_path / "out" / "params.json").read_text())["hidden_dim"] == ARGS.ffn_dim


@pytest.mark.parametrize("n_shards", [2, 4])
def test_model_parallel_shards_merge(tmp_path, weights, n_shards):
    one = save_meta(tmp_path / "one", weights)
    many = save_meta(tmp_path / f"mp{n_shards}", weights, n_shards=n_shards, perturb_norms=True)
    convert(str(one), str(tmp_path / "a"), quiet=True)
    convert(str(many), str(tmp_path / "b"), quiet=True)
    a, b = checkpoint.open_tensors(str(tmp_path / "a")), checkpoint.open_tensors(str(tmp_path / "b"))
    for name in weights:
        assert np.array_equal(a[name], b[name]), name  # norms: shard 0's copy is taken
    toks = np.arange(20) % ARGS.vocab_size
    assert np.array_equal(npllama.load(str(tmp_path / "a")).forward(toks),
                          npllama.load(str(tmp_path / "b")).forward(toks))


def test_pth_with_strided_and_shared_storages_reads_like_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"t": base.t(), "slice": base[1:3], "same": base}
    torch.save(sd, tmp_path / "x.pth")
    f = PthFile(str(tmp_path / "x.pth"))
    for k, v in sd.items():
        assert np.array_equal(f.array(k), v.numpy())


@pytest.mark.parametrize("tied,shard", [(False, None), (True, "20KB")])
def test_hf_safetensors_match_meta_route_and_hf_forward(tmp_path, tied, shard):
    w = random_weights(ARGS, seed=5, tied=tied)
    hf = hf_model(ARGS, w).to(torch.bfloat16)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, **kw)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    convert(str(tmp_path / "hf"), str(tmp_path / "from_hf"), quiet=True)
    save_meta(tmp_path / "meta", w)
    convert(str(tmp_path / "meta"), str(tmp_path / "from_meta"), quiet=True)
    a = checkpoint.open_tensors(str(tmp_path / "from_hf"))
    b = checkpoint.open_tensors(str(tmp_path / "from_meta"))
    assert set(a) == set(b) == set(w)
    for name in w:
        assert np.array_equal(a[name], b[name]), name
    toks = np.arange(30) * 7 % ARGS.vocab_size
    ours = npllama.load(str(tmp_path / "from_hf")).forward(toks)
    # HF's own forward, in float32, on the same bf16-valued weights (a fresh model: `.to(bf16)`
    # also rounded HF's rotary inv_freq buffer, which `.float()` would not undo).
    ref = hf_logits(hf_model(ARGS, {k: bf16.round(v) for k, v in w.items()}), toks)
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()  # fp32 tolerance, see test_model


# --- the safetensors reader against the safetensors library -----------------------------------

def save_hf_one_file(path, dtype):
    """ARGS as an HF checkpoint in a single model.safetensors, written by save_pretrained
    (so by the safetensors library itself)."""
    hf_model(ARGS, random_weights(ARGS, seed=5)).to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def library_reading(path, dtype) -> dict:
    """The safetensors library's own reading of a file, as float32 (bf16 through its torch
    API: numpy has no bf16)."""
    if dtype == torch.bfloat16:
        from safetensors.torch import load_file
        return {k: v.float().numpy() for k, v in load_file(path).items()}
    from safetensors.numpy import load_file
    return {k: v.astype(np.float32) for k, v in load_file(path).items()}


def assert_converted_as_the_library_reads(src, out, dtype, stored):
    convert(str(src), str(out), quiet=True)
    ours = checkpoint.open_tensors(str(out))
    assert {v.dtype for v in ours.values()} == {np.dtype(stored)}
    # ours, named and laid out as HF's again (hf_model), value for value
    hf = hf_model(ARGS, {k: np.asarray(v) for k, v in ours.items()})
    back = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    lib = library_reading(src / "model.safetensors", dtype)
    assert set(lib) == set(back)
    for name, arr in lib.items():
        assert np.array_equal(back[name], arr), name


# every dtype the reader accepts; F64 is stored as float32, the others as they are
@pytest.mark.parametrize("dtype,stored", [(torch.float32, np.float32), (torch.float16, np.float16),
                                          (torch.bfloat16, np.uint16), (torch.float64, np.float32)])
def test_safetensors_read_as_the_safetensors_library_reads_them(tmp_path, dtype, stored):
    assert_converted_as_the_library_reads(save_hf_one_file(tmp_path / "hf", dtype), tmp_path / "out", dtype, stored)


def split_safetensors(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(header, data: bytes, n: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def by_offset(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])


def moved(h, by, start=1):
    """The header with the tensors from `start` on (in data order) moved by `by` bytes."""
    h = json.loads(json.dumps(h))
    for k in by_offset(h)[start:]:
        h[k]["data_offsets"] = [o + by for o in h[k]["data_offsets"]]
    return h


def first_edited(h, **fields):
    """The header with the first tensor's fields replaced (None: removed), given the old entry."""
    h = json.loads(json.dumps(h))
    first = h[by_offset(h)[0]]
    for k, make in fields.items():
        value = make(first)
        first.pop(k) if value is None else first.__setitem__(k, value)
    return h


def end_of_first(h):
    return h[by_offset(h)[0]]["data_offsets"][1]


J = join_safetensors
# Files the safetensors library refuses, each made from a good one by breaking one of the
# format's rules (safetensors' README) or the library's own checks.
REFUSED = {
    "gap between tensors": lambda h, d: J(moved(h, 4), d[:end_of_first(h)] + bytes(4) + d[end_of_first(h):]),
    "overlapping tensors": lambda h, d: J(moved(h, -4), d[:end_of_first(h) - 4] + d[end_of_first(h):]),
    "offsets not from 0": lambda h, d: J(moved(h, 2, start=0), bytes(2) + d),
    "length not the shape's": lambda h, d: J(first_edited(h, shape=lambda e: [e["shape"][0] - 1] + e["shape"][1:]), d),
    "begin after end": lambda h, d: J(first_edited(h, data_offsets=lambda e: e["data_offsets"][::-1]), d),
    "float offsets": lambda h, d: J(first_edited(h, data_offsets=lambda e: [float(o) for o in e["data_offsets"]]), d),
    "three offsets": lambda h, d: J(first_edited(h, data_offsets=lambda e: e["data_offsets"] + [0]), d),
    "negative shape": lambda h, d: J(first_edited(h, shape=lambda e: [-x for x in e["shape"]]), d),
    "no shape": lambda h, d: J(first_edited(h, shape=lambda e: None), d),
    "unknown dtype": lambda h, d: J(first_edited(h, dtype=lambda e: "F31"), d),
    "entry not an object": lambda h, d: J({**h, "model.norm.weight": "x"}, d),
    "metadata not strings": lambda h, d: J({**h, "__metadata__": {"format": 1}}, d),
    "header not an object": lambda h, d: J(json.dumps(list(h.items())).encode(), d),
    "header not JSON": lambda h, d: J(json.dumps(h).encode()[1:], d),
    "header not UTF-8": lambda h, d: J(json.dumps(h).encode().replace(b"model", b"m\xffdel", 1), d),
    "header past the file": lambda h, d: J(h, d, n=2**40),
    "header over 100 MB": lambda h, d: J(json.dumps(h).encode().ljust(100_000_001), d),
    "bytes no tensor owns": lambda h, d: J(h, d + bytes(8)),
    "truncated": lambda h, d: J(h, d[:-8]),
    "shorter than 8 bytes": lambda h, d: b"\x01\x00",
}
# ...and files it reads, which ours must read alike.
ACCEPTED = {
    "leading space": lambda h, d: J(b" " + json.dumps(h).encode(), d),
    "padded, data not 8-aligned": lambda h, d: J(json.dumps(h).encode() + b"   ", d),
    "string metadata": lambda h, d: J({**h, "__metadata__": {"format": "pt", "x": "y"}}, d),
}


def hf_dir_with(tmp_path, good_hf, make) -> tuple:
    """good_hf's config and a model.safetensors made by make(header, data)."""
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_bytes((good_hf / "config.json").read_bytes())
    (src / "model.safetensors").write_bytes(make(*split_safetensors((good_hf / "model.safetensors").read_bytes())))
    return src, src / "model.safetensors"


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    return save_hf_one_file(tmp_path_factory.mktemp("st") / "hf", torch.float32)


@pytest.mark.parametrize("case", REFUSED)
def test_safetensors_files_the_library_refuses_are_refused(tmp_path, good_hf, case):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    src, path = hf_dir_with(tmp_path, good_hf, REFUSED[case])
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        convert(str(src), str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ACCEPTED)
def test_safetensors_files_the_library_reads_are_read_alike(tmp_path, good_hf, case):
    src, _ = hf_dir_with(tmp_path, good_hf, ACCEPTED[case])
    assert_converted_as_the_library_reads(src, tmp_path / "out", torch.float32, np.float32)


def test_safetensors_dtypes_we_do_not_take_are_clear_errors(tmp_path, good_hf):
    # The library reads I32 (and other integer and float8 dtypes); a Llama checkpoint has none,
    # and ours says so rather than guess.
    src, _ = hf_dir_with(tmp_path, good_hf, lambda h, d: J(first_edited(h, dtype=lambda e: "I32"), d))
    r = run_cli("convert", str(src), str(tmp_path / "out"))
    assert r.returncode == 1 and re.search(r"unsupported dtype '?I32", r.stderr) and "Traceback" not in r.stderr


def test_gguf_round_trips(tmp_path, weights):
    """npllama -> GGUF (tools/export_gguf.py, gguf's writer) -> npllama. The importer's name
    mapping is also checked against a real llama.cpp GGUF in test_smollm2."""
    import gguf
    from tools.export_gguf import export
    checkpoint.write_checkpoint(str(tmp_path / "np"), ARGS, iter(weights.items()), 0, len(weights), quiet=True)
    export(str(tmp_path / "np"), str(tmp_path / "m.gguf"), "f32")
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"), quiet=True)
    got = checkpoint.open_tensors(str(tmp_path / "out"))
    assert set(got) == set(weights)
    for name, w in weights.items():
        assert np.array_equal(got[name], w), name
    # Quantized: the converter's dequantization is gguf's own, exactly.
    export(str(tmp_path / "np"), str(tmp_path / "q.gguf"), "q8_0")
    convert(str(tmp_path / "q.gguf"), str(tmp_path / "q"), quiet=True)
    got = checkpoint.open_tensors(str(tmp_path / "q"))
    w = weights["layers.1.attention.wq.weight"]
    q8 = gguf.GGMLQuantizationType.Q8_0
    expected = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
    assert np.array_equal(got["layers.1.attention.wq.weight"], expected)
    assert np.abs(expected - w).max() < 0.02 * np.abs(w).max()  # and it is w, quantized


def test_dtype_option_and_force(tmp_path, weights):
    src = save_meta(tmp_path / "meta", weights, dtype=torch.float32)
    convert(str(src), str(tmp_path / "out"), dtype="bfloat16", quiet=True)
    got = checkpoint.open_tensors(str(tmp_path / "out"))
    assert np.array_equal(got["norm.weight"], bf16.to_bits(weights["norm.weight"]))
    with pytest.raises(UsageError, match="already exists"):
        convert(str(src), str(tmp_path / "out"), quiet=True)
    convert(str(src), str(tmp_path / "out"), dtype="float16", force=True, quiet=True)
    assert checkpoint.open_tensors(str(tmp_path / "out"))["norm.weight"].dtype == np.float16
    assert sorted(os.listdir(tmp_path)) == ["meta", "out"]  # no temporary directories left


def test_shards_split_and_members_are_aligned(tmp_path, weights):
    src = save_meta(tmp_path / "meta", weights)
    convert(str(src), str(tmp_path / "out"), shard_bytes=40_000, quiet=True)
    index = checkpoint.read_index(str(tmp_path / "out"))
    assert len(index["shards"]) > 3
    for name, arr in checkpoint.open_tensors(str(tmp_path / "out")).items():
        assert isinstance(arr, np.memmap) and arr.ctypes.data % 64 == 0, name
    # any np.load can read the shards too
    with np.load(tmp_path / "out" / next(iter(index["shards"]))) as z:
        assert len(z.files) >= 1


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    os.makedirs(tmp_path / "meta")
    with zipfile.ZipFile(tmp_path / "meta" / "consolidated.00.pth", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"tok_embeddings.weight": Evil()}, protocol=2))
    (tmp_path / "meta" / "params.json").write_text(json.dumps(params_json(ARGS)))
    r = run_cli("convert", str(tmp_path / "meta"), str(tmp_path / "out"))
    assert r.returncode == 1
    assert "refusing to load global" in r.stderr and "system" in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_pth_is_a_clear_error(tmp_path, weights):
    src = save_meta(tmp_path / "meta", weights)
    pth = src / "consolidated.00.pth"
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    r = run_cli("convert", str(src), str(tmp_path / "out"))
    assert r.returncode == 1 and "consolidated.00.pth" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_damaged_shards_are_clear_errors(tmp_path, weights):
    convert(str(save_meta(tmp_path / "meta", weights)), str(tmp_path / "out"), quiet=True)
    out = tmp_path / "out"
    shard = out / next(iter(checkpoint.read_index(str(out))["shards"]))
    assert run_cli("info", str(out), "--verify").returncode == 0
    # a flipped byte keeps the size: only --verify can see it
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("info", str(out), "--verify")
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and shard.name in r.stderr
    # truncated
    shard.write_bytes(bytes(data[:-100]))
    r = run_cli("info", str(out))
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(CheckpointError, match="truncated"):
        npllama.load(str(out))


def test_missing_or_misshapen_tensors_are_clear_errors(tmp_path, weights):
    src = save_meta(tmp_path / "meta", {k: v for k, v in weights.items() if k != "layers.1.ffn_norm.weight"})
    with pytest.raises(CheckpointError, match="missing tensor layers.1.ffn_norm.weight"):
        convert(str(src), str(tmp_path / "out"), quiet=True)
    bad = dict(weights, **{"layers.0.attention.wk.weight": weights["layers.0.attention.wk.weight"][:8]})
    r = run_cli("convert", str(save_meta(tmp_path / "meta2", bad)), str(tmp_path / "out"))
    assert r.returncode == 1 and "layers.0.attention.wk.weight: shape (8, 128), the params say" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written is left
    # a converted directory whose index lies about a shape
    convert(str(save_meta(tmp_path / "meta3", weights)), str(tmp_path / "ok"), quiet=True)
    index = json.loads((tmp_path / "ok" / "index.json").read_text())
    index["tensors"]["layers.0.ffn_norm.weight"]["shape"] = [3]
    (tmp_path / "ok" / "index.json").write_text(json.dumps(index))
    r = run_cli("info", str(tmp_path / "ok"))
    assert r.returncode == 1 and "layers.0.ffn_norm.weight" in r.stderr and "the params say (128,)" in r.stderr


def test_unknown_sources_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()   # (not tmp_path itself: an output inside its source is refused first)
    r = run_cli("convert", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert r.returncode == 1 and "neither a Meta checkpoint" in r.stderr
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    r = run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert r.returncode == 1 and "config.json: missing num_hidden_layers" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "x.bin").write_bytes(b"nope")
    r = run_cli("convert", str(tmp_path / "x.bin"), str(tmp_path / "out"))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr


RSS_SCRIPT = """
import sys, time, numpy as np, npllama
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
t0 = time.perf_counter()
m = npllama.load(sys.argv[1])
took = time.perf_counter() - t0
after = rss()
m.forward(np.array([1, 2, 3]))
print(before, after, rss(), took)
"""


def test_loading_maps_instead_of_reading(tmp_path):
    # ~1.1 GB of float32 weights; loading must not read them.
    args = npllama.ModelArgs(dim=2048, n_layers=2, n_heads=16, n_kv_heads=4, vocab_size=100_000,
                             multiple_of=256, ffn_dim_multiplier=1.5)
    from npllama.model.weights import expected_shapes
    shapes = expected_shapes(args)
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    rng = np.random.default_rng(0)
    small = rng.standard_normal(1 << 16).astype(np.float32) * 0.02
    tensors = ((n, np.resize(small, s)) for n, s in shapes.items())
    checkpoint.write_checkpoint(str(tmp_path / "big"), args, tensors, total, len(shapes), quiet=True)
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    before, after, used, _took = map(float, r.stdout.split())
    assert total > 1e9
    assert after - before < 0.05 * total       # mapped, not read
    assert used - before > 0.3 * total         # ...and a forward pass does read the weights


def test_gguf_rope_scaling_round_trips_as_llama_cpp_rope_freqs(tmp_path):
    from tools.export_gguf import export
    from oracles import write_random_model
    args = small_args(dim=256, n_heads=4, n_kv_heads=2, use_scaled_rope=True, rope_theta=500000.0,
                      rope_scaling_factor=32.0)
    write_random_model(str(tmp_path / "np"), args)
    export(str(tmp_path / "np"), str(tmp_path / "m.gguf"))
    import gguf
    divisors = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "rope_freqs.weight")
    assert divisors.data.max() == 32.0 and divisors.data.min() == 1.0  # llama.cpp's form: a divisor per frequency
    convert(str(tmp_path / "m.gguf"), str(tmp_path / "back"), quiet=True)
    back = npllama.ModelArgs.from_json(str(tmp_path / "back" / "params.json"))
    assert back.use_scaled_rope and back.rope_scaling_factor == 32.0
    toks = np.arange(20)
    assert np.array_equal(npllama.load(str(tmp_path / "np")).forward(toks),
                          npllama.load(str(tmp_path / "back")).forward(toks))
