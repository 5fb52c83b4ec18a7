"""Generation: greedy against HF's logits, sampling against Meta's sample_top_p, stops,
streaming, batching, cache reuse, and argument errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from npllama import Transformer
from npllama.run.generate import Generator, SamplingParams, sample, top_k_filter, top_p_filter
from oracles import byte_tokenizer, hf_model, meta_function, random_weights, small_args

pytestmark = pytest.mark.torch

ARGS = small_args(dim=128, n_heads=4, n_kv_heads=2, vocab_size=260, max_seq_len=128)
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def weights():
    w = random_weights(ARGS, seed=7)
    # Control tokens get zero logits, so greedy runs never stop early on a random model.
    w["output.weight"][256:] = 0.0
    return w


def generator(weights, **kw):
    return Generator(Transformer(ARGS, weights, **kw), TOK)


PROMPT = [256] + list(b"Once upon a time")


def test_greedy_equals_argmax_loop_over_hf_logits(weights):
    res = generator(weights).generate(PROMPT, max_new_tokens=40, logprobs=True)
    assert len(res.tokens) == 40 and res.stop_reason == "length"
    hf = hf_model(ARGS, weights)
    seq = list(PROMPT)
    expected, expected_lp = [], []
    with torch.no_grad():
        for _ in range(40):
            logits = hf(torch.tensor([seq])).logits[0, -1].double()
            nxt = int(torch.argmax(logits))
            expected.append(nxt)
            expected_lp.append(float(torch.log_softmax(logits, -1)[nxt]))
            seq.append(nxt)
    assert res.tokens == expected
    # log-probabilities from float32 logits that agree to ~1e-6: 1e-4 absolute is generous.
    np.testing.assert_allclose(res.logprobs, expected_lp, atol=1e-4)
    assert res.text == TOK.decode(res.tokens)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=2, max_size=50), st.floats(0.05, 1.0))
def test_top_p_is_metas_sample_top_p(logits, p):
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()
    meta_sample_top_p = meta_function("llama_models.llama3.generation", "sample_top_p")
    captured = {}
    real = torch.multinomial

    def spy(x, num_samples):
        captured["probs"] = x.clone()
        return real(x, num_samples)
    torch.multinomial = spy
    try:
        idx = meta_sample_top_p(torch.tensor(probs)[None], p)
    finally:
        torch.multinomial = real
    order = torch.sort(torch.tensor(probs), descending=True).indices.numpy()
    meta_probs = np.zeros_like(probs)
    meta_probs[order] = captured["probs"][0].numpy()
    ours = top_p_filter(probs, p)
    # Which of several tokens with tied probabilities is kept at the cut depends on the sort
    # (torch's is not stable, ours is): compare the mass kept at each probability value.
    for v in np.unique(probs):
        np.testing.assert_allclose(ours[probs == v].sum(), meta_probs[probs == v].sum(), rtol=1e-12, atol=1e-15)
    assert ours.sum() == pytest.approx(1.0) and np.count_nonzero(ours) == np.count_nonzero(meta_probs)
    assert probs[int(idx)] in probs[ours > 0]


def test_temperature_sampling_follows_the_distribution():
    logits = np.array([2.0, 1.0, 0.0, -1.0, 3.0], np.float32)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.7)
    draws = np.bincount([sample(logits, params, rng) for _ in range(20000)], minlength=5) / 20000
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64) / 0.7, dim=-1).numpy()
    # 20000 draws: standard error <= 0.0036 per bin; 0.015 is > 4 of them.
    np.testing.assert_allclose(draws, expected, atol=0.015)


def test_top_k_only_samples_the_k_most_likely():
    logits = np.arange(10, dtype=np.float32)
    rng = np.random.default_rng(1)
    got = {sample(logits, SamplingParams(temperature=5.0, top_k=3), rng) for _ in range(500)}
    assert got == {7, 8, 9}
    assert np.array_equal(top_k_filter(logits, 0), logits)


def test_seed_makes_sampling_reproducible(weights):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    a = generator(weights).generate(PROMPT, 20, p).tokens
    b = generator(weights).generate(PROMPT, 20, p).tokens
    c = generator(weights).generate(PROMPT, 20, SamplingParams(temperature=1.0, top_p=0.9, seed=43)).tokens
    assert a == b and a != c


def test_stops_on_stop_string_and_stop_token(weights):
    free = generator(weights).generate(PROMPT, 12)
    stop = free.text[3:5]
    r = generator(weights).generate(PROMPT, 12, stop_strings=[stop])
    assert r.stop_reason == "stop_string" and r.text == free.text[:free.text.find(stop)]
    # Make <|eot_id|> the argmax after 5 generated tokens: give its output row the direction
    # of that step's final hidden state, scaled past the largest logit.
    tr = {}
    logits = Transformer(ARGS, weights).forward(np.array(PROMPT + free.tokens[:5]), trace=tr)[-1]
    h = tr["norm"][-1]
    w = dict(weights, **{"output.weight": weights["output.weight"].copy()})
    w["output.weight"][TOK.special_tokens["<|eot_id|>"]] = h * (2 * logits.max() / float(h @ h))
    r = Generator(Transformer(ARGS, w), TOK).generate(PROMPT, 12)
    assert r.stop_reason == "stop_token" and r.tokens == free.tokens[:5]


def test_stream_pieces_concatenate_to_text(weights):
    g = generator(weights)
    stream = g.stream(PROMPT, 25)
    pieces = [p for p, _, _ in stream]
    assert "".join(pieces) == stream.result.text == TOK.decode(stream.result.tokens)


def test_batched_equals_one_by_one(weights):
    prompts = [PROMPT, [256] + list(b"Hi"), [256] + list(b"A much longer prompt than the others")]
    one = [generator(weights).generate(p, 15, logprobs=True) for p in prompts]
    batch = generator(weights, max_batch_size=3).generate_batch(prompts, 15, logprobs=True)
    for a, b in zip(one, batch):
        assert a.tokens == b.tokens and a.text == b.text
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    # sampling: row i draws from its own generator seeded seed + i
    batch = generator(weights, max_batch_size=3).generate_batch(prompts, 15, SamplingParams(temperature=1.0, seed=3))
    for i, p in enumerate(prompts):
        assert batch[i].tokens == generator(weights).generate(p, 15, SamplingParams(temperature=1.0, seed=3 + i)).tokens


def test_prefix_reuse_prefills_only_the_new_tokens(weights):
    g = generator(weights)
    first = g.generate(PROMPT, 10)
    turn2 = PROMPT + first.tokens + list(b" and then")
    before = g.timings.prompt_tokens
    second = g.generate(turn2, 10)
    # The last generated token was never fed (nothing came after it), so it is new too.
    assert g.timings.prompt_tokens - before == 1 + len(b" and then")
    assert second.tokens == generator(weights).generate(turn2, 10).tokens


def test_edge_cases_and_errors(weights):
    g = generator(weights)
    r = g.generate(PROMPT, 0)
    assert r.tokens == [] and r.text == ""
    with pytest.raises(ValueError, match="empty prompt"):
        g.generate([], 5)
    with pytest.raises(ValueError, match="exceeds the context of 128"):
        g.generate([1] * 129, 5)
    r = g.generate([1] * 120, 50)  # runs into the context: stops there
    # Prompt and output together fill the 128 positions, as in Meta's generate
    # (total_len = min(max_seq_len, prompt + max_gen_len)).
    assert r.stop_reason == "length" and len(r.tokens) == 8
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5),
                dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        g.generate(PROMPT, 5, stop_strings=[""])
    with pytest.raises(ValueError, match="max_batch_size"):
        g.generate_batch([PROMPT, PROMPT], 3)
