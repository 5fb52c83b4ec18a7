"""npllama perplexity: llama.cpp's method checked against a direct computation with torch's
cross-entropy; the KL-divergence base file checked field by field against the layout
llama.cpp's tools/perplexity/perplexity.cpp writes, then read back; the KL statistics
against torch's; the command line."""
import io
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from npllama import Transformer
from npllama.inspect import perplexity as pp
from npllama.errors import UsageError
from oracles import random_weights, small_args, write_byte_model

pytestmark = pytest.mark.torch

ARGS = small_args(vocab_size=97, max_seq_len=64)   # odd vocabulary: base-file rows carry one padding entry
W = random_weights(ARGS, seed=3)


def loud(weights, factor=8.0):
    """The same model with logits spread over more than the 16 nats the base file resolves."""
    return dict(weights, **{"output.weight": weights["output.weight"] * np.float32(factor)})


def direct(args, weights, tokens, n_ctx, bos):
    """llama.cpp's recipe written out plainly: each chunk one forward pass from position 0
    (its first token bos when the tokenizer adds one), torch's cross-entropy on the second
    half, PPL = exp(mean) and PPL * (standard error of the mean)."""
    first, nll = n_ctx // 2, []
    for i in range(len(tokens) // n_ctx):
        chunk = np.array(tokens[i * n_ctx:(i + 1) * n_ctx])
        fed = chunk.copy()
        if bos is not None:
            fed[0] = bos
        logits = torch.from_numpy(Transformer(args, weights, max_seq_len=n_ctx).forward(fed)).double()
        nll.append(torch.nn.functional.cross_entropy(logits[first:n_ctx - 1], torch.from_numpy(chunk[first + 1:]),
                                                     reduction="none"))
    nll = torch.cat(nll)
    ppl = math.exp(float(nll.mean()))
    return ppl, ppl * float(nll.std()) / math.sqrt(len(nll)), len(nll)


def quiet_run(model, tokens, n_ctx, bos=None, **kw):
    out, err = io.StringIO(), io.StringIO()
    r = pp.run_perplexity(model, tokens, n_ctx, bos, out=out, err=err, **kw)
    return r, out.getvalue(), err.getvalue()


# Our chunks are fed as [first half, last_only] + [second half] instead of one pass: the same
# float32 arithmetic in other GEMM shapes, ~1e-7 relative on the logits. PPL agrees to 1e-6
# relative; a wrong position, target or chunk boundary moves it by 1e-2 or more.
PPL_RTOL = 1e-6


@settings(max_examples=12, deadline=None)
@given(n_ctx=st.integers(4, 24), extra=st.integers(0, 40), bos=st.sampled_from([None, 5]),
       batch=st.sampled_from(["pieces", "chunk", "rows"]), seed=st.integers(0, 2**31 - 1))
def test_perplexity_equals_direct_computation(n_ctx, extra, bos, batch, seed):
    tokens = np.random.default_rng(seed).integers(0, ARGS.vocab_size, 2 * n_ctx + extra)
    n_batch = {"pieces": max(1, n_ctx // 3), "chunk": None, "rows": 2 * n_ctx}[batch]
    model = Transformer(ARGS, W, max_seq_len=n_ctx, max_batch_size=2)
    r, out, err = quiet_run(model, tokens, n_ctx, bos, n_batch=n_batch)
    ppl, ppl_err, count = direct(ARGS, W, tokens, n_ctx, bos)
    assert r.count == count == (len(tokens) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    assert r.ppl == pytest.approx(ppl, rel=PPL_RTOL)
    assert r.ppl_err == pytest.approx(ppl_err, rel=1e-4)  # a difference of two nearby sums: fewer digits
    # llama.cpp's output: the running PPL after every chunk, then the final estimate
    assert out.startswith("[1]") and out.count(",") == len(tokens) // n_ctx
    assert f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}" in out
    assert "tok/s" in err


def test_per_chunk_values_are_running_perplexities():
    tokens = np.random.default_rng(1).integers(0, 97, 5 * 16)
    r, out, _ = quiet_run(Transformer(ARGS, W, max_seq_len=16), tokens, 16, n_chunks=3)
    assert len(r.chunks) == 3
    for k in (1, 3):
        assert r.chunks[k - 1] == pytest.approx(direct(ARGS, W, tokens[:k * 16], 16, None)[0], rel=PPL_RTOL)
    assert out.split(",")[:3] == [f"[{k + 1}]{v:.4f}" for k, v in enumerate(r.chunks)]


def parse_base_file(path):
    """The base file read by hand, following perplexity.cpp: logits_stream.write("_logits_", 8);
    write(&n_ctx, 4); write(&n_vocab, 4); write(&n_chunk, 4); write(tokens, n_chunk*n_ctx*4);
    then per chunk, process_logits writes (n_ctx - 1 - n_ctx/2) rows of nv = 2*((n_vocab+1)/2)+4
    uint16, filled by log_softmax: ((float*)row)[0] = scale, [1] = min_log_prob, row[4 + i] = q_i."""
    data = open(path, "rb").read()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", data, 8)
    tokens = np.frombuffer(data, "<i4", n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    nv, n_rows = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    body = data[20 + 4 * tokens.size:]
    assert len(body) == n_chunk * n_rows * nv * 2
    rows = []
    for k in range(n_chunk * n_rows):
        row = body[k * nv * 2:(k + 1) * nv * 2]
        scale, min_log_prob = struct.unpack_from("<ff", row, 0)
        q = np.frombuffer(row, "<u2", n_vocab, 8)
        pad = np.frombuffer(row, "<u2", nv - 4 - n_vocab, 8 + 2 * n_vocab)
        rows.append((scale, min_log_prob, q, pad))
    return n_ctx, n_vocab, n_chunk, tokens, rows


def test_base_file_layout_field_by_field(tmp_path):
    weights, n_ctx, bos = loud(W), 16, 7
    tokens = np.random.default_rng(2).integers(0, 97, 3 * n_ctx + 5)
    path = str(tmp_path / "base.kld")
    quiet_run(Transformer(ARGS, weights, max_seq_len=n_ctx), tokens, n_ctx, bos, base_path=path)
    assert os.listdir(tmp_path) == ["base.kld"]                    # no partial file left
    got_ctx, n_vocab, n_chunk, got_tokens, rows = parse_base_file(path)
    assert (got_ctx, n_vocab, n_chunk) == (n_ctx, 97, 3)
    assert np.array_equal(got_tokens.ravel(), tokens[:3 * n_ctx])  # as tokenized: bos not substituted
    first, k, seen_clipped = n_ctx // 2, 0, False
    for c in range(n_chunk):
        fed = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        fed[0] = bos
        logits = Transformer(ARGS, weights, max_seq_len=n_ctx).forward(fed).astype(np.float64)
        log_p = torch.log_softmax(torch.from_numpy(logits), -1).numpy()
        for t in range(first, n_ctx - 1):
            scale, min_log_prob, q, pad = rows[k]
            k += 1
            top, low = logits[t].max(), max(logits[t].min(), logits[t].max() - 16)
            # the logits differ from ours by float32 GEMM order (~1e-6): compare to that
            assert scale == pytest.approx((top - low) / 65535, rel=1e-5)
            log_z = top + np.log(np.exp(logits[t] - top).sum())
            assert min_log_prob == pytest.approx(low - log_z, abs=1e-4)
            resolved = logits[t] > low + 1e-4
            # every resolved log-probability within half a step (plus float32 noise) of the truth
            assert np.abs(scale * q[resolved] + min_log_prob - log_p[t][resolved]).max() <= scale / 2 + 1e-4
            assert np.all(q[logits[t] < low - 1e-4] == 0) and q.max() == 65535
            assert np.all(pad == 0) and len(pad) == 1
            seen_clipped |= bool((logits[t] < low - 1e-4).any())
    assert seen_clipped  # the 16-nat floor was exercised


def test_base_file_read_back_against_itself_and_against_another_model(tmp_path):
    n_ctx, tokens = 16, np.random.default_rng(4).integers(0, 97, 8 * 16)
    base_w = loud(W, 3.0)
    path = str(tmp_path / "base.kld")
    base_model = Transformer(ARGS, base_w, max_seq_len=n_ctx)
    r, _, _ = quiet_run(base_model, tokens, n_ctx, base_path=path)
    base = pp.BaseFile.open(path)
    assert base.tokens.shape == (8, 16) and base.rows.shape == (8, 7, 102)

    same = pp.run_kl_divergence(base_model, base, out=io.StringIO(), err=io.StringIO())
    # Only the 16-bit quantization of the base separates them: its log-probabilities are off
    # by delta, |delta| <= 16/65535/2 = 1.2e-4 nats, and KL = sum p_base * delta is within that.
    assert same["count"] == r.count and same["ppl"] == pytest.approx(r.ppl, rel=1e-5)
    assert same["ppl_base"] == pytest.approx(r.ppl, rel=1.3e-4)
    assert abs(same["kld"]) < 1.3e-4 and same["same_top"] == 1.0

    # Another model (other weights): every statistic against torch on the two models' logits.
    other_w = dict(base_w, **{k: v * np.float32(1.05) for k, v in base_w.items() if "wq" in k or "w2" in k})
    other = Transformer(ARGS, other_w, max_seq_len=n_ctx)
    s = pp.run_kl_divergence(other, base, out=io.StringIO(), err=io.StringIO())
    lp_base, lp_other, targets = [], [], []
    for chunk in tokens.reshape(8, 16):
        lp_base.append(torch.log_softmax(torch.from_numpy(Transformer(ARGS, base_w).forward(chunk)).double(), -1)[8:15])
        lp_other.append(torch.log_softmax(torch.from_numpy(other.forward(chunk)).double(), -1)[8:15])
        targets.append(torch.from_numpy(chunk[9:16]))
    lp_base, lp_other, targets = torch.cat(lp_base), torch.cat(lp_other), torch.cat(targets)
    kl = torch.nn.functional.kl_div(lp_other, lp_base, log_target=True, reduction="none").sum(-1).numpy()
    # the base side is quantized (1.2e-4 nats) and drops p < e^-16: 2e-4 nats of slack
    assert s["kld"] == pytest.approx(kl.mean(), abs=2e-4) and kl.mean() > 1e-3
    for name, f in (("Maximum", 1.0), ("Median", 0.5), ("Minimum", 0.0), ("90.0%", 0.9)):
        assert s["kld_percentiles"][name] == pytest.approx(np.quantile(kl, f), abs=2e-4), name
    nll_b = -lp_base.gather(1, targets[:, None])[:, 0]
    nll_o = -lp_other.gather(1, targets[:, None])[:, 0]
    assert s["ppl"] == pytest.approx(math.exp(nll_o.mean()), rel=1e-5)
    assert s["ln_ppl_ratio"] == pytest.approx(float((nll_o - nll_b).mean()), abs=2e-4)
    assert s["same_top"] == pytest.approx(float((lp_base.argmax(-1) == lp_other.argmax(-1)).double().mean()))
    p_diff = (torch.exp(-nll_o) - torch.exp(-nll_b)).numpy()
    assert s["p_diff_rms"] == pytest.approx(np.sqrt((p_diff ** 2).mean()), abs=2e-4)


def test_kl_report_has_llama_cpp_lines():
    kl = pp.KLDivergence()
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((120, 33)).astype(np.float32)
    kl.add(logits, pp.quantize_log_probs(logits + 0.1 * rng.standard_normal((120, 33)).astype(np.float32)),
           rng.integers(0, 33, 120))
    report = pp.format_kl_report(kl.summary())
    for line in ("Mean PPL(Q)                   : ", "Cor(ln(PPL(Q)), ln(PPL(base))): ", "Mean    KLD: ",
                 "Maximum KLD: ", "99.9%   KLD: ", "Median  KLD: ", " 0.1%   KLD: ", "Minimum KLD: ",
                 "Mean    Δp: ", "75.0%   Δp: ", "RMS Δp    : ", "Same top p: "):
        assert any(r.startswith(line) for r in report.splitlines()), line


def test_percentile_is_llama_cpps():
    v = np.array([1.0, 2.0, 4.0, 8.0])
    assert pp.percentile(v, 0.5) == 3.0 and pp.percentile(v, 1.0) == 8.0 and pp.percentile(v, 0.0) == 1.0
    assert pp.percentile(v, 0.9) == pytest.approx(0.3 * 4.0 + 0.7 * 8.0)   # p = 0.9 * 3 = 2.7


def test_errors_name_the_problem(tmp_path):
    model = Transformer(ARGS, W, max_seq_len=16)
    with pytest.raises(UsageError, match="is 20 tokens; perplexity with -c 16 needs at least 32"):
        quiet_run(model, np.zeros(20, int), 16)
    with pytest.raises(UsageError, match="--batch 20: must be below -c 16 or a multiple of it"):
        quiet_run(model, np.zeros(40, int), 16, n_batch=20)
    with pytest.raises(UsageError, match="2 chunks at once, but the model holds 1"):
        quiet_run(model, np.zeros(40, int), 16, n_batch=32)
    path = str(tmp_path / "base.kld")
    quiet_run(model, np.zeros(40, int), 16, base_path=path)
    data = open(path, "rb").read()
    for content, msg in ((b"_logit", "not a KL-divergence base file"), (b"xx" + data[2:], "not a KL-divergence"),
                         (data[:-1], "bytes, but n_ctx=16, n_vocab=97, n_chunk=2 make")):
        bad = tmp_path / "bad.kld"
        bad.write_bytes(content)
        with pytest.raises(UsageError, match=msg):
            pp.BaseFile.open(str(bad))
    with pytest.raises(UsageError, match="missing.kld: no such file"):
        pp.BaseFile.open(str(tmp_path / "missing.kld"))
    bigger = Transformer(small_args(vocab_size=98), random_weights(small_args(vocab_size=98)), max_seq_len=16)
    with pytest.raises(UsageError, match="a vocabulary of 97 tokens; this model has 98"):
        pp.run_kl_divergence(bigger, pp.BaseFile.open(path), out=io.StringIO(), err=io.StringIO())


def test_base_file_is_untrusted(tmp_path):
    """A header's counts are checked against the file size before anything is read, and each
    row's scale and minimum against what llama.cpp's quantization can make (a real
    llama-perplexity base file of SmolLM2, 8 chunks of 128, passes these checks: README)."""
    model = Transformer(ARGS, W, max_seq_len=16)
    path = str(tmp_path / "base.kld")
    quiet_run(model, np.zeros(40, int), 16, base_path=path)
    data = bytearray(open(path, "rb").read())
    bad = tmp_path / "bad.kld"
    bad.write_bytes(pp.HEADER.pack(pp.MAGIC, 16, 97, 2**31 - 1) + data[pp.HEADER.size:])   # claims ~3 TB
    # (refused by its positions, beyond pp.MAX_POSITIONS, before its size is even compared)
    with pytest.raises(UsageError, match=r"2,147,483,647 chunks of 16 positions .* beyond the 67,108,864 positions"):
        pp.BaseFile.open(str(bad))
    os.mkfifo(tmp_path / "fifo.kld")
    with pytest.raises(UsageError, match="fifo.kld: not a regular file"):
        pp.BaseFile.open(str(tmp_path / "fifo.kld"))
    rows_at = pp.HEADER.size + 4 * 2 * 16
    row = 2 * pp.row_width(97)
    for r, scale, low in ((0, float("nan"), -5.0), (1, 1.0, -5.0), (3, 16 / 65535, -30.0), (2, 16 / 65535, 1.0)):
        damaged = data.copy()
        damaged[rows_at + r * row:rows_at + r * row + 8] = struct.pack("<ff", scale, low)
        bad.write_bytes(damaged)
        base = pp.BaseFile.open(str(bad))   # the header is right: rows are checked when read
        with pytest.raises(UsageError, match=f"bad.kld: chunk 1, row {r + 1}: scale .* not what llama-perplexity"):
            pp.run_kl_divergence(model, base, out=io.StringIO(), err=io.StringIO())


def test_interrupted_run_leaves_no_base_file(tmp_path, monkeypatch):
    model = Transformer(ARGS, W, max_seq_len=16)
    calls = []

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return Transformer.forward(model, *a, **k)
    monkeypatch.setattr(model, "forward", fail_on_third)
    (tmp_path / "base.kld.partial").write_text("a user's file")   # not a name npllama stages under
    with pytest.raises(KeyboardInterrupt):
        quiet_run(model, np.zeros(48, int), 16, base_path=str(tmp_path / "base.kld"))
    assert os.listdir(tmp_path) == ["base.kld.partial"] and "user" in (tmp_path / "base.kld.partial").read_text()
    monkeypatch.undo()
    quiet_run(model, np.zeros(48, int), 16, base_path=str(tmp_path / "base.kld"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "base.kld").st_mode & 0o777 == 0o666 & ~umask   # as open() makes it, not 0600
    assert "user" in (tmp_path / "base.kld.partial").read_text()


# --- the command line ---------------------------------------------------------------------

def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    args = small_args(vocab_size=260, max_seq_len=1024)   # trained context: -c 512 (the default) fits
    return args, write_byte_model(str(tmp_path_factory.mktemp("m") / "bytes"), args, add_bos=True)


TEXT = "The quick brown fox jumps over the lazy dog.\r\nPack my box with five dozen liquor jugs. " * 3 + "\n"


def final_estimate(out: str) -> tuple[float, float]:
    """PPL and its error from llama.cpp's closing line, `Final estimate: PPL = X +/- Y`."""
    m = re.search(r"^Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)$", out, re.M)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def test_cli_perplexity_and_kl_round_trip(byte_model, tmp_path):
    from npllama.io import checkpoint
    args, model_dir = byte_model
    (tmp_path / "t.txt").write_bytes(TEXT.encode())
    r = run_cli("perplexity", "-m", model_dir, "-f", str(tmp_path / "t.txt"), "-c", "32",
                "--kl-divergence-base", str(tmp_path / "b.kld"))
    assert r.returncode == 0, r.stderr
    # bytes as tokens, bos first, one trailing newline dropped (llama.cpp's -f), \r\n kept
    ids = [256] + list(TEXT[:-1].encode())
    weights = {k: np.asarray(v) for k, v in checkpoint.open_tensors(model_dir).items()}
    ppl, ppl_err, _ = direct(args, weights, ids, 32, 256)
    # The CLI's sums run in another order than direct()'s: compare the parsed numbers, not digits.
    printed_ppl, printed_err = final_estimate(r.stdout)
    assert printed_ppl == pytest.approx(ppl, rel=PPL_RTOL)
    assert printed_err == pytest.approx(ppl_err, rel=1e-4)  # a difference of two nearby sums, as above
    assert r.stdout.startswith("[1]") and "tok/s" in r.stderr and "wrote " in r.stderr
    assert pp.BaseFile.open(str(tmp_path / "b.kld")).tokens.ravel().tolist() == ids[:len(ids) // 32 * 32]

    j = run_cli("perplexity", "-m", model_dir, "-f", str(tmp_path / "t.txt"), "-c", "32", "--json")
    lines = [json.loads(x) for x in j.stdout.splitlines()]
    assert [x["chunk"] for x in lines[:-1]] == list(range(1, len(ids) // 32 + 1))
    assert lines[-1]["ppl"] == pytest.approx(ppl, rel=PPL_RTOL) and lines[-1]["scored_tokens"] == 15 * (len(ids) // 32)

    np.save(tmp_path / "ids.npy", np.array(ids))
    t = run_cli("perplexity", "-m", model_dir, "--tokens-file", str(tmp_path / "ids.npy"), "-c", "32", "--json")
    assert json.loads(t.stdout.splitlines()[-1])["ppl"] == lines[-1]["ppl"]

    k = run_cli("perplexity", "-m", model_dir, "--kl-divergence", str(tmp_path / "b.kld"))
    assert k.returncode == 0, k.stderr
    assert "Same top p: 100.000 ±" in k.stdout
    kld = float(re.search(r"Mean    KLD: +(-?[0-9.]+)", k.stdout).group(1))
    assert abs(kld) < 1.3e-4  # the base's quantization only, as above
    assert "chunk             PPL" in k.stdout


def test_cli_perplexity_errors_are_one_line(byte_model, tmp_path):
    _, model_dir = byte_model
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "long.txt").write_text(TEXT)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 40)
    (tmp_path / "b.kld").write_bytes(b"not a base file at all")
    for argv, msg in [(("-f", str(tmp_path / "short.txt"), "-c", "16"), "needs at least 32"),
                      (("-f", str(tmp_path / "latin1.txt")), "not UTF-8 text"),
                      (("-f", str(tmp_path / "nope.txt")), "No such file"),
                      ((), "give the text to score with -f FILE"),
                      (("--kl-divergence", str(tmp_path / "b.kld")), "not a KL-divergence base file"),
                      (("-f", str(tmp_path / "short.txt"), "-c", "2"), "at least 4 tokens"),
                      (("-f", str(tmp_path / "long.txt"), "-c", "8", "-b", "-3"), "--batch -3: must be below -c 8"),
                      (("-f", str(tmp_path / "long.txt"), "-c", "8", "-b", "12"), "--batch 12: must be below -c 8 or a"),
                      (("--tokens", "1,2,x"), "'x' is not a token id"),
                      (("-f", str(tmp_path / "long.txt"), "-c", "2048"),
                       "longer than the 1024 tokens this model was trained for; add --force-ctx")]:
        r = run_cli("perplexity", "-m", model_dir, *argv)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_read_text_is_llama_cpps(tmp_path):
    from npllama.cli.inspect import read_text
    p = tmp_path / "t.txt"
    p.write_bytes(b"a\r\nb\n\n")
    assert read_text(str(p)) == "a\r\nb\n"
