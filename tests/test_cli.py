"""The npllama command line, driven as a user would: subprocesses, pipes, exit codes."""
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
    # with the cache, which holds the first prompt and every answer token fed back.
    held = prompt1 + answer.tokens
    shared = next((i for i, (a, b) in enumerate(zip(held, prompt2)) if a != b), min(len(held), len(prompt2)))
    assert shared >= len(prompt1)  # the first prompt at least: reuse has something to reuse
    assert (first, second) == (len(prompt1), len(prompt2) - shared)


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


@pytest.mark.parametrize("argv, name", [
    (["generate", "--seed", "-1", "--temperature", "0.5", "hi"], "--seed"),
    (["perplexity", "-c", "0", "-f", "nothing.txt"], "-c/--ctx-size"),
    (["perplexity", "-c", "-5", "-f", "nothing.txt"], "-c/--ctx-size"),
    (["generate", "--max-new-tokens", "-3", "hi"], "--max-new-tokens"),
])
def test_bad_numbers_are_refused_naming_the_argument_before_any_model_loads(argv, name, tmp_path):
    # NPLLAMA_CACHE points at an empty folder: had the model been opened first, the error
    # would be about fetching it, not about the argument.
    env = {**os.environ, "NPLLAMA_CACHE": str(tmp_path / "empty-cache")}
    r = subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"argument {name}:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "empty-cache").exists()
