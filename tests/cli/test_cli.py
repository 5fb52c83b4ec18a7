"""The npllama command line, driven as a user would: subprocesses, pipes, exit codes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import npllama
from oracles import llama3_tokenizer_path, write_random_model


def run(*argv, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, input=stdin,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model with the real Llama 3 tokenizer (vocab 128256)."""
    args = npllama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                             max_seq_len=256)
    return write_random_model(str(tmp_path_factory.mktemp("m") / "tiny"), args, llama3_tokenizer_path())


def test_help_for_every_command():
    for cmd in ("convert", "info", "generate", "chat", "trace", "compare", "golden"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: npllama " + cmd in r.stdout


def test_generate_streams_and_reports_speed(model_dir):
    r = run("generate", "-m", model_dir, "The capital of France is", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is") and len(r.stdout) > len("The capital of France is")
    assert "prompt: 6 tokens" in r.stderr and "generated: " in r.stderr and "tok/s" in r.stderr
    again = run("generate", "-m", model_dir, "The capital of France is", "--max-new-tokens", "8")
    assert again.stdout == r.stdout  # greedy is deterministic
    s1 = run("generate", "-m", model_dir, "Hi", "--temperature", "1", "--seed", "5", "--max-new-tokens", "8")
    s2 = run("generate", "-m", model_dir, "Hi", "--temperature", "1", "--seed", "5", "--max-new-tokens", "8")
    assert s1.returncode == 0 and s1.stdout == s2.stdout


def test_chat_through_a_pipe_answers_and_exits(model_dir):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    from npllama.run.generate import Generator
    from npllama.text.tokenizer import load as load_tokenizer
    r = run("chat", "-m", model_dir, "--system", "Be brief.", "--max-new-tokens", "6",
            stdin="Hello there\nAnd a second question\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tok/s") == 4  # one stats line per turn (prompt and generated rates)
    first, second = (int(line.split("prompt: ")[1].split()[0]) for line in r.stderr.strip().splitlines())
    # The prompts as Meta's ChatFormat encodes the conversation, and the first answer as the
    # same greedy run gives it here.
    fmt = MetaChatFormat(MetaTokenizer(Path(llama3_tokenizer_path())))
    dialog = [RawMessage(role="system", content="Be brief."), RawMessage(role="user", content="Hello there")]
    prompt1 = fmt.encode_dialog_prompt(dialog).tokens
    answer = Generator(npllama.load(model_dir), load_tokenizer(model_dir)).generate(prompt1, 6)
    dialog += [RawMessage(role="assistant", content=answer.text),
               RawMessage(role="user", content="And a second question")]
    prompt2 = fmt.encode_dialog_prompt(dialog).tokens
    # The first turn prefills its whole prompt; the second only what its prompt does not share
    # with the cache, which holds the first prompt and every answer token fed back: all but the
    # last when the answer ran to its length (nothing was computed after it).
    held = prompt1 + (answer.tokens if answer.stop_reason == "stop_token" else answer.tokens[:-1])
    shared = next((i for i, (a, b) in enumerate(zip(held, prompt2)) if a != b), min(len(held), len(prompt2)))
    assert shared >= len(prompt1)  # the first prompt at least: reuse has something to reuse
    assert (first, second) == (len(prompt1), len(prompt2) - shared)


def test_chat_refuses_a_line_that_is_not_utf8_and_answers_the_next(model_dir):
    r = subprocess.run([sys.executable, "-m", "npllama", "chat", "-m", model_dir, "--max-new-tokens", "2"],
                       input=b"caf\xe9\nHello\n", capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert "stdin line 1: not UTF-8 text (byte 0xe9 at byte 3); line skipped" in err, err
    assert err.count("tok/s") == 2 and r.returncode == 1   # the second line answered; the refusal in the exit code


def test_errors_are_one_line(model_dir, tmp_path):
    for argv, msg in [(("generate", "-m", str(tmp_path / "nope"), "x"), "not a directory"),
                      (("generate", "-m", model_dir, "x", "--temperature", "-1"), "temperature"),
                      (("generate", "-m", model_dir, "x", "--top-p", "2"), "top_p"),
                      (("generate", "-m", model_dir, "x" * 2000, "--ctx", "64"), "exceeds the context")]:
        r = run(*argv)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_ctrl_c_ends_chat_cleanly(model_dir):
    import signal
    p = subprocess.Popen([sys.executable, "-m", "npllama", "chat", "-m", model_dir, "--max-new-tokens", "3"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdin.write("Hello\n")
    p.stdin.flush()
    assert "tok/s" in p.stderr.readline()  # the first answer is done; chat now waits for input
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "Traceback" not in err


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"npllama {npllama.__version__}\n"


def run_without_a_model(argv, tmp_path):
    """The command with NPLLAMA_CACHE at an empty folder: had the model been opened first,
    the error would be about fetching it, not about the argument."""
    env = {**os.environ, "NPLLAMA_CACHE": str(tmp_path / "empty-cache")}
    r = subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, env=env, timeout=60)
    assert not (tmp_path / "empty-cache").exists()
    stderr = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    return r.returncode, stderr


@pytest.mark.parametrize("argv, name", [
    (["generate", "--seed", "-1", "--temperature", "0.5", "hi"], "--seed"),
    (["perplexity", "-c", "0", "-f", "nothing.txt"], "-c/--ctx-size"),
    (["perplexity", "-c", "-5", "-f", "nothing.txt"], "-c/--ctx-size"),
    (["perplexity", "--chunks", "0", "-f", "nothing.txt"], "--chunks"),
    (["generate", "--max-new-tokens", "-3", "hi"], "--max-new-tokens"),
    (["generate", "--logprobs", "-1", "hi"], "--logprobs"),
    (["generate", "--stages", "0", "--ray", "local", "hi"], "--stages"),
    (["golden", "-o", "g", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["bench", "--reps", "0"], "--reps"),
    (["memory", "--batch", "0"], "--batch"),
    *[([cmd, *rest, "-t", bad], "-t/--threads") for bad in ("0", "-2", "two")
      for cmd, *rest in (["generate", "hi"], ["chat"], ["trace", "hi", "-o", "t.npz"], ["golden", "-o", "g"],
                         ["perplexity", "-f", "x.txt"], ["bench"], ["serve"])],
    (["generate", "--threads", "0", "hi"], "-t/--threads"),
])
def test_bad_numbers_are_refused_in_one_line_naming_the_argument_before_any_model_loads(argv, name, tmp_path):
    rc, stderr = run_without_a_model(argv, tmp_path)
    assert rc == 2 and f"argument {name}:" in stderr, stderr


@pytest.mark.parametrize("argv, name", [
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--temperature", "nan"], "temperature"),
    (["generate", "hi", "--top-p", "2"], "top_p"),
    (["generate", "hi", "--top-k", "-1"], "top_k"),
    (["chat", "--top-p", "0"], "top_p"),
])
def test_sampling_values_are_refused_by_the_library_before_any_model_loads(argv, name, tmp_path):
    rc, stderr = run_without_a_model(argv, tmp_path)
    assert rc == 1 and stderr.startswith(f"npllama: {name} must be"), stderr


@pytest.mark.parametrize("argv, name", [
    (["generate", b"caf\xe9"], "prompt"),                  # Latin-1, not UTF-8
    (["generate", "hi", "--system", b"\xff"], "--system"),
    (["generate", "hi", "--stop", b"a\x80"], "--stop"),
    (["chat", "--system", b"\xc3("], "--system"),          # a lead byte without its continuation
    (["trace", b"\xe9t\xe9", "-o", "t.npz"], "prompt"),
    (["golden", b"\xe9", "-o", "g"], "prompt"),
    (["golden", "--prompt", b"\xe9", "-o", "g"], "--prompt"),
])
def test_a_prompt_that_is_not_utf8_is_refused_naming_the_argument(argv, name, tmp_path):
    # Python decodes argv with surrogateescape: the tokenizer would have made U+FFFD of it.
    rc, stderr = run_without_a_model(argv, tmp_path)
    assert rc == 2 and f"argument {name}: not UTF-8 text (byte 0x" in stderr, stderr


def test_max_new_tokens_0_reports_the_prompts_length(model_dir):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
    text = "The capital of France is a city of some two million people on the Seine"
    n = len(MetaTokenizer(Path(llama3_tokenizer_path())).encode(text, bos=True, eos=False))   # Meta's count, with bos
    r = run("generate", "-m", model_dir, text, "--raw", "--max-new-tokens", "0")
    assert r.returncode == 0 and r.stdout == text + "\n", r.stderr
    assert r.stderr.startswith(f"prompt: {n} tokens "), r.stderr


LONG = "hello" + " hello" * 300   # 301 tokens of the Llama 3 tokenizer


def test_the_context_error_says_how_to_get_a_longer_context(model_dir, tmp_path):
    # The model was trained for 256 tokens, the prompt is 301. Below that, a longer --ctx is the way out; at
    # it, --ctx N --force-ctx (or a shorter prompt) is.
    for argv, way in [(["generate", LONG, "--ctx", "64"], "--ctx N, up to the 256"),
                      (["generate", LONG], "--ctx N --force-ctx"),
                      (["trace", LONG, "-o", str(tmp_path / "t.npz"), "--ctx", "64"], "up to the 256")]:
        r = run(*argv[:1], "-m", model_dir, *argv[1:], "--raw" if argv[0] == "generate" else "--no-scores")
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "exceed" in r.stderr and "give a shorter prompt" in r.stderr and way in r.stderr, r.stderr
    # ...and it is one: the prompt of 2000 x's runs with the context it suggests
    r = run("generate", "-m", model_dir, LONG, "--raw", "--ctx", "512", "--force-ctx", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr


def test_golden_takes_the_prompt_as_trace_and_generate_do(model_dir, tmp_path):
    for i, argv in enumerate([["Once upon a time"], ["--prompt", "Once upon a time"]]):
        r = run("golden", "-m", model_dir, *argv, "-o", str(tmp_path / str(i)), "--max-new-tokens", "2")
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / str(i) / "golden.json").read_text())["prompt"] == "Once upon a time"
    r = run("golden", "-m", model_dir, "a", "--prompt", "b", "-o", str(tmp_path / "2"))
    assert r.returncode == 1 and "give the prompt once" in r.stderr and not (tmp_path / "2").exists()


def test_info_without_a_path_describes_the_default_model(model_dir, monkeypatch, capsys):
    from npllama import cli
    from npllama.cli import convert
    monkeypatch.setattr(convert, "default_model", lambda: model_dir)   # as the hub would give it
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert '"vocab_size": 128256' in out and "tokenizer: " in out and "trained context: 256 tokens" in out


# Run in a fresh interpreter (the thread counts are process-wide): each -t given, then none
# with the machine's idle cores made 1; after each, our count and OpenBLAS's as threadpoolctl
# (which finds and asks the library its own way) reads it.
THREADS_PROBE = """
import json, sys, threadpoolctl
from npllama import cli
from npllama.model import parallel
def counts():
    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
    return [parallel.threads(), blas]
out = {"found": bool(parallel.openblas())}
for t in sys.argv[2:]:
    assert cli.main(["generate", "-m", sys.argv[1], "hi", "--raw", "--max-new-tokens", "1", "-t", t]) == 0
    out[t] = counts()
parallel.idle_cores = lambda: 1
assert cli.main(["generate", "-m", sys.argv[1], "hi", "--raw", "--max-new-tokens", "1"]) == 0
out["default"] = counts()
print(json.dumps(out))
"""


def test_threads_set_ours_and_openblas_count(model_dir):
    pytest.importorskip("threadpoolctl")
    counts = ["2", "1"] if (os.cpu_count() or 1) >= 2 else ["1"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}   # BLAS starts at 2: -t 1 must bring it down
    r = subprocess.run([sys.executable, "-c", THREADS_PROBE, model_dir, *counts], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    if not got.pop("found"):
        pytest.skip("numpy's BLAS here is not an OpenBLAS whose thread count can be set")
    assert got == {**{t: [int(t), [int(t)]] for t in counts}, "default": [1, [1]]}


def test_default_threads_are_the_idle_cores(monkeypatch):
    from npllama.model import parallel
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    for load, idle in [(0.0, 4), (1.2, 3), (2.6, 1), (3.6, 1), (40.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert parallel.idle_cores() == idle, load
