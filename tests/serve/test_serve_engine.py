"""Continuous batching (npllama/run/batching.py): a batched step with each row at its own
position equals each sequence alone, and a request's tokens in any concurrent mix equal the
tokens npllama's Generator gives it alone."""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from npllama import Transformer
from npllama.run.generate import Generator, SamplingParams
from npllama.errors import StageError
from npllama.run.batching import Broken, Engine, QueueFull, Request
from oracles import byte_tokenizer, random_weights, small_args

ARGS = small_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=260, max_seq_len=64)
TOK = byte_tokenizer()
SLOTS = 4
# float32 logits from a GEMM row and a GEMV of the same vectors differ only in summation
# order: a few ulps of values of magnitude ~10, so 1e-4 absolute bounds the logits and
# their log-softmax with a wide margin (measured differences: see test_logprobs_measured).
TOL = 1e-4


@pytest.fixture(scope="module")
def weights():
    w = random_weights(ARGS, seed=3)
    w["output.weight"][256:] = 0.0   # control tokens (stop ids) rarely win: runs reach max_tokens
    return w


@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=SLOTS),
       starts=st.lists(st.integers(0, 30), min_size=SLOTS, max_size=SLOTS), data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_batched_step_equals_each_row_alone(weights, lengths, starts, data):
    batched = Transformer(ARGS, weights, max_batch_size=SLOTS)
    rows = data.draw(st.permutations(range(SLOTS)))[:len(lengths)]
    rng = np.random.default_rng(len(lengths))
    seqs = [rng.integers(0, 256, starts[i] + 1) for i in range(len(lengths))]
    expected = []
    for seq, row in zip(seqs, rows):
        alone = Transformer(ARGS, weights)
        alone.forward(seq[:-1], 0) if len(seq) > 1 else None
        expected.append(alone.forward(seq[-1:], len(seq) - 1)[-1])
        if len(seq) > 1:
            batched.forward_rows(seq[None, :-1], [0], [row])
    got = batched.forward_rows(np.array([[s[-1]] for s in seqs]), [len(s) - 1 for s in seqs], rows)
    np.testing.assert_allclose(got, np.array(expected), rtol=0, atol=TOL)


def alone(weights, req):
    g = Generator(Transformer(ARGS, weights), TOK)
    return g.generate(req.prompt, req.max_tokens, req.sampling, logprobs=True)


def run_mix(engine, arrivals):
    """arrivals: (step, Request); submits each at its step, steps until all are done."""
    pending, step = sorted(arrivals, key=lambda a: a[0]), 0
    while pending or engine.n_active():
        while pending and pending[0][0] <= step:
            engine.submit(pending.pop(0)[1])
        engine.step()
        step += 1
        assert step < 1000


request = st.builds(lambda n, m, t, seed, shared: Request(
    ([256] + list(b"You are kind.") if shared else [256]) + list(np.random.default_rng(seed).integers(0, 256, n)),
    m, SamplingParams(temperature=t, top_p=0.9 if t else 1.0, seed=seed)),
    st.integers(1, 12), st.integers(0, 12), st.sampled_from([0.0, 0.8]), st.integers(0, 2**31), st.booleans())


@given(mix=st.lists(st.tuples(st.integers(0, 15), request), min_size=1, max_size=7),
       prefill=st.sampled_from([1, 5, 64]))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_tokens_in_any_mix_equal_tokens_alone(weights, mix, prefill):
    """prefill: prompt tokens fed per step (prompts chunked across steps, or whole)."""
    engine = Engine(Transformer(ARGS, weights, max_batch_size=SLOTS), TOK.stop_ids, prefill_per_step=prefill)
    run_mix(engine, mix)
    for _, req in mix:
        ref = alone(weights, req)
        assert req.tokens == ref.tokens
        np.testing.assert_allclose(req.logprobs, ref.logprobs, rtol=0, atol=TOL)
    assert engine.n_active() == 0 and not engine.active


def test_logprobs_measured(weights, capsys):
    """Not a pass/fail claim on bits: prints how far batched logprobs are from alone ones."""
    engine = Engine(Transformer(ARGS, weights, max_batch_size=SLOTS), TOK.stop_ids)
    reqs = [Request([256] + list(b"abc"[:i + 1]), 20) for i in range(SLOTS)]
    run_mix(engine, [(i, r) for i, r in enumerate(reqs)])
    diffs = [np.abs(np.array(r.logprobs) - alone(weights, r).logprobs).max() for r in reqs]
    with capsys.disabled():
        print(f"\nbatched vs alone logprobs: max |diff| {max(diffs):.3g}, bit-identical: {max(diffs) == 0}")
    assert max(diffs) <= TOL


def test_cancel_frees_slot_and_queue_bound(weights):
    engine = Engine(Transformer(ARGS, weights, max_batch_size=1), TOK.stop_ids, max_queue=1)
    a = engine.submit(Request([256, 1, 2], 30))
    engine.step()
    b = engine.submit(Request([256, 3], 5))   # the one slot is a's: b waits, the queue of 1 is full
    with pytest.raises(QueueFull):
        engine.submit(Request([256, 4], 5))
    engine.cancel(a)
    while engine.n_active():
        engine.step()
    assert a.finish_reason == "cancelled" and b.finish_reason == "length" and len(b.tokens) == 5
    assert not engine.active and not engine.waiting


def test_shared_prefix_is_prefilled_once(weights):
    model = Transformer(ARGS, weights, max_batch_size=SLOTS)
    fed = []
    forward_rows = model.forward_rows
    model.forward_rows = lambda tokens, *a, **k: (fed.append(np.asarray(tokens).shape), forward_rows(tokens, *a, **k))[1]
    engine = Engine(model, TOK.stop_ids)
    system = [256] + list(b"You are a helpful assistant.")
    a, b = Request(system + list(b"Hi"), 4), Request(system + list(b"Yo!"), 4)
    run_mix(engine, [(0, a), (2, b)])
    prefills = [s for s in fed if s[1] > 1]
    assert prefills == [(1, len(a.prompt)), (1, 3)]       # b fed only its own 3 tokens
    assert b.tokens == alone(weights, b).tokens


def test_npllama_imports_and_serve_says_what_to_install_without_the_extra():
    import subprocess
    import sys
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import npllama, npllama.cli, npllama.run.batching\n"
            "sys.exit(npllama.cli.main(['serve']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        "npllama: npllama serve needs FastAPI and uvicorn: pip install 'npllama[serve]'")


class InOrder:
    """A Transformer with a Pipeline's submit_rows/collect and `stages`: work runs at
    submission, in submission order, as a pipeline's stages run their tasks; collect hands the
    logits back later. Counts the microbatches in flight, to see that they overlap."""

    def __init__(self, model, n_stages):
        self.model, self.stages, self.flying, self.most = model, range(n_stages), 0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def submit_rows(self, tokens, start_pos, rows):
        self.flying += 1
        self.most = max(self.most, self.flying)
        return self.model.forward_rows(tokens, start_pos, rows)

    def collect(self, handle):
        self.flying -= 1
        return handle


@given(mix=st.lists(st.tuples(st.integers(0, 6), request), min_size=1, max_size=6), n_stages=st.integers(2, 3))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_microbatches_in_flight_give_the_one_machine_tokens(weights, mix, n_stages):
    """The engine over a pipeline of n stages (up to n microbatches in flight) gives every
    request the tokens the one-machine engine gives it in the same mix."""
    copy = lambda: [(t, Request(r.prompt, r.max_tokens, r.sampling)) for t, r in mix]  # noqa: E731
    one, piped = copy(), copy()
    run_mix(Engine(Transformer(ARGS, weights, max_batch_size=SLOTS), TOK.stop_ids), one)
    model = InOrder(Transformer(ARGS, weights, max_batch_size=SLOTS), n_stages)
    engine = Engine(model, TOK.stop_ids)
    run_mix(engine, piped)
    for (_, a), (_, b) in zip(one, piped):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=TOL)
    assert model.flying == 0 and not engine.inflight and not engine.active


def watch_inflight(engine):
    """Records on engine the most decode microbatches (most_decoding) and prompt chunks
    (most_prefilling) it had in flight at once."""
    engine.most_decoding = engine.most_prefilling = 0
    collect = engine._collect

    def watched(waiting_only):
        decoding = sum(d for *_, d in engine.inflight)
        engine.most_decoding = max(engine.most_decoding, decoding)
        engine.most_prefilling = max(engine.most_prefilling, len(engine.inflight) - decoding)
        return collect(waiting_only)
    engine._collect = watched


def test_requests_decoding_together_are_split_into_microbatches(weights):
    model = InOrder(Transformer(ARGS, weights, max_batch_size=SLOTS), 2)
    engine = Engine(model, TOK.stop_ids)
    watch_inflight(engine)
    reqs = [Request([256] + list(b"abcd"[:i + 1]), 8) for i in range(SLOTS)]   # greedy: never a stop id here
    run_mix(engine, [(0, r) for r in reqs])
    assert engine.most_decoding == 2 and all(len(r.tokens) == 8 for r in reqs)


def test_microbatches_are_no_smaller_than_asked(weights):
    """microbatch_rows 2: four decoding requests over three stages are two microbatches, not three."""
    model = InOrder(Transformer(ARGS, weights, max_batch_size=SLOTS), 3)
    engine = Engine(model, TOK.stop_ids, microbatch_rows=2)
    watch_inflight(engine)
    reqs = [Request([256] + list(b"abcd"[:i + 1]), 8) for i in range(SLOTS)]
    run_mix(engine, [(0, r) for r in reqs])
    assert engine.most_decoding == 2 and all(len(r.tokens) == 8 for r in reqs)


def test_prompts_go_through_the_pipeline_without_waiting_for_each_other(weights):
    """Two prompts arriving together are both in flight (stage 0 feeds the second while
    stage 1 feeds the first), fed in chunks, with the one-machine engine's tokens."""
    prompts = [[256] + list(b"The cat sat on a mat."), [256] + list(b"A long way home.")]
    one, piped = ([Request(p, 6) for p in prompts] for _ in range(2))
    run_mix(Engine(Transformer(ARGS, weights, max_batch_size=SLOTS), TOK.stop_ids, prefill_per_step=16),
            [(0, r) for r in one])
    model = InOrder(Transformer(ARGS, weights, max_batch_size=SLOTS), 2)
    engine = Engine(model, TOK.stop_ids, prefill_per_step=16)
    watch_inflight(engine)
    run_mix(engine, [(0, r) for r in piped])
    assert engine.most_prefilling >= 2 and model.flying == 0
    for a, b in zip(one, piped):
        assert a.tokens == b.tokens and len(b.tokens) == 6
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=TOL)


def test_a_failing_step_fails_every_request_and_refuses_new_ones(weights):
    model = InOrder(Transformer(ARGS, weights, max_batch_size=2), 2)
    engine = Engine(model, TOK.stop_ids)
    done = []
    reqs = [engine.submit(Request([256, i], 20, on_done=done.append)) for i in range(3)]
    engine.step()

    def dead(handle):
        raise StageError("stage 1 (layers 2..3) on node x died during a forward pass")
    model.collect = dead
    stop = threading.Event()
    stop.set()
    engine.run(stop)                      # returns: the failed step ended every request
    assert [r.finish_reason for r in reqs] == ["error"] * 3 and len(done) == 3
    assert all("stage 1" in r.error for r in reqs) and not engine.active and not engine.waiting
    with pytest.raises(Broken, match="stage 1 .* died"):
        engine.submit(Request([256], 2))


def test_a_long_prompt_does_not_stall_the_running_streams(weights):
    """While a 40-token prompt is fed 8 tokens a step, a request already decoding gets a
    token every step; the long one's tokens are still its tokens alone."""
    engine = Engine(Transformer(ARGS, weights, max_batch_size=2), TOK.stop_ids, prefill_per_step=8)
    running = engine.submit(Request([256, 7, 8], 20))
    engine.step()
    long = engine.submit(Request([256] + list(np.random.default_rng(1).integers(0, 256, 39)), 4))
    counts = []
    while not long.tokens:
        engine.step()
        counts.append(len(running.tokens))
    assert len(counts) == 5 and counts == list(range(counts[0], counts[0] + 5))   # 40 / 8 steps, one token each
    run_mix(engine, [])
    assert long.tokens == alone(weights, long).tokens and running.tokens == alone(weights, running).tokens
