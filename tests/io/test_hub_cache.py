"""hub.resolve_model's conversion cache (<cache>/converted/NAME-KEY, hashes.json) as a careless
user and an attacker meet it: sources replaced behind the same size and mtime, a damaged or
hostile hashes.json, odd file names, two processes converting at once. Sources are a tiny
GGUF written by gguf's own writer (tools/fuzz.py's seed); each conversion takes ~0.1 s."""
import os
import re
import shutil

import pytest

import npllama.io.checkpoint
import npllama.io.convert
from npllama.io import hub
from npllama.errors import UsageError
from npllama.text.tokenizer import load as load_tokenizer
from tools.fuzz import seed_gguf


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """a.gguf and b.gguf: the same size, different chat templates (so different models)."""
    d = tmp_path_factory.mktemp("ggufs")
    seed_gguf(str(d))
    a = d / "model.gguf"
    data = a.read_bytes()
    assert data.count(b"Be brief.") == 1
    (d / "b.gguf").write_bytes(data.replace(b"Be brief.", b"Be BRIEF."))
    return a, d / "b.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def template(out: str) -> str:
    return load_tokenizer(out).chat_template


def same_stamp_as(path, other):
    st = os.stat(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_source_replaced_behind_the_same_size_and_mtime_converts_again(ggufs, cache, tmp_path):
    a, b = ggufs
    link = tmp_path / "m.gguf"
    os.symlink(a, link)
    first = hub.resolve_model(str(link))
    assert "Be brief." in template(first)
    same_stamp_as(b, a)
    os.remove(link)
    os.symlink(b, link)          # the link pointed at another file of the same size and mtime
    second = hub.resolve_model(str(link))
    assert second != first and "Be BRIEF." in template(second)
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(a, copy)
    third = hub.resolve_model(str(copy))
    assert "Be brief." in template(third)
    st = os.stat(copy)
    with open(copy, "r+b") as f:   # rewritten in place (same inode), its mtime set back as cp -p would
        f.write(b.read_bytes())
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    fourth = hub.resolve_model(str(copy))
    assert fourth != third and "Be BRIEF." in template(fourth)


@pytest.mark.parametrize("memo", ["fifo", b"[1, 2]", b"{not json", b'{"a": 1, "a": 2}', "wrong digest", "wrong types"])
def test_a_damaged_or_hostile_hashes_json_is_recomputed(ggufs, cache, capsys, memo):
    a, _ = ggufs
    first = hub.resolve_model(str(a))
    assert "hashing" in capsys.readouterr().err
    path = cache / "converted" / "hashes.json"
    entry = hub.file_stamp(str(a))
    os.remove(path)
    if memo == "fifo":
        os.mkfifo(path)     # never waited on
    elif memo == "wrong digest":     # the right stamp, but no sha256
        path.write_text('{"%s": %s}' % (a, entry + ["x" * 64]))
    elif memo == "wrong types":
        path.write_text('{"%s": %s}' % (a, [str(v) for v in entry] + [[1]]))
    else:
        path.write_bytes(memo)
    assert hub.resolve_model(str(a)) == first
    err = capsys.readouterr().err
    assert "hashing" in err and "converting" not in err
    assert hub.resolve_model(str(a)) == first     # and remembered again
    assert "hashing" not in capsys.readouterr().err


def test_odd_source_names_make_plain_cache_names(ggufs, cache, tmp_path):
    a, _ = ggufs
    name = os.fsdecode(b"new\nline \xff" + b"x" * 230 + b".gguf")   # not UTF-8, 245 bytes
    odd = tmp_path / name
    shutil.copyfile(a, odd)
    out = hub.resolve_model(str(odd))
    assert re.fullmatch(r"new_line_x{55}-[0-9a-f]{16}", os.path.basename(out))
    assert "Be brief." in template(out)
    assert hub.cache_name("/x/.gguf") == "model" and hub.cache_name("/x/..") == "model"


def test_two_processes_converting_at_once_share_the_first_result(ggufs, cache, monkeypatch):
    """The other process is simulated: it finishes the same conversion while this one works.
    This one's result is discarded, the first one's folder kept as it was."""
    a, _ = ggufs
    real, seen = npllama.io.convert.convert, []

    def racing(src, dst, **kw):
        real(src, dst, quiet=True)                   # the other process, first to finish
        seen.append(os.stat(os.path.join(dst, "index.json")).st_ino)
        with pytest.raises(UsageError, match="already exists"):
            real(src, dst, **kw)
        raise UsageError(f"{dst}: already exists")   # what this process's conversion ended in
    monkeypatch.setattr(hub, "convert", racing)   # the name the hub calls
    out = hub.resolve_model(str(a))
    assert os.stat(os.path.join(out, "index.json")).st_ino == seen[0]
    assert "Be brief." in template(out)


def test_a_leftover_cache_folder(ggufs, cache):
    a, _ = ggufs
    out = hub.resolve_model(str(a))
    shutil.rmtree(out)
    os.mkdir(out)                              # empty: converted into
    assert hub.resolve_model(str(a)) == out and os.path.isfile(os.path.join(out, "index.json"))
    os.remove(os.path.join(out, "index.json"))
    (cache / "converted" / os.path.basename(out) / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a converted checkpoint npllama wrote"):  # never deleted
        hub.resolve_model(str(a))


def test_a_conversion_by_an_older_npllama_is_made_again(ggufs, cache):
    # An older npllama's converters wrote less (before checkpoint.CONVERTER 2: no chat
    # template from a GGUF); its conversion in the cache must not be used as if complete.
    import json
    a, _ = ggufs
    out = hub.resolve_model(str(a))
    index_path = os.path.join(out, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    assert index["converter"] == npllama.io.checkpoint.CONVERTER
    del index["converter"]                 # as an older npllama wrote it
    with open(index_path, "w") as f:
        json.dump(index, f)
    os.remove(os.path.join(out, "tokenizer.json"))   # ...and what it lacked
    assert not hub.up_to_date(out)
    assert hub.resolve_model(str(a)) == out and hub.up_to_date(out)
    assert "Be brief." in template(out)
