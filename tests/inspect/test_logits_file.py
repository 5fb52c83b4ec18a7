"""Saved-logits files (llama-perplexity --kl-divergence-base) compared by what they hold: a real
file recorded from llama.cpp on a tiny random GGUF (tests/data/llamacpp/README.txt) against
npllama on the same weights, a divergence planted in that file found at its chunk, position
and token, and the strictness that keeps a comparison covering little from passing."""
import hashlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import npllama
from npllama.errors import NpllamaError
from npllama.inspect import logits, perplexity as pp, tracefile
from npllama.io import checkpoint
from oracles import TESTS
from tools.random_gguf import TINY, write as write_gguf

DATA = os.path.join(TESTS, "data", "llamacpp")
RECORDED = os.path.join(DATA, "perplexity-tiny-f32.kld")
# the GGUF the recording was made from, rebuilt here from its seed; its digest is the one
# the README gives, so the weights are those llama.cpp ran
GGUF_SHA256 = "8e9c1cb6ce28e0e028ca86446ec023bf781b5e853df5e39bb3060a92b15fc3ad"
BOS = 257
# llama.cpp ran the F32 weights with an f32 KV cache (-ctk f32 -ctv f32): its logits differ
# from npllama's by float32 summation order only, ~1e-6 of logits of size ~3, so ~1e-5 nats
# in log p; compare adds half of each file's 16-bit quantization step (<= 16/65535/2 =
# 1.2e-4 nats). atol 5e-5 is 5x the float32 part; a wrong RoPE moves log p by ~1 nat.
ATOL = 5e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_gguf(path, npllama.ModelArgs(**TINY), "F32", seed=0, byte_vocab=True)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == GGUF_SHA256, "not the GGUF the recording was made from"
    return checkpoint.load(path)


def npllama_base(model, path):
    """npllama's own base file of the recorded file's tokens (llama-perplexity's method:
    each chunk fresh from position 0, BOS at position 0)."""
    base = pp.BaseFile.open(RECORDED)
    pp.run_perplexity(model, base.tokens.reshape(-1), base.n_ctx, BOS, base_path=path, out=io.StringIO(),
                      err=io.StringIO())
    return path


def report(a, b, **kw):
    out = io.StringIO()
    rep = logits.compare_logits(logits.load_side(a), logits.load_side(b), out=out, **kw)
    return rep, out.getvalue()


def test_llama_cpp_logits_file_agrees_with_npllama_at_every_scored_position(tiny, tmp_path):
    mine = npllama_base(tiny, str(tmp_path / "npllama.kld"))
    rep, text = report(mine, RECORDED, rtol=0, atol=ATOL)
    base = pp.BaseFile.open(RECORDED)
    assert rep.ok and rep.compared == rep.expected == base.rows.shape[0] * base.rows.shape[1], text
    assert f"compared {rep.expected} of the logits file's (B's) {rep.expected} scored positions" in text
    assert all(c.same_top == len(c.positions) for c in rep.chunks)


def test_a_trace_of_one_chunk_compares_at_its_positions_and_fails_without_the_rest(tiny, tmp_path):
    base = pp.BaseFile.open(RECORDED)
    tokens = base.tokens[1].copy()
    tokens[0] = BOS                                      # as llama-perplexity ran the chunk
    tr = npllama.trace(tiny, tokens, layers=[])
    path = str(tmp_path / "chunk2.npz")
    tracefile.save(path, tr)
    rep, text = report(path, RECORDED, rtol=0, atol=ATOL)
    assert not rep.ok and rep.first is None and rep.compared == base.rows.shape[1], text   # chunk 2's 7 rows
    assert "FAIL: " in text and "--allow-missing" in text and "runs each chunk with BOS there" in text
    rep, text = report(path, RECORDED, rtol=0, atol=ATOL, allow_missing=True)
    assert rep.ok and [len(c.positions) for c in rep.chunks] == [0, 7] + [0] * (len(base.tokens) - 2), text


def top_token(chunk, row):
    base = pp.BaseFile.open(RECORDED)
    return int(np.argmax(base.chunk(chunk)[row, 4:4 + base.n_vocab]))


def planted(tmp_path, chunk, row, token):
    """A copy of the recorded file with one 16-bit code of one row set to 0 (that token's
    log p falls to the row's floor)."""
    base = pp.BaseFile.open(RECORDED)
    copy = str(tmp_path / "planted.kld")
    shutil.copy(RECORDED, copy)
    rows_at = pp.HEADER.size + 4 * base.tokens.size
    offset = rows_at + 2 * ((chunk * base.rows.shape[1] + row) * base.rows.shape[2] + 4 + token)
    with open(copy, "r+b") as f:
        f.seek(offset)
        f.write(b"\0\0")
    return copy


def test_a_divergence_planted_in_the_real_file_is_found_at_its_position_and_token(tiny, tmp_path):
    token = top_token(2, 3)                             # the top token of chunk 3 at position 8 + 3
    bent = planted(tmp_path, 2, 3, token)
    rep, text = report(npllama_base(tiny, str(tmp_path / "npllama.kld")), bent, rtol=0, atol=ATOL)
    assert not rep.ok and rep.first == "chunk 3, position 11" and rep.first_token == token, text
    assert f"token {token} has log p" in text and "<-- first outside tolerance" in text


def test_a_planted_model_bug_is_found_at_the_first_scored_position(tiny, tmp_path, monkeypatch):
    from npllama.model import model as model_module
    from test_trace import rotate_half_rope
    monkeypatch.setattr(model_module, "apply_rotary_emb", rotate_half_rope)
    rep, text = report(npllama_base(tiny, str(tmp_path / "bent.kld")), RECORDED, rtol=0, atol=ATOL)
    assert not rep.ok and rep.first == "chunk 1, position 8", text


def test_compared_nothing_is_an_error_and_other_texts_fail(tiny, tmp_path):
    base = pp.BaseFile.open(RECORDED)
    short = str(tmp_path / "short.npz")                 # 6 tokens: ends before the scored half
    tracefile.save(short, npllama.trace(tiny, base.tokens[0][:6], layers=[]))
    with pytest.raises(NpllamaError, match="compared nothing: .*logits at positions 0..5 of one sequence"):
        report(short, RECORDED)
    other = base.tokens[0].copy()
    other[10] = (other[10] + 1) % 256                   # another text from position 10
    path = str(tmp_path / "other.npz")
    tracefile.save(path, npllama.trace(tiny, other, layers=[]))
    rep, text = report(path, RECORDED, allow_missing=True)
    assert not rep.ok and "DIFFERENT tokens from position 10" in text, text


def test_the_command_line_compares_logits_files(tiny, tmp_path):
    mine = npllama_base(tiny, str(tmp_path / "npllama.kld"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "npllama", "compare", *a], capture_output=True,  # noqa
                                    text=True, timeout=120)
    r = run(mine, RECORDED, "--rtol", "0", "--atol", str(ATOL))
    assert r.returncode == 0 and "all within tolerance" in r.stdout, r.stdout + r.stderr
    r = run(mine, planted(tmp_path, 0, 0, top_token(0, 0)), "--rtol", "0", "--atol", str(ATOL))
    assert r.returncode == 1 and "first outside tolerance: chunk 1, position 8" in r.stdout, r.stdout + r.stderr
    truncated = str(tmp_path / "cut.kld")
    with open(RECORDED, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read()[:-3])
    r = run(mine, truncated)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cut.kld" in r.stderr, r.stderr
