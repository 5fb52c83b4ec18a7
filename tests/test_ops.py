"""Properties of each operation (hypothesis), and torch bf16 agreement op by op."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from npllama import bf16, ops
from oracles import meta_reference

SEEDS = st.integers(0, 2**31 - 1)


def rng_normal(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# fp32 comparisons: a handful of float32 roundings separate two correct answers, so
# 1e-5 relative (~80 float32 ulps) leaves room for summation order and nothing else.
RTOL = 1e-5


@settings(max_examples=50, deadline=None)
@given(SEEDS, st.sampled_from([8, 16, 64, 128]), st.floats(1e-3, 1e3))
def test_rms_norm_is_scale_invariant(seed, dim, scale):
    x = rng_normal(seed, (3, dim))
    w = rng_normal(seed + 1, (dim,))
    a = ops.rms_norm(x, w, eps=0.0)
    b = ops.rms_norm(x * np.float32(scale), w, eps=0.0)
    np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-6)
    # and its output has unit RMS before the weight
    one = ops.rms_norm(x, np.ones(dim, np.float32), eps=0.0)
    np.testing.assert_allclose(np.sqrt(np.mean(one**2, axis=-1)), 1.0, rtol=RTOL)


@settings(max_examples=50, deadline=None)
@given(SEEDS, st.sampled_from([16, 32, 64, 128]), st.integers(1, 40))
def test_rope_preserves_pair_norms_and_is_identity_at_zero(seed, head_dim, T):
    x = rng_normal(seed, (1, T, 2, head_dim))
    fc = ops.precompute_freqs_cis(head_dim, T, 10000.0)
    y = ops.apply_rotary_emb(x, fc)
    pair_norm = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=RTOL, atol=1e-6)
    assert np.array_equal(y[:, 0], x[:, 0])  # cos 0 = 1, sin 0 = 0 exactly


@settings(max_examples=50, deadline=None)
@given(SEEDS, st.sampled_from([16, 64, 128]), st.integers(0, 200), st.integers(0, 200), st.integers(0, 30))
def test_rope_score_depends_only_on_position_difference(seed, head_dim, m, n, shift):
    fc = ops.precompute_freqs_cis(head_dim, 256, 10000.0)
    q = rng_normal(seed, (1, 1, 1, head_dim))
    k = rng_normal(seed + 1, (1, 1, 1, head_dim))
    rot = lambda x, p: ops.apply_rotary_emb(x, fc[p:p + 1])
    s1 = float(np.sum(rot(q, m) * rot(k, n), dtype=np.float64))
    s2 = float(np.sum(rot(q, m + shift) * rot(k, n + shift), dtype=np.float64))
    # float32 angles t*freq lose ~t*2^-24 rad; at t <= 230 that is ~1e-5 of |q||k|.
    assert abs(s1 - s2) <= 1e-4 * np.linalg.norm(q) * np.linalg.norm(k)


def test_rope_pairs_are_interleaved():
    # Meta's layout: (x0, x1) is the first complex number, rotated at the highest frequency.
    x = np.zeros((1, 2, 1, 4), np.float32)
    x[..., 0] = 1.0
    fc = ops.precompute_freqs_cis(4, 2, 10000.0)
    y = ops.apply_rotary_emb(x, fc)
    np.testing.assert_allclose(y[0, 1, 0], [math.cos(1.0), math.sin(1.0), 0, 0], rtol=1e-6, atol=1e-7)


def test_rope_scaling_keeps_high_frequencies_and_slows_low_ones():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    plain = ops.rope_frequencies(128, 500000.0)
    scaled = ops.rope_frequencies(128, 500000.0, scaling)
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    assert np.array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-7)
    mid = ~high & ~low
    assert np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_rope_frequencies_match_hf_llama3_rope(factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope)
    hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = ops.rope_frequencies(64, 500000.0, dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192))
    # HF blends in float32 in the same order as Meta (and us): bit for bit.
    assert np.array_equal(ours, hf.numpy())


def test_freqs_cis_match_meta_reference():
    meta = meta_reference()
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    meta_freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    # The frequencies are float32 computations in the same order: bit for bit.
    assert np.array_equal(ops.rope_frequencies(128, 500000.0), meta_freqs.numpy())
    assert np.array_equal(ops.rope_frequencies(128, 500000.0, scaling), meta.apply_scaling(meta_freqs).numpy())
    ref = meta.precompute_freqs_cis(128, 4096, 500000.0, use_scaled=True).numpy()
    ours = ops.precompute_freqs_cis(128, 4096, 500000.0, scaling)
    # Same float32 angles; cos/sin by two libms differ by at most 1 ulp of 1 (6e-8): allow 2.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2.4e-7)


@settings(max_examples=50, deadline=None)
@given(SEEDS, st.integers(1, 12), st.integers(0, 12), st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 2)]))
def test_softmax_rows_sum_to_one_and_mask_is_exact(seed, T, start_pos, heads):
    n_heads, n_kv = heads
    S = start_pos + T
    q = rng_normal(seed, (1, T, n_heads, 16), 3.0)
    k = rng_normal(seed + 1, (1, S, n_kv, 16), 3.0)
    v = rng_normal(seed + 2, (1, S, n_kv, 16))
    tr = {}
    ops.attention(q, k, v, start_pos, trace=tr)
    p = tr["probs"][0]                                   # (n_heads, T, S)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=RTOL)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(p[:, :, start_pos:][:, future] == 0.0)
    assert np.all(np.isneginf(tr["scores"][0][:, :, start_pos:][:, future]))


@settings(max_examples=30, deadline=None)
@given(SEEDS, st.integers(1, 10), st.sampled_from([1, 2, 4, 8]))
def test_gqa_equals_multihead_with_repeated_kv(seed, T, n_rep):
    n_kv = 2
    q = rng_normal(seed, (2, T, n_kv * n_rep, 16))
    k = rng_normal(seed + 1, (2, T, n_kv, 16))
    v = rng_normal(seed + 2, (2, T, n_kv, 16))
    gqa = ops.attention(q, k, v, 0)
    # Meta's repeat_kv: query head h reads kv head h // n_rep
    mha = ops.attention(q, np.repeat(k, n_rep, axis=2), np.repeat(v, n_rep, axis=2), 0)
    np.testing.assert_allclose(gqa, mha, rtol=RTOL, atol=1e-6)


def test_attention_matches_torch_sdpa_fp32():
    q = rng_normal(0, (2, 9, 8, 32))
    k = rng_normal(1, (2, 9, 2, 32))
    v = rng_normal(2, (2, 9, 2, 32))
    ours = ops.attention(q, k, v, 0)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).reshape(2, 9, -1).numpy(), rtol=RTOL, atol=1e-6)


def test_silu_matches_torch_and_is_finite_at_extremes():
    x = np.array([-1000.0, -100.0, -1.0, 0.0, 1.0, 100.0, 1000.0], np.float32)
    np.testing.assert_allclose(ops.silu(x), F.silu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=0)
    x = rng_normal(0, (1000,), 5.0)
    np.testing.assert_allclose(ops.silu(x), F.silu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-7)


# --- bf16 numerics, op by op against torch bf16 -------------------------------------------
# With identical bf16 inputs, every op except the matmuls is bit-identical to torch. The
# matmuls accumulate in float32 in a different order (OpenBLAS here, oneDNN in torch), so a
# float32 sum that lands within ~1e-7 of a bf16 rounding boundary can round the other way:
# measured at ~1e-4 of outputs, each off by exactly 1 bf16 ulp.

def tb(x):
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)


def bf16_ulp_diff(a, b):
    ai = bf16.to_bits(a).astype(np.int32)
    bi = bf16.to_bits(b).astype(np.int32)
    to_ordered = lambda i: np.where(i & 0x8000, 0x8000 - i, i)
    return np.abs(to_ordered(ai) - to_ordered(bi))


def test_bf16_rms_norm_bit_exact():
    x, w = bf16.round(rng_normal(0, (5, 64), 3)), bf16.round(rng_normal(1, (64,)))
    tx = tb(x)
    ref = (tx.float() * torch.rsqrt(tx.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(tx) * tb(w)
    ours = ops.rms_norm(x, w, 1e-5, bf16.round)
    # rsqrt vs 1/sqrt differ by <= 1 float32 ulp before the bf16 rounding: allow 1 bf16 ulp
    # on a rare element, require the rest identical.
    d = bf16_ulp_diff(ours, ref.float().numpy())
    assert d.max() <= 1 and (d == 0).mean() > 0.99


def test_bf16_rope_and_attention_bit_exact():
    meta_rope = meta_reference().apply_rotary_emb
    T, H, KV, D = 12, 4, 2, 32
    xq, xk, xv = (bf16.round(rng_normal(s, (1, T, h, D))) for s, h in ((0, H), (1, KV), (2, KV)))
    fc = ops.precompute_freqs_cis(D, T, 10000.0)
    tq, tk = meta_rope(tb(xq), tb(xk), torch.from_numpy(fc))
    q, k = ops.apply_rotary_emb(xq, fc, bf16.round), ops.apply_rotary_emb(xk, fc, bf16.round)
    assert np.array_equal(q, tq.float().numpy()) and np.array_equal(k, tk.float().numpy())
    # Meta's attention core, in bf16, with repeat_kv and the additive -inf mask.
    keys, values = tk.repeat_interleave(H // KV, dim=2).transpose(1, 2), tb(xv).repeat_interleave(H // KV, 2).transpose(1, 2)
    scores = torch.matmul(tq.transpose(1, 2), keys.transpose(2, 3)) / math.sqrt(D)
    scores = scores + torch.triu(torch.full((T, T), float("-inf")), 1).type_as(scores)
    probs = F.softmax(scores.float(), dim=-1).type_as(tq)
    ref = torch.matmul(probs, values).transpose(1, 2).reshape(1, T, -1)
    tr = {}
    ours = ops.attention(q, k, xv, 0, bf16.round, tr)
    assert bf16_ulp_diff(tr["probs"], probs.float().numpy()).max() <= 1
    assert bf16_ulp_diff(ours, ref.float().numpy()).max() <= 1
    assert (ours == ref.float().numpy()).mean() > 0.99


def test_bf16_feed_forward_within_one_ulp():
    x = bf16.round(rng_normal(0, (7, 64)))
    w1, w3 = (bf16.round(rng_normal(s, (96, 64), 0.125)) for s in (1, 3))
    w2 = bf16.round(rng_normal(2, (64, 96), 0.1))
    ref = F.linear(F.silu(F.linear(tb(x), tb(w1))) * F.linear(tb(x), tb(w3)), tb(w2))
    ours = ops.feed_forward(x, w1, w2, w3, bf16.round)
    d = bf16_ulp_diff(ours, ref.float().numpy())
    assert d.max() <= 2 and (d == 0).mean() > 0.98
