"""npllama.distributed: the layers as pipeline stages on Ray give the one-process results bit
for bit (tiny models and the default model, 2 and 3 stages), and a stage that cannot open the
checkpoint, dies or does not answer is a one-line error naming it.

One local Ray runtime serves the whole module (2 CPUs, a 150 MB object store, no dashboard);
its processes are checked to be gone at the end."""
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npllama
from npllama.io import checkpoint, hub
from npllama.run import distributed
from npllama.inspect import perplexity as pp
from npllama.run.distributed import Pipeline, Stage, split_layers
from npllama.errors import CheckpointError, MissingDependencyError, StageError, UsageError
from npllama.run.generate import Generator
from npllama.model.model import Transformer
from npllama.text.tokenizer import chat_format, load as load_tokenizer
from npllama.model.weights import expected_shapes, held_names
from ray_cluster import MARK, wait_gone
from oracles import (byte_tokenizer, llama3_tokenizer_path, random_weights, small_args, write_byte_model,
                     write_random_model)

ARGS = small_args(n_layers=4, vocab_size=260, max_seq_len=64)   # byte_tokenizer's vocabulary
pytestmark = [pytest.mark.ray, pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_runtime():
    import ray
    tmp = tempfile.mkdtemp(prefix="npr")        # short: Ray's sockets live under it
    os.environ[MARK] = tmp
    try:
        distributed.connect("local", num_cpus=2, object_store_memory=150 * 2**20, _temp_dir=tmp)
    finally:
        del os.environ[MARK]                    # the runtime's processes have it; later tests' do not
    yield
    ray.shutdown()
    assert wait_gone(tmp) == []
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return write_random_model(str(tmp_path_factory.mktemp("untied") / "m"), ARGS, seed=1)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    from npllama.io.checkpoint import write_checkpoint
    w = random_weights(ARGS, seed=2, tied=True)
    path = str(tmp_path_factory.mktemp("tied") / "m")
    write_checkpoint(path, ARGS, iter(w.items()), 0, len(w), quiet=True)
    return path


TOKENS = np.random.default_rng(0).integers(0, ARGS.vocab_size, 9)


# --- splitting the layers (no Ray) ---------------------------------------------------------

def stage_bytes(args, nbytes, r):
    return sum(nbytes[n] for n in held_names(args, r, "output.weight" not in nbytes))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.data())
def test_split_layers_is_the_best_contiguous_split(n_layers, data):
    args = small_args(n_layers=n_layers)
    tied = data.draw(st.booleans())
    names = [n for n in expected_shapes(args) if not (tied and n == "output.weight")]
    nbytes = {n: data.draw(st.integers(0, 1000)) for n in names}   # any sizes, not just the real ones
    n_stages = data.draw(st.integers(1, n_layers))
    ranges = split_layers(args, nbytes, n_stages)
    assert len(ranges) == n_stages and ranges[0].start == 0 and ranges[-1].stop == n_layers
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:])) and all(len(r) > 0 for r in ranges)
    # every way to cut n_layers into n_stages contiguous parts, and the best of them
    best = min(max(stage_bytes(args, nbytes, range(a, b)) for a, b in zip((0,) + cuts, cuts + (n_layers,)))
               for cuts in itertools.combinations(range(1, n_layers), n_stages - 1))
    assert max(stage_bytes(args, nbytes, r) for r in ranges) == best


def test_split_layers_refuses_impossible_counts():
    args = small_args(n_layers=3)
    nbytes = {n: 1 for n in expected_shapes(args)}
    for bad in (0, 4, True, 1.5):
        with pytest.raises(UsageError, match="number of stages must be between 1 and the model's 3 layers"):
            split_layers(args, nbytes, bad)


@pytest.mark.parametrize("tied_head", [False, True])
def test_stages_hold_every_tensor_once_but_the_tied_embeddings(tied_head):
    args = small_args(n_layers=5)
    names = [n for n in expected_shapes(args) if not (tied_head and n == "output.weight")]
    parts = [held_names(args, r, tied_head) for r in (range(0, 2), range(2, 3), range(3, 5))]
    assert sorted(set(sum(parts, []))) == sorted(names)
    assert parts[0][0] == "tok_embeddings.weight" and parts[2][-2] == "norm.weight"
    assert parts[2][-1] == ("tok_embeddings.weight" if tied_head else "output.weight")
    counts = {n: sum(n in p for p in parts) for n in names}
    assert {n for n, c in counts.items() if c != 1} == ({"tok_embeddings.weight"} if tied_head else set())
    assert parts[1] == [n for n in names if n.startswith("layers.2.")]


def test_a_stage_model_holds_only_its_layers():
    w = random_weights(ARGS, seed=3)
    stage = Transformer(ARGS, w, layers=range(1, 3))
    assert sorted(stage.weights) == sorted(held_names(ARGS, range(1, 3), False))
    assert stage.cache_k.shape[0] == 2 and [b.layer_id for b in stage.layers] == [1, 2]
    with pytest.raises(UsageError, match="holds layers 1..2 of 4: a pipeline stage runs with forward_stage"):
        stage.forward(TOKENS)
    with pytest.raises(UsageError, match="layers 0..2 asked of a model holding layers 1..2"):
        stage.forward_layers(np.zeros((1, 2, ARGS.dim), np.float32), 0, 0, 3)
    with pytest.raises(UsageError, match="layers must be a range"):
        Transformer(ARGS, w, layers=range(2, 2))
    # a stage needs its own tensors, and only those
    del w["layers.2.feed_forward.w2.weight"], w["layers.0.attention.wq.weight"], w["output.weight"]
    Transformer(ARGS, w, layers=range(1, 2))
    with pytest.raises(npllama.WeightError, match="missing tensor layers.2.feed_forward.w2.weight"):
        Transformer(ARGS, w, layers=range(1, 3))


def test_a_stage_refuses_another_checkpoint_than_the_drivers(untied, tied):
    args, index = checkpoint.read_checked(tied)
    stage = Stage(untied, range(0, 2), "stage 0 (layers 0..1) on node n1")
    with pytest.raises(CheckpointError, match=r"^stage 0 \(layers 0..1\) on node n1: .*not the checkpoint the "
                                              "driver read"):
        stage.load(args.to_dict(), index, "float32", 64, 1, "auto")
    with pytest.raises(CheckpointError, match=r"^stage 0 \(layers 0..1\) on node n1: .*nowhere.*not a directory"):
        Stage(untied + "/nowhere", range(0, 2), "stage 0 (layers 0..1) on node n1").load(
            args.to_dict(), index, "float32", 64, 1, "auto")


def test_without_ray_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # import ray -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install .npllama\[ray\]."):
        distributed.connect("local")


# --- the pipeline on a local Ray runtime ---------------------------------------------------

def steps(model, batch=None):
    """Logits of a prefill (all positions), then three decode steps (last_only)."""
    toks = TOKENS if batch is None else np.stack([TOKENS, TOKENS[::-1]])
    out = [model.forward(toks[..., :6])]
    for pos in range(6, 9):
        out.append(model.forward(toks[..., pos:pos + 1], start_pos=pos, last_only=True))
    return out


# bfloat16 numerics hold the KV cache as bf16 bits; prefill_chunk 4 feeds the 6-token prefill
# through each stage's cache in two chunks.
@pytest.mark.parametrize("n_stages, dtype, head, chunk", [(2, "float32", "untied", 4), (3, "bfloat16", "tied", 4),
                                                          (3, "float32", "tied", 512)])
def test_pipeline_logits_are_one_process_logits(ray_runtime, request, n_stages, dtype, head, chunk):
    path = request.getfixturevalue(head)
    one = npllama.load(path, dtype=dtype, max_batch_size=2, prefill_chunk=chunk)
    with Pipeline(path, n_stages, dtype=dtype, max_batch_size=2, prefill_chunk=chunk) as pipe:
        assert pipe.max_seq_len == one.max_seq_len == ARGS.max_seq_len      # what fits: the trained context
        assert len(pipe.stages) == n_stages and [len(r) for r in pipe.ranges] != [] and pipe.ranges[-1].stop == 4
        for ours, theirs in zip(steps(pipe) + steps(pipe, batch=2), steps(one) + steps(one, batch=2)):
            assert ours.shape == theirs.shape and ours.dtype == np.float32
            assert np.array_equal(ours, theirs)           # the same numpy operations on the same data
            assert ours.flags.writeable
        # ...and a stage that ran other layers, or none, would not have been: the check can fail
        wrong = Transformer(ARGS, checkpoint.open_tensors(path), dtype=dtype)
        h = wrong.forward_layers(wrong.embed(TOKENS[None, :6]), 0, 0, 3)
        assert not np.allclose(wrong.head(h)[0], steps(one)[0])


def test_generator_and_traces_run_unchanged_over_a_pipeline(ray_runtime, untied):
    tok = byte_tokenizer()
    one = Generator(npllama.load(untied, max_batch_size=2), tok)
    with Pipeline(untied, 2, max_batch_size=2) as pipe:
        gen = Generator(pipe, tok)
        prompt = tok.encode("Hello", bos=True)
        a, b = gen.generate(prompt, 12, logprobs=True), one.generate(prompt, 12, logprobs=True)
        assert (a.tokens, a.logprobs, a.text) == (b.tokens, b.logprobs, b.text) and len(a.tokens) > 0
        # the cached prefix is reused over the pipeline as in one process (a chat's next turn)
        longer = prompt + a.tokens + tok.encode(" again")
        assert gen.generate(longer, 6, logprobs=True).logprobs == one.generate(longer, 6, logprobs=True).logprobs
        prompts = [tok.encode("ab", bos=True), tok.encode("a longer one", bos=True)]
        for x, y in zip(gen.generate_batch(prompts, 5, logprobs=True), one.generate_batch(prompts, 5, logprobs=True)):
            assert (x.tokens, x.logprobs) == (y.tokens, y.logprobs)
        for layers in (None, [1, 3]):
            ours, theirs = npllama.trace(pipe, TOKENS, layers), npllama.trace(one.model, TOKENS, layers)
            assert ours.keys() == theirs.keys() and len(ours) > 10
            for name in theirs:
                if name != "__meta__":
                    assert np.array_equal(ours[name], theirs[name]), name
            assert ours["__meta__"] == theirs["__meta__"]


def test_a_killed_stage_is_a_clear_error_not_a_hang(ray_runtime, untied):
    pipe = Pipeline(untied, 3, timeout=120)
    try:
        pipe.forward(TOKENS)
        os.kill(pipe.info[1]["pid"], signal.SIGKILL)
        # Found dead (ActorDiedError), not waited out: the 120 s timeout gives another message.
        with pytest.raises(StageError, match=r"^stage 1 \(layers \d\.\.\d\) on node .+ died during a forward pass "
                                             r"\(ActorDiedError: .*start the pipeline again"):
            pipe.forward(TOKENS[-1:], start_pos=len(TOKENS), last_only=True)
        with pytest.raises(StageError, match="stage 1 .* died"):
            pipe.forward(TOKENS)                # and it stays an error
    finally:
        pipe.close()


def test_a_stage_that_cannot_open_the_checkpoint_names_itself(ray_runtime, tmp_path):
    from npllama.io.checkpoint import write_checkpoint
    w = random_weights(ARGS, seed=4)
    path = str(tmp_path / "m")
    write_checkpoint(path, ARGS, iter(w.items()), 0, len(w), shard_bytes=20_000, quiet=True)
    index = checkpoint.read_index(path)
    last = index["tensors"]["output.weight"]["shard"]        # only the last stage maps it
    assert index["tensors"]["tok_embeddings.weight"]["shard"] != last
    with open(os.path.join(path, last), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=rf"^stage 1 \(layers \d\.\.3\) on node .+: .*{last}"):
        Pipeline(path, 2)


def test_a_stage_that_does_not_answer_in_time_is_named(ray_runtime, untied):
    with Pipeline(untied, 2, timeout=0) as pipe:                # no forward pass takes no time at all
        with pytest.raises(StageError, match=r"^stage \d \(layers .*\) on node .+ did not answer within 0 s"):
            pipe.forward(TOKENS)
        with pytest.raises(StageError, match="did not answer"):
            pipe.forward(TOKENS)


def test_perplexity_over_stages_is_one_process_perplexity(ray_runtime, untied):
    chunks = pp.split_chunks(np.random.default_rng(5).integers(0, ARGS.vocab_size, 70), 16)   # 4 chunks of 16
    one = npllama.load(untied, max_seq_len=16, max_batch_size=2)
    with Pipeline(untied, 2, max_seq_len=16, max_batch_size=2) as pipe:
        for n_batch in (None, 8, 32):      # a chunk a pass, a chunk in pieces, two chunks side by side as rows
            ours, theirs = list(pp.evaluate(pipe, chunks, 256, n_batch)), list(pp.evaluate(one, chunks, 256, n_batch))
            assert len(ours) == len(theirs) == 4
            for (a, ta, _), (b, tb, _) in zip(ours, theirs):
                assert a.shape == b.shape == (7, ARGS.vocab_size)
                assert np.array_equal(a, b) and np.array_equal(ta, tb)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    return write_byte_model(str(tmp_path_factory.mktemp("bytes") / "m"), ARGS, seed=6)


def test_cli_perplexity_over_stages_prints_one_process_figures(ray_runtime, byte_model, tmp_path, capsys):
    from npllama import cli
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    run = ["perplexity", "-m", byte_model, "-f", str(tmp_path / "t.txt"), "-c", "16", "--batch", "32", "--json"]
    figures = []
    for extra in ([], ["--ray", "local", "--stages", "2"]):     # in this process: joins the module's runtime
        assert cli.main(run + extra) == 0
        out, err = capsys.readouterr()
        lines = [json.loads(line) for line in out.splitlines()]
        lines[-1].pop("tokens_per_second")                       # a timing, not a figure
        figures.append(lines)
    assert "stage 1 (layers" in err and len(figures[0]) == 9   # 8 chunks of 16 tokens and the final estimate
    assert figures[1] == figures[0]                             # bitwise equal logits: equal figures


# --- the default model (SmolLM2) ------------------------------------------------------------

@pytest.fixture(scope="module")
def default_model():
    """SmolLM2's path, tokenizer, a chat prompt, and one process's prefill logits and greedy answer."""
    path = hub.default_model()
    tok = load_tokenizer(path)
    prompt = chat_format(tok, tok.default_system).encode_dialog_prompt(
        [{"role": "user", "content": "What is the capital of France?"}])
    one = npllama.load(path, max_seq_len=256)
    logits = one.forward(np.array(prompt))
    return path, tok, prompt, logits, Generator(one, tok).generate(prompt, 10, logprobs=True)


@pytest.mark.parametrize("n_stages", [2, 3])
def test_default_model_over_stages_gives_the_same_tokens_and_logits(ray_runtime, default_model, n_stages):
    path, tok, prompt, logits, answer = default_model
    with Pipeline(path, n_stages, max_seq_len=256) as pipe:
        assert pipe.ranges[0].start == 0 and pipe.ranges[-1].stop == 30 and len(pipe.ranges) == n_stages
        assert np.array_equal(pipe.forward(np.array(prompt)), logits)
        ours = Generator(pipe, tok).generate(prompt, 10, logprobs=True)
    assert ours.tokens == answer.tokens and ours.logprobs == answer.logprobs and "Paris" in ours.text


# --- the command line -------------------------------------------------------------------------

def test_cli_runs_over_ray_and_leaves_nothing_running(tmp_path):
    args = small_args(vocab_size=128256, max_seq_len=128, n_layers=3)    # Llama 3's tokenizer
    model = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    cmd = [sys.executable, "-m", "npllama", "generate", "-m", model, "Hello", "--raw", "--max-new-tokens", "8"]
    mark = tempfile.mkdtemp(prefix="npr")
    env = dict(os.environ, RAY_TMPDIR=mark, **{MARK: mark})
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    ray = subprocess.run(cmd + ["--ray", "local", "--stages", "3"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert plain.returncode == 0 and ray.returncode == 0, ray.stderr
    assert ray.stdout == plain.stdout and len(plain.stdout) > len("Hello")
    for i in range(3):
        assert f"stage {i} (layers {i}..{i}) on node " in ray.stderr
    assert wait_gone(mark) == []
    shutil.rmtree(mark, ignore_errors=True)


def test_cli_stages_needs_ray(capsys):
    from npllama import cli
    assert cli.main(["generate", "hi", "--stages", "2"]) == 1
    assert capsys.readouterr().err.strip() == "npllama: --stages goes with --ray (local, or the address of a " \
                                              "Ray cluster)"


def test_microbatches_in_flight_give_the_one_process_rows(ray_runtime, untied):
    """Two microbatches submitted before either is collected (both in the pipeline at once),
    after a shared-prefix copy: each row's logits are the one-process model's, bit for bit
    (the same numpy operations, stage by stage, on the same data)."""
    one = Transformer(ARGS, checkpoint.open_tensors(untied), max_seq_len=32, max_batch_size=4)
    a, b = (TOKENS[None, 5:7], [5], [1]), (np.array([[3], [4]]), [5, 5], [0, 2])
    with Pipeline(untied, 2, max_seq_len=32, max_batch_size=4) as pipe:
        for model in (one, pipe):
            model.forward_rows(TOKENS[None, :5], [0], [0], last_only=False)
            model.copy_rows(0, 1, 5)
            model.copy_rows(0, 2, 5)
        handles = [pipe.submit_rows(*a), pipe.submit_rows(*b)]
        ours = [pipe.collect(h) for h in handles]
    for got, args in zip(ours, (a, b)):
        assert np.array_equal(got, one.forward_rows(*args))
