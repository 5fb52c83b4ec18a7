"""Token ids on the command line: --tokens / --tokens-file for generate, trace, golden (and
perplexity, in test_perplexity.py); generate --show-ids, --logprobs K and --json, checked
against the model's own distribution computed here."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import npllama
from npllama.inspect import tracefile as tracing
from oracles import small_args, write_byte_model


def run(*argv):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model whose tokens are bytes (ids 0-255) plus four control tokens (256-259)."""
    return write_byte_model(str(tmp_path_factory.mktemp("m") / "bytes"), small_args(vocab_size=260, max_seq_len=64))


def log_softmax(logits):
    x = logits.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


PROMPT = [256, 72, 101, 108, 108, 111]   # bos "Hello"


def test_generate_json_gives_ids_logprobs_and_alternatives(model_dir):
    r = run("generate", "-m", model_dir, "--tokens", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
            "--logprobs", "3", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    steps, final = lines[:-1], lines[-1]
    assert final["prompt_ids"] == PROMPT and final["ids"] == [s["id"] for s in steps] and len(steps) >= 1
    assert final["stop_reason"] in ("length", "stop_token") and final["text"] == bytes(final["ids"]).decode(
        "utf-8", errors="replace")
    model, seq = npllama.load(model_dir), list(PROMPT)
    for s in steps:
        lp = log_softmax(model.forward(np.array(seq))[-1])
        assert s["id"] == int(np.argmax(lp))                     # greedy
        assert s["logprob"] == pytest.approx(lp[s["id"]], abs=1e-5)
        best = np.argsort(-lp, kind="stable")[:3]
        assert [t["id"] for t in s["top"]] == best.tolist()
        assert [t["logprob"] for t in s["top"]] == pytest.approx(lp[best].tolist(), abs=1e-5)
        assert s["piece"] == bytes([s["id"]]).decode("utf-8", errors="replace")
        seq.append(s["id"])
    assert "tok/s" in r.stderr


def test_token_files_and_show_ids(model_dir, tmp_path):
    np.save(tmp_path / "p.npy", np.array(PROMPT, dtype=np.int32))
    (tmp_path / "p.txt").write_text(" ".join(map(str, PROMPT[:3])) + "\n" + ",".join(map(str, PROMPT[3:])) + "\n")
    outs = [run("generate", "-m", model_dir, *src, "--max-new-tokens", "4", "--json").stdout
            for src in (("--tokens", " 256, 72,101,108,108,111 "), ("--tokens-file", str(tmp_path / "p.npy")),
                        ("--tokens-file", str(tmp_path / "p.txt")))]
    results = [[json.loads(x) for x in out.splitlines()] for out in outs]
    for r in results:   # the same tokens; only the timings in the last line differ
        r[-1] = {k: v for k, v in r[-1].items() if not k.endswith("seconds")}
    assert results[0] == results[1] == results[2] and results[0][-1]["prompt_ids"] == PROMPT
    ids = results[0][-1]["ids"]
    r = run("generate", "-m", model_dir, "--tokens-file", str(tmp_path / "p.npy"), "--max-new-tokens", "4",
            "--show-ids")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    pieces = ["<|begin_of_text|>", "H", "e", "l", "l", "o"]
    assert lines[:len(PROMPT)] == [f"{t:>7}  {json.dumps(p)}" for t, p in zip(PROMPT, pieces)]
    assert lines[len(PROMPT)] == "---"
    assert [int(x.split()[0]) for x in lines[len(PROMPT) + 1:]] == ids
    # plain text mode echoes the decoded prompt, as --raw does
    plain = run("generate", "-m", model_dir, "--tokens", "72,105", "--max-new-tokens", "2")
    assert plain.stdout.startswith("Hi")


def test_trace_and_golden_take_token_ids(model_dir, tmp_path):
    r = run("trace", "-m", model_dir, "--tokens", "256,72,105", "-o", str(tmp_path / "t.npz"))
    assert r.returncode == 0, r.stderr
    t = tracing.load(str(tmp_path / "t.npz"))
    assert t["tokens"].tolist() == [256, 72, 105] and t["__meta__"]["pieces"] == ["<|begin_of_text|>", "H", "i"]
    assert t["__meta__"]["prompt"] is None
    r = run("golden", "-m", model_dir, "--tokens", "256,72,105", "-o", str(tmp_path / "g"), "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "g" / "golden.json").read_text())
    assert meta["tokens"] == [256, 72, 105] and meta["prompt"] is None
    assert np.load(tmp_path / "g" / "tokens.npy").tolist() == [256, 72, 105]
    # text prompts still work, and record the prompt
    r = run("trace", "-m", model_dir, "Hi", "-o", str(tmp_path / "u.npz"))
    assert tracing.load(str(tmp_path / "u.npz"))["__meta__"]["prompt"] == "Hi"


def test_trace_and_golden_drop_the_sampling_flags():
    for cmd in ("trace", "golden"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "--tokens" in r.stdout
        assert not any(f in r.stdout for f in ("--temperature", "--top-p", "--top-k", "--seed"))
    g = run("generate", "--help").stdout
    assert all(f in g for f in ("--temperature", "--tokens-file", "--show-ids", "--logprobs", "--json"))
    assert run("trace", "x", "-o", "y.npz", "--temperature", "1").returncode == 2   # argparse: unknown flag
    for cmd in ("perplexity", "plot"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and f"usage: npllama {cmd}" in r.stdout and "--temperature" not in r.stdout


def test_bad_token_ids_are_one_line_errors(model_dir, tmp_path):
    np.save(tmp_path / "2d.npy", np.zeros((2, 2), np.int64))
    np.save(tmp_path / "f.npy", np.zeros(3, np.float32))
    (tmp_path / "bad.txt").write_text("1 2 three")
    with open(tmp_path / "huge.npy", "wb") as f:   # np.load would allocate the 8 TB this header claims
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
        f.write(bytes(24))
    os.mkfifo(tmp_path / "fifo.txt")
    for argv, msg in [(("--tokens", "1,x"), "--tokens: 'x' is not a token id"),
                      (("--tokens", "1,260"), "token id 260 is outside the vocabulary (0..259)"),
                      (("--tokens", ","), "--tokens: no token ids"),
                      (("--tokens-file", str(tmp_path / "2d.npy")), "expected a 1-D array of integer ids"),
                      (("--tokens-file", str(tmp_path / "f.npy")), "expected a 1-D array of integer ids"),
                      (("--tokens-file", str(tmp_path / "bad.txt")), "'three' is not a token id"),
                      (("--tokens-file", str(tmp_path / "none.npy")), "none.npy: no such file"),
                      (("--tokens-file", str(tmp_path / "huge.npy")), "huge.npy: bytes 128..8796093022336 lie outside"),
                      (("--tokens-file", str(tmp_path / "fifo.txt")), "fifo.txt: not a regular file"),
                      (("x", "--tokens", "1"), "not both"),
                      (("--tokens", "1", "--chat"), "--chat (or --system) does not apply"),
                      ((), "give a prompt, or token ids")]:   # --logprobs -1: refused before the model, test_cli.py
        r = run("generate", "-m", model_dir, *argv)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    r = run("generate", "-m", model_dir, "--tokens", "1", "--tokens-file", "x.npy")
    assert r.returncode == 2 and "not allowed with" in r.stderr
