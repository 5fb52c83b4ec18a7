"""Issue 24, class 4: an output that is its own input. convert, golden, trace, plot (and
perplexity's base file) refuse a destination that is, contains or lies inside a source,
after resolving symbolic links, whatever --force says and whatever an index.json or
golden.json planted there claims. Each case here destroyed or wrote into its source on
main c1182df (checked)."""
import json
import os

import pytest

from npllama import cli
from npllama.io import atomic
from npllama.errors import UsageError
from oracles import small_args, write_byte_model

from tools import fuzz

FORGED_INDEX = json.dumps({"format": "npllama", "version": 1, "tensors": {}, "shards": {}})


def snapshot(root):
    """Every file under root with its bytes: what must survive a refused command."""
    out = {}
    for dp, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(dp, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def refused(capsys, argv, *needles):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "its source" in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def hf_folder(tmp_path):
    d = tmp_path / "X"
    d.mkdir()
    fuzz.seed_hf(str(d))
    (d / "index.json").write_text(FORGED_INDEX)   # what --force takes as "a folder npllama wrote"
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "model")
    write_byte_model(path, small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=260, multiple_of=32))
    return path


def test_convert_onto_its_own_source_is_refused_and_the_source_kept(hf_folder, capsys):
    before = snapshot(hf_folder)
    refused(capsys, ["convert", str(hf_folder), str(hf_folder), "--force", "--quiet"])
    assert snapshot(hf_folder) == before


def test_convert_onto_the_folder_holding_its_source_is_refused(hf_folder, tmp_path, capsys):
    inner = hf_folder / "inner"
    inner.mkdir()
    fuzz.seed_hf(str(inner))
    before = snapshot(hf_folder)
    refused(capsys, ["convert", str(inner), str(hf_folder), "--force", "--quiet"])
    # and into a folder inside the source, and through a symbolic link to the source
    refused(capsys, ["convert", str(hf_folder), str(hf_folder / "out"), "--quiet"])
    os.symlink(hf_folder, tmp_path / "link")
    refused(capsys, ["convert", str(inner), str(tmp_path / "link"), "--force", "--quiet"])
    assert snapshot(hf_folder) == before


def test_golden_over_its_model_is_refused(model, capsys):
    with open(os.path.join(model, "golden.json"), "w") as f:   # a forged "bundle npllama wrote"
        json.dump({"npllama": "0", "files": {}}, f)
    before = snapshot(model)
    try:
        refused(capsys, ["golden", "-m", model, "-o", model, "--force", "--max-new-tokens", "1"])
        assert snapshot(model) == before
    finally:
        os.remove(os.path.join(model, "golden.json"))


def test_trace_into_its_model_folder_is_refused(model, capsys):
    before = snapshot(model)
    refused(capsys, ["trace", "-m", model, "hi", "-o", os.path.join(model, "t.npz")])
    assert snapshot(model) == before


def test_plot_over_its_trace_is_refused(model, tmp_path, capsys):
    trace = str(tmp_path / "t.png")     # a trace under an image's name
    assert cli.main(["trace", "-m", model, "hi", "-o", trace]) == 0
    capsys.readouterr()
    with open(trace, "rb") as f:
        before = f.read()
    refused(capsys, ["plot", trace, "--layer", "0", "-o", trace])
    refused(capsys, ["compare", trace, trace, "--plot", trace])
    with open(trace, "rb") as f:
        assert f.read() == before


def test_refuse_overlap_sees_through_links(tmp_path):
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path / "src", tmp_path / "alias")
    for dst in ["src", "alias", "alias/sub", "src/a/b"]:
        with pytest.raises(UsageError, match="its source"):
            atomic.refuse_overlap(str(tmp_path / dst), [str(tmp_path / "src" / ".")], "output")
    with pytest.raises(UsageError, match="its source"):
        atomic.refuse_overlap(str(tmp_path), [str(tmp_path / "alias")], "output")    # contains the source
    atomic.refuse_overlap(str(tmp_path / "srcx"), [str(tmp_path / "src")], "output")   # a sibling: fine


@pytest.fixture
def hub_cache(tmp_path):
    """An HF hub-cache layout: snapshots/abc/NAME -> ../../blobs/hN, blobs/ holding the bytes."""
    repo = tmp_path / "models--x--tiny"
    blobs, snap, seed = repo / "blobs", repo / "snapshots" / "abc", tmp_path / "seed"
    for d in (blobs, snap, seed):
        d.mkdir(parents=True)
    fuzz.seed_hf(str(seed))
    fuzz.seed_hf_tokenizer(str(seed))
    for i, name in enumerate(sorted(os.listdir(seed))):
        os.replace(seed / name, blobs / f"h{i}")
        os.symlink(f"../../blobs/h{i}", snap / name)
    return repo


def test_convert_onto_the_blobs_its_snapshot_links_into_is_refused(hub_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    blobs = hub_cache / "blobs"
    (blobs / "index.json").write_text(FORGED_INDEX)
    before = snapshot(blobs)
    snap = str(hub_cache / "snapshots" / "abc")
    refused(capsys, ["convert", snap, str(blobs), "--force", "--quiet"], str(blobs))
    refused(capsys, ["convert", snap, str(hub_cache), "--force", "--quiet"])   # holds the blobs
    (blobs / "golden.json").write_text(json.dumps({"npllama": "0", "files": {}}))
    before = snapshot(blobs)
    refused(capsys, ["golden", "-m", snap, "--tokens", "1,2", "-o", str(blobs), "--force", "--max-new-tokens", "1"])
    assert snapshot(blobs) == before


def test_trace_onto_a_weight_file_its_snapshot_links_to_is_refused(hub_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    blobs = hub_cache / "blobs"
    snap = hub_cache / "snapshots" / "abc"
    before = snapshot(blobs)
    weight = os.path.realpath(snap / "model-00001-of-00002.safetensors")
    refused(capsys, ["trace", "-m", str(snap), "--tokens", "1,2", "-o", weight], weight)
    os.link(weight, tmp_path / "hard")   # a hard link elsewhere to the same weights
    refused(capsys, ["trace", "-m", str(snap), "--tokens", "1,2", "-o", str(tmp_path / "hard")])
    assert snapshot(blobs) == before


def test_a_source_folder_too_big_to_walk_is_refused_not_half_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "MAX_SOURCE_ENTRIES", 3)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / "sub" / str(i)).write_text("x")
    with pytest.raises(UsageError, match="holds more than 3 files"):
        atomic.refuse_overlap(str(tmp_path / "out"), [str(src)], "output")
