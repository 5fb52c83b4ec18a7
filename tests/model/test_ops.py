"""Properties of each operation (hypothesis), and torch bf16 agreement op by op."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from npllama.model import bf16, ops
from oracles import hf_rope_frequencies, meta_attention, meta_function, meta_reference, meta_rope_frequencies

pytestmark = pytest.mark.torch

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


# --- RoPE frequencies and freqs_cis against Meta's and HF's torch code ----------------------

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
HEAD_DIMS = st.integers(8, 128).map(lambda n: 2 * n)                                  # 16..256, even
THETAS = st.one_of(st.sampled_from([1e4, 1e5, 5e5, 1e6]), st.floats(2.0, 1e7))
SCALINGS = st.builds(lambda factor, low, gap, old: dict(factor=factor, low_freq_factor=low, high_freq_factor=low + gap,
                                                        original_max_position_embeddings=old),
                     st.one_of(st.sampled_from([8.0, 32.0]), st.floats(1.0, 64.0)),
                     st.one_of(st.just(1.0), st.floats(0.25, 4.0)), st.one_of(st.just(3.0), st.floats(0.25, 8.0)),
                     st.one_of(st.just(8192), st.integers(64, 65536)))


def bf16_spacing(mag):
    """The gap between adjacent bf16 values at |mag| (8 significant bits)."""
    return np.spacing(mag.astype(np.float32)) * np.float32(2 ** 16)


def float32_ulps(a, b):
    """Elementwise distance in float32 steps (+0 and -0 are the same point)."""
    ordered = lambda x: np.where(x < 0, -(x & 0x7FFFFFFF), x)  # noqa: E731
    ia, ib = (ordered(np.asarray(v, np.float32).view(np.int32).astype(np.int64)) for v in (a, b))
    return np.abs(ia - ib)


def nearest_float32(x) -> np.float32:
    """An mpmath number rounded once to the nearest float32 (24-bit significand)."""
    import mpmath
    with mpmath.workprec(24):
        return np.float32(float(+x))


def correctly_rounded_powers(head_dim, theta) -> np.ndarray:
    """theta^(i / head_dim) for even i with torch's float32 operands (theta cast to float32,
    the exponent a float32 quotient), computed with 100 bits and rounded once."""
    import mpmath
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    with mpmath.workprec(100):
        return np.array([nearest_float32(mpmath.power(float(np.float32(theta)), float(e))) for e in exponents])


@settings(max_examples=60, deadline=None)
@given(HEAD_DIMS, THETAS)
def test_rope_frequencies_are_one_over_the_correctly_rounded_power(head_dim, theta):
    expected = np.float32(1) / correctly_rounded_powers(head_dim, theta)
    assert np.array_equal(ops.rope_frequencies(head_dim, theta), expected)


@settings(max_examples=40, deadline=None)
@given(HEAD_DIMS, THETAS, SCALINGS)
def test_rope_frequencies_match_meta_and_hf(head_dim, theta, scaling):
    ours = ops.rope_frequencies(head_dim, theta)
    ours_scaled = ops.rope_frequencies(head_dim, theta, scaling)
    # The scaling is Meta's apply_scaling bit for bit on the same frequencies, for any
    # parameters (Meta's function with its four constants set to them).
    meta_scaling = meta_function("llama_models.llama3.model", "apply_scaling",
                                 scale_factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                                 high_freq_factor=scaling["high_freq_factor"],
                                 old_context_len=scaling["original_max_position_embeddings"])
    assert np.array_equal(ours_scaled, meta_scaling(torch.from_numpy(ours)).numpy())
    # Meta's and HF's own frequencies start from torch's float32 pow, which is 1 ulp off the
    # correctly rounded power on some inputs (Sleef's or glibc's powf, by code path; ~1% of
    # them here): wherever it is correctly rounded, every frequency is theirs bit for bit.
    torch_power = (theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).numpy()  # their expression
    exact = torch_power == correctly_rounded_powers(head_dim, theta)
    assert exact.sum() > len(exact) // 2  # the comparison below has something to compare
    refs = [(ours, meta_rope_frequencies(head_dim, theta)), (ours, hf_rope_frequencies(head_dim, theta)),
            (ours_scaled, hf_rope_frequencies(head_dim, theta, scaling))]
    if scaling == LLAMA31:
        refs.append((ours_scaled, meta_rope_frequencies(head_dim, theta, use_scaled=True)))
    for got, ref in refs:
        assert np.array_equal(got[exact], ref[exact])
        if got is ours:
            # a power 1 ulp off makes a reciprocal up to 2 ulps off before rounding (the two
            # sit in binades of different spacing), 3 after; measured 2
            assert float32_ulps(got, ref).max() <= 3
        else:
            # ...which the blend's cancellation (1 - smooth, old/wavelen - low) magnifies:
            # measured up to 24 ulps (1.4e-6); the suite's float32 tolerance, 1e-5 relative.
            assert np.all(np.abs(got - ref) <= RTOL * ref)


RELEASED = [(128, 500000.0), (64, 500000.0), (64, 100000.0)]  # Llama 3 8B-405B and 3.2 3B, 3.2 1B, SmolLM2


@pytest.mark.parametrize("head_dim,theta,factor", [(h, t, f) for h, t in RELEASED for f in (None, 8.0, 32.0)])
def test_rope_frequencies_of_released_shapes_equal_meta_and_hf(head_dim, theta, factor):
    scaling = dict(LLAMA31, factor=factor) if factor else None
    ours = ops.rope_frequencies(head_dim, theta, scaling)
    assert np.array_equal(ours, hf_rope_frequencies(head_dim, theta, scaling))
    if factor in (None, 8.0):
        assert np.array_equal(ours, meta_rope_frequencies(head_dim, theta, use_scaled=factor is not None))


TORCH_POWERS = """
import torch
for head_dim, theta in %r:
    powers = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # Meta's and HF's expression
    print(torch.backends.cpu.get_cpu_capability(), powers.numpy().tobytes().hex())
""" % (RELEASED,)


CAPABILITIES = ["default", "avx2", "avx512"]  # torch's CPU code paths, lowest first


def best_torch_capability() -> str:
    """The code path torch picks on this machine unasked ("AVX2" -> "avx2")."""
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                       capture_output=True, text=True, timeout=300, check=True)
    best = r.stdout.strip().lower()
    return best if best in CAPABILITIES else "default"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_torch_pow_is_correctly_rounded_at_released_shapes_in_each_cpu_code_path(capability):
    # ...so that there the frequencies equal Meta's and HF's whichever kernels torch picks for
    # the machine (ATEN_CPU_CAPABILITY chooses). Forcing a path the CPU lacks dies of SIGILL
    # (an AVX2-only EPYC under "avx512"), so such a path is skipped: it cannot run here.
    if CAPABILITIES.index(capability) > CAPABILITIES.index(best_torch_capability()):
        pytest.skip(f"this CPU has no {capability} code path")
    r = subprocess.run([sys.executable, "-c", TORCH_POWERS], env=dict(os.environ, ATEN_CPU_CAPABILITY=capability),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")[:len(RELEASED)]
    for (head_dim, theta), line in zip(RELEASED, lines):
        used, powers = line.split()
        assert np.array_equal(np.frombuffer(bytes.fromhex(powers), np.float32),
                              correctly_rounded_powers(head_dim, theta)), (used, head_dim, theta)


@pytest.mark.parametrize("head_dim,theta,scaled,end", [(128, 500000.0, True, 131072), (64, 100000.0, False, 8192)])
def test_freqs_cis_match_metas(head_dim, theta, scaled, end):
    # Llama 3.1 to its longest context, SmolLM2 to its own
    import mpmath
    ref = meta_reference().precompute_freqs_cis(head_dim, end, theta, use_scaled=scaled).numpy()
    ours = ops.precompute_freqs_cis(head_dim, end, theta, LLAMA31 if scaled else None)
    # Same float32 angles t * freq; ours are their cos and sin correctly rounded, torch.polar's
    # (glibc's cosf/sinf) are within an ulp of that: measured identical on 98.8% of real and
    # imaginary parts (SmolLM2's: 98.8%), never more than 1 float32 ulp apart (6e-8).
    d = np.concatenate([float32_ulps(ours.real, ref.real), float32_ulps(ours.imag, ref.imag)])
    assert d.max() <= 1 and (d == 0).mean() > 0.97
    freqs = ops.rope_frequencies(head_dim, theta, LLAMA31 if scaled else None)
    rng = np.random.default_rng(0)
    with mpmath.workprec(100):
        for t, i in zip(rng.integers(0, end, 300), rng.integers(0, head_dim // 2, 300)):
            angle = float(np.float32(t) * freqs[i])
            assert ours[t, i].real == nearest_float32(mpmath.cos(angle))
            assert ours[t, i].imag == nearest_float32(mpmath.sin(angle))


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.one_of(st.integers(1, 16).map(lambda n: 16 * n), HEAD_DIMS), st.integers(1, 24), st.integers(1, 8),
       st.integers(0, 8000), st.sampled_from(["float32", "bfloat16"]))
def test_rope_matches_metas_apply_rotary_emb(seed, head_dim, T, n_heads, start, dtype):
    # Given Meta's own freqs_cis (identical inputs), RoPE is Meta's apply_rotary_emb bit for bit
    # when head_dim is a multiple of 16: torch then runs every pair through its vectorized
    # complex multiply. Otherwise torch's AVX2/AVX-512 kernels leave a row's last pairs to a
    # scalar loop compiled with a fused multiply-add: those can be 1 ulp apart.
    fc = meta_reference().precompute_freqs_cis(head_dim, start + T, 500000.0, use_scaled=True)[start:]
    x = rng_normal(seed, (2, T, n_heads, head_dim), 4.0)
    rnd, torch_dtype = (bf16.round, torch.bfloat16) if dtype == "bfloat16" else (ops.identity, torch.float32)
    x = rnd(x)
    tx = torch.from_numpy(x).to(torch_dtype)
    ref, _ = meta_reference().apply_rotary_emb(tx, tx, fc)
    ours = ops.apply_rotary_emb(x, fc.numpy(), rnd)
    ref = ref.float().numpy()
    if head_dim % 16 == 0:
        assert np.array_equal(ours, ref)
    else:
        # A fused multiply-add rounds a*c - b*d once where the plain product rounds a*c and b*d
        # first: the two differ by at most an ulp of the larger product, |a*c| <= |a| as |freqs_cis|
        # = 1, so by an ulp of the pair's larger input, plus the result's own rounding (one
        # float32 ulp, or in bf16 one bf16 ulp). Counting ulps of the result alone is wrong where
        # the pair's products cancel (a tiny result: 12 ulps of it were seen at head_dim 46).
        pairs = np.abs(x).reshape(*x.shape[:-1], head_dim // 2, 2).max(axis=-1, keepdims=True)
        scale = np.broadcast_to(pairs, (*x.shape[:-1], head_dim // 2, 2)).reshape(x.shape).astype(np.float32)
        mag = np.abs(ref).astype(np.float32)
        own = bf16_spacing(mag) if dtype == "bfloat16" else np.spacing(mag)
        assert np.all(np.abs(ours - ref) <= np.spacing(scale) + own)
        assert np.mean(ours == ref) > 0.9   # only a row's last pairs go through the scalar loop


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


def attend_both(attend, xq, xk, xv, chunks, rnd=ops.identity):
    """Meta's attention (oracles.meta_attention) and ours, chunk by chunk through the cache, on
    the same pre-RoPE q, k, v and Meta's freqs_cis. Yields, per chunk, {name: (ours, Meta's)}
    for the output (T, n_heads, head_dim), and the scores and probs (n_heads, T, S)."""
    fc = attend.freqs_cis
    keys = ops.apply_rotary_emb(xk, fc[:xk.shape[1]], rnd)
    start = 0
    for T in chunks:
        new = slice(start, start + T)
        ref_out, ref_probs, ref_scores = attend(xq[:, new], xk[:, new], xv[:, new], start)
        tr = {}
        out = ops.attention(ops.apply_rotary_emb(xq[:, new], fc[new], rnd), keys[:, :start + T], xv[:, :start + T],
                            start, rnd, tr)
        shape = (T, xq.shape[2], xq.shape[3])
        yield {"output": (out.reshape(shape), ref_out.reshape(shape)), "scores": (tr["scores"][0], ref_scores[0]),
               "probs": (tr["probs"][0], ref_probs[0])}
        start += T


@settings(max_examples=20, deadline=None)
@given(SEEDS, st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4, 8]), st.sampled_from([16, 32, 64, 128]),
       st.lists(st.integers(1, 12), min_size=1, max_size=3))
def test_gqa_and_mha_match_metas_attention(seed, n_kv_heads, n_rep, head_dim, chunks):
    # n_rep 1 is multi-head attention; query head h must read KV head h // n_rep, as Meta's
    # repeat_kv arranges. Prefill and cached chunks, with Meta's mask and cache.
    H, S = n_kv_heads * n_rep, sum(chunks)
    attend = meta_attention(H, n_kv_heads, head_dim)
    xq, xk, xv = (rng_normal(seed + i, (1, S, h, head_dim)) for i, h in enumerate((H, n_kv_heads, n_kv_heads)))
    for got in attend_both(attend, xq, xk, xv, chunks):
        (out, ref_out), (scores, ref_scores), (probs, ref_probs) = got["output"], got["scores"], got["probs"]
        assert np.abs(out - ref_out).max() <= RTOL * np.abs(ref_out).max()
        masked = np.isneginf(ref_scores)
        assert np.array_equal(np.isneginf(scores), masked)
        assert np.abs(scores[~masked] - ref_scores[~masked]).max() <= RTOL * np.abs(ref_scores[~masked]).max()
        assert np.abs(probs - ref_probs).max() <= RTOL  # probabilities: their scale is 1


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
# Each op rounds to bf16 where Meta's torch bf16 run does. Between two roundings the float32
# arithmetic is the same except in three places: the mean of squares and the matmul sums
# add in another order (numpy/OpenBLAS vs torch/oneDNN), and softmax's exp is another
# approximation. A float32 result within its last bits of a bf16 rounding boundary can then
# round the other way: 1 bf16 ulp at that value's magnitude, on a small fraction of outputs.

def tb(x):
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)


def bf16_ulp_diff(a, b):
    ai = bf16.to_bits(a).astype(np.int32)
    bi = bf16.to_bits(b).astype(np.int32)
    to_ordered = lambda i: np.where(i & 0x8000, 0x8000 - i, i)
    return np.abs(to_ordered(ai) - to_ordered(bi))


def row_scale_ulps(a, b):
    """|a - b| in bf16 ulps of each row's largest |b| (last axis). Elementwise ulps mislead
    where cancellation makes an output tiny: a float32 sum in another order can move it by
    many of its own ulps, while it moves the row's large outputs by at most one."""
    ulp = 2.0 ** (np.floor(np.log2(np.abs(b).max(-1, keepdims=True))) - 7)
    return np.abs(a - b) / ulp


def meta_rms_norm_bf16(x, w, eps):
    norm = meta_reference().RMSNorm(x.shape[-1], eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(tb(w))
        return norm(tb(x)).float().numpy()


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.sampled_from([64, 256, 1024, 4096]), st.integers(1, 8), st.integers(-8, 8), st.floats(1e-6, 1e-2))
def test_bf16_rms_norm_is_metas_bit_for_bit_given_the_same_mean_of_squares(seed, dim, T, exp2, eps):
    # x = k/16 * 2^exp2 with |k| <= 15: every sum of squares is exact in float32 in any order
    # (at most 20 significant bits), and dim is a power of two, so the mean is the same in
    # both; from there on, Meta's RMSNorm and ours agree to the bit on every element.
    k = np.random.default_rng(seed).integers(-15, 16, (T, dim))
    x = (k / 16 * 2.0 ** exp2).astype(np.float32)
    w = bf16.round(rng_normal(seed + 1, (dim,)))
    assert np.array_equal(ops.rms_norm(x, w, eps, bf16.round), meta_rms_norm_bf16(x, w, eps))


def test_bf16_rms_norm_matches_metas_within_one_ulp():
    # Arbitrary inputs, ~1M outputs at real widths: torch's float32 mean of squares differs
    # from numpy's in the last bit on ~40% of rows, which moves ~1e-6 of outputs across a
    # rounding boundary (measured 0 of these 1.03M, 18 of 14.7M in a wider sweep): 1 bf16 ulp
    # each. Bound: 1e-4.
    total = differ = 0
    for i, (dim, T) in enumerate([(576, 400), (960, 200), (2048, 100), (3072, 40), (4096, 60), (64, 500)]):
        x = bf16.round(rng_normal(i, (T, dim), 10.0 ** (i % 3 - 1)))
        w = bf16.round(rng_normal(i + 100, (dim,), 0.3) + 1)
        d = bf16_ulp_diff(ops.rms_norm(x, w, 1e-5, bf16.round), meta_rms_norm_bf16(x, w, 1e-5))
        assert d.max() <= 1
        total, differ = total + d.size, differ + int((d > 0).sum())
    assert differ <= 1e-4 * total


def test_bf16_attention_matches_metas_attention():
    # Meta's Attention module run in bf16 (oracles.meta_attention) on the same bf16 q, k, v:
    # a 48-token prefill, then 16 tokens through the cache, GQA 1-4. Of the float32 steps
    # between bf16 roundings, the q . k and probs . v sums and softmax's exp are torch's own
    # (see above), so, measured on these inputs (and on 12 seeds of them):
    # - a score rounds the other way on 6 of 136k (22 of 1.0M), by 1 bf16 ulp of its own value
    #   (at most 1/4 ulp of its row's largest score); bound 2 ulps of the row's largest;
    # - where a row's scores agree, its probabilities and outputs are Meta's but for a rounding
    #   flip: probabilities 1 ulp off on 3 of 136k, outputs within 1 ulp of their row's largest
    #   (measured 1.0); bounds 1 and 2 ulps;
    # - a score off by an ulp reweighs its whole row: up to 3 ulps of its largest output.
    # All told 48 of 184k outputs differ (250 of 2.2M); bound 1e-3 of each kind.
    n = np.zeros(3)
    differ = np.zeros(3)
    for i, (H, KV, hd) in enumerate([(8, 2, 64), (9, 3, 64), (4, 1, 128), (4, 4, 64), (16, 4, 64)]):
        attend = meta_attention(H, KV, hd, torch.bfloat16)
        xq, xk, xv = (bf16.round(rng_normal(10 * i + j, (1, 64, h, hd), 2.0)) for j, h in enumerate((H, KV, KV)))
        for got in attend_both(attend, xq, xk, xv, [48, 16], bf16.round):
            (out, ref_out), (scores, ref_scores), (probs, ref_probs) = got["output"], got["scores"], got["probs"]
            masked = np.isneginf(ref_scores)
            assert np.array_equal(np.isneginf(scores), masked)
            s = row_scale_ulps(np.where(masked, 0, scores), np.where(masked, 0, ref_scores))   # (H, T, S)
            assert s.max() <= 2
            agree = (s == 0).all(-1)                                                            # (H, T)
            p = bf16_ulp_diff(probs, ref_probs)
            assert p[agree].max() <= 1
            o = row_scale_ulps(out, ref_out)                                                    # (T, H, hd)
            assert o[agree.T].max() <= 2
            n += (s.size, p.size, o.size)
            differ += ((s > 0).sum(), (p > 0).sum(), (o > 0).sum())
    assert np.all(differ <= 1e-3 * n), differ / n


def test_bf16_matmuls_match_torch_within_one_ulp_of_the_row():
    # One bf16 linear and the SwiGLU feed-forward (three of them) against torch's own: the
    # float32 sums round the other way on ~1e-4 of a linear's outputs (measured 8 of these
    # 95k, 88 of 377k in a wider sweep), each by 1 bf16 ulp of its own value, so at most 1 ulp
    # of its row's largest; elementwise, an output near zero from cancellation can be many of
    # its own ulps away. In the feed-forward such a flip also moves the next matmul's inputs:
    # 2 ulps of the row's largest allowed (measured 1.0). Bound on the rate: 1e-3.
    total = differ = 0
    for i, (dim, hidden, T) in enumerate([(576, 1536, 32), (1024, 2816, 16), (64, 96, 7)]):
        x = bf16.round(rng_normal(i, (T, dim)))
        w1, w3 = (bf16.round(rng_normal(i + s, (hidden, dim), dim ** -0.5)) for s in (1, 3))
        w2 = bf16.round(rng_normal(i + 2, (dim, hidden), hidden ** -0.5))
        one = row_scale_ulps(ops.linear(x, w1, bf16.round), F.linear(tb(x), tb(w1)).float().numpy())
        assert one.max() <= 1
        total, differ = total + one.size, differ + int((one > 0).sum())
        ref = F.linear(F.silu(F.linear(tb(x), tb(w1))) * F.linear(tb(x), tb(w3)), tb(w2)).float().numpy()
        assert row_scale_ulps(ops.feed_forward(x, w1, w2, w3, bf16.round), ref).max() <= 2
    assert differ <= 1e-3 * total
