"""The whole forward pass: properties, and cross-checks against HF transformers and Meta's
own reference (llama-models) on random small models."""
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from llama_models.sku_list import resolve_model

from npllama import ConfigError, ModelArgs, Transformer, WeightError, preset
from npllama.model import bf16
from npllama.testing import checkpoints, data_tokens
from oracles import hf_logits, hf_model, meta_logits, meta_model, random_weights, small_args

pytestmark = pytest.mark.torch


def rel_err(a, b):
    """max |a - b| relative to the largest |b|: logits near zero make elementwise relative
    error meaningless, the scale of the logits is what a float32 rounding is relative to."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# Shapes: GQA ratios 1, 2, 4, 8; head_dim 16..128; tied and untied; with and without 3.1
# scaling; 40 tokens so a RoPE layout mistake shows.
SHAPES = [
    dict(dim=64, n_heads=4, n_kv_heads=4),                                   # MHA, hd 16
    dict(dim=128, n_heads=4, n_kv_heads=2, tied=True),                       # GQA 2, hd 32
    dict(dim=256, n_heads=4, n_kv_heads=1, use_scaled_rope=True, rope_theta=500000.0),  # GQA 4, hd 64
    dict(dim=256, n_heads=8, n_kv_heads=1, tied=True, use_scaled_rope=True),  # GQA 8, hd 32
    dict(dim=256, n_heads=2, n_kv_heads=1, multiple_of=64, ffn_dim_multiplier=1.3),  # hd 128
]


def build(shape, seed=0):
    shape = dict(shape)
    tied = shape.pop("tied", False)
    args = small_args(**shape)
    return args, random_weights(args, seed=seed, tied=tied)


def tokens_for(args, n=40, seed=1):
    return np.random.default_rng(seed).integers(0, args.vocab_size, n)


# fp32: measured ~5e-7 against both; 1e-5 of the logit scale leaves room for summation
# order over two layers and nothing for a wrong operation (those show as 1e-2 or more).
FP32_TOL = 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_float32_matches_hf_transformers(shape):
    args, w = build(shape)
    toks = tokens_for(args)
    ours = Transformer(args, w).forward(toks)
    assert ours.dtype == np.float32
    assert rel_err(ours, hf_logits(hf_model(args, w), toks)) < FP32_TOL


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_float32_matches_meta_reference(shape):
    args, w = build(shape)
    toks = tokens_for(args)
    assert rel_err(Transformer(args, w).forward(toks), meta_logits(meta_model(args, w), toks)) < FP32_TOL


def test_float32_matches_meta_at_scaled_rope_positions():
    # The 3.1 scaling changes only rotations slower than 1/8192 rad per position, so it shows
    # only across thousands of positions: 8 tokens at 0, then 30 at 9000 (the cache between
    # stays zero in both implementations).
    args, w = build(dict(dim=256, n_heads=4, n_kv_heads=2, use_scaled_rope=True, rope_theta=500000.0,
                         max_seq_len=9100))
    first, later = tokens_for(args, 8, 1), tokens_for(args, 30, 2)

    def run(model, logits_fn):
        logits_fn(model, first, 0)
        return logits_fn(model, later, 9000)
    ours_fn = lambda m, t, p: m.forward(t, start_pos=p)
    ours = run(Transformer(args, w, max_seq_len=9100), ours_fn)  # past the default cap of 8192
    ref = run(meta_model(args, w), meta_logits)
    assert rel_err(ours, ref) < FP32_TOL
    unscaled_args = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
    unscaled = run(Transformer(unscaled_args, w, max_seq_len=9100), ours_fn)
    assert rel_err(unscaled, ref) > 10 * FP32_TOL  # the check can tell scaling from none


def test_float32_batch_matches_hf_per_row():
    args, w = build(SHAPES[1])
    toks = np.stack([tokens_for(args, 24, s) for s in range(3)])
    ours = Transformer(args, w, max_batch_size=3).forward(toks)
    hf = hf_model(args, w)
    for b in range(3):
        assert rel_err(ours[b], hf_logits(hf, toks[b])) < FP32_TOL


def bf16_scale_ulps(a, b):
    """max |a - b| in bf16 ulps of the largest |b| (the logits' scale)."""
    ulp = 2.0 ** (np.floor(np.log2(np.abs(b).max())) - 7)
    return float(np.abs(a - b).max() / ulp)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_bfloat16_matches_meta_reference_run_in_bf16(shape):
    args, w = build(shape)
    toks = tokens_for(args)
    ref = meta_logits(meta_model(args, w, torch.bfloat16), toks)
    ours = Transformer(args, w, dtype="bfloat16").forward(toks)
    # Every op is bit-identical to torch given identical inputs (test_ops), except that a
    # float32 matmul sum near a bf16 rounding boundary may round the other way (~1e-4 of
    # outputs, 1 ulp). Such a flip perturbs everything downstream by under an ulp, so some
    # logits end up 1 ulp away; measured <= 1.5 ulps of the logit scale over these shapes.
    assert bf16_scale_ulps(ours, ref) <= 2.0
    # Every logit is a bf16 value, as Meta's `.float()` of a bf16 output.
    assert np.array_equal(bf16.round(ours), ours)
    # ...and the emulation is what brings us there: a float32 run is further away.
    f32 = Transformer(args, w).forward(toks)
    assert np.mean(ours == ref) > 5 * np.mean(f32 == ref)


# --- properties -------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(checkpoints(), data_tokens(min_len=2, max_len=20), st.data())
def test_causality(checkpoint, tokens_for, data):
    args, w = checkpoint
    m = Transformer(args, w)
    toks = tokens_for(args)
    j = data.draw(st.integers(0, len(toks) - 1))
    changed = toks.copy()
    changed[j] = (changed[j] + 1) % args.vocab_size
    a, b = m.forward(toks), m.forward(changed)
    assert np.array_equal(a[:j], b[:j])
    assert not np.array_equal(a[j:], b[j:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), splits=st.lists(st.integers(1, 8), min_size=1, max_size=6))
def test_chunked_prefill_and_decode_equal_one_shot(dtype, seed, splits):
    args, w = build(SHAPES[2])
    toks = tokens_for(args, sum(splits), seed)
    full = Transformer(args, w, dtype=dtype).forward(toks)
    m = Transformer(args, w, dtype=dtype)
    pos, parts = 0, []
    for n in splits:
        parts.append(m.forward(toks[pos:pos + n], start_pos=pos))
        pos += n
    chunked = np.concatenate(parts)
    if dtype == "float32":
        # different GEMM shapes sum in different orders: float32 rounding only.
        assert rel_err(chunked, full) < FP32_TOL
    else:
        # ...and in bf16 such a difference can flip a rounding (see the Meta bf16 test).
        assert bf16_scale_ulps(chunked, full) <= 2.0


def test_token_by_token_decode_equals_full_forward():
    args, w = build(SHAPES[3])
    toks = tokens_for(args, 30)
    full = Transformer(args, w).forward(toks)
    m = Transformer(args, w)
    steps = np.stack([m.forward(toks[i:i + 1], start_pos=i)[0] for i in range(len(toks))])
    assert rel_err(steps, full) < FP32_TOL
    last = m.forward(toks[:5], last_only=True)
    assert last.shape == (args.vocab_size,)
    assert rel_err(last, Transformer(args, w).forward(toks[:5])[-1]) < FP32_TOL


def test_gqa_with_all_kv_heads_equals_multihead():
    # A GQA model whose KV heads are copies is the same function as a MHA model with
    # repeated KV weights: query head h must read KV head h // n_rep.
    args, w = build(dict(dim=128, n_heads=8, n_kv_heads=2))
    mha_args = small_args(dim=128, n_heads=8, n_kv_heads=8)
    hd, rep = args.head_dim, 4
    w_mha = dict(w)
    for i in range(args.n_layers):
        for name in ("wk", "wv"):
            k = f"layers.{i}.attention.{name}.weight"
            w_mha[k] = np.repeat(w[k].reshape(2, hd, -1), rep, axis=0).reshape(8 * hd, -1)
    toks = tokens_for(args, 20)
    assert rel_err(Transformer(args, w).forward(toks), Transformer(mha_args, w_mha).forward(toks)) < FP32_TOL


def test_float32_stays_float32():
    # A float64 scalar anywhere silently makes decode ~50x slower: keep dtypes explicit.
    args, w = build(SHAPES[0])
    m = Transformer(args, {k: v.astype(np.float16) if v.ndim == 1 else v for k, v in w.items()})
    tr = {}
    out = m.forward(tokens_for(args, 5), trace=tr)
    assert out.dtype == np.float32
    bad = {k: v.dtype for k, v in tr.items() if k != "tokens" and v.dtype != np.float32}
    assert not bad
    assert all(m.weight(name).dtype == np.float32 for name in m.weights)


def test_bf16_weights_as_uint16_are_widened_exactly():
    args, w = build(SHAPES[0])
    bits = {k: bf16.to_bits(v) for k, v in w.items()}
    a = Transformer(args, bits).forward(tokens_for(args, 7))
    b = Transformer(args, {k: bf16.round(v) for k, v in w.items()}).forward(tokens_for(args, 7))
    assert np.array_equal(a, b)


def test_tied_head_uses_embeddings():
    args, w = build(SHAPES[0])
    tied = {k: v for k, v in w.items() if k != "output.weight"}
    untied = dict(tied, **{"output.weight": w["tok_embeddings.weight"]})
    toks = tokens_for(args, 9)
    assert np.array_equal(Transformer(args, tied).forward(toks), Transformer(args, untied).forward(toks))


# --- config and errors ------------------------------------------------------------------

@pytest.mark.parametrize("name,hidden", [("llama3-8b", 14336), ("llama3-70b", 28672), ("llama3.1-405b", 53248),
                                         ("llama3.2-1b", 8192), ("llama3.2-3b", 8192)])
def test_ffn_hidden_size_of_released_shapes(name, hidden):
    assert preset(name).ffn_dim == hidden


@pytest.mark.parametrize("name,meta", [("llama3-8b", "Llama-3-8B"), ("llama3-70b", "Llama-3-70B"),
                                       ("llama3.1-8b", "Llama3.1-8B"), ("llama3.1-405b", "Llama3.1-405B"),
                                       ("llama3.2-1b", "Llama3.2-1B"), ("llama3.2-3b", "Llama3.2-3B")])
def test_released_shapes_have_metas_shape_and_trained_context(name, meta):
    # Meta's own registry (llama-models' sku_list) is the oracle for what each release is.
    model = resolve_model(meta)
    arch = model.arch_args
    a = preset(name)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads) == (arch["dim"], arch["n_layers"], arch["n_heads"],
                                                            arch["n_kv_heads"])
    assert a.max_seq_len == model.max_seq_length


def test_params_json_forms(tmp_path):
    p = tmp_path / "params.json"
    p.write_text('{"model": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,'
                 ' "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,'
                 ' "use_scaled_rope": true, "some_future_key": 3}}')
    a = ModelArgs.from_json(p)
    assert (a.dim, a.ffn_dim, a.rope_scaling_factor) == (2048, 8192, 32.0)
    b = ModelArgs.from_dict(a.to_dict())
    assert b.ffn_dim == a.ffn_dim and dataclasses.replace(b, hidden_dim=None) == a
    p.write_text('{"dim": 100, "n_heads": 3, "n_layers": 1, "vocab_size": 10}')
    with pytest.raises(ConfigError, match=r"params.json: dim \(100\) must be a multiple of n_heads \(3\)"):
        ModelArgs.from_json(p)
    with pytest.raises(ConfigError, match=r"n_heads \(32\) must be a multiple of n_kv_heads \(5\)"):
        ModelArgs(n_kv_heads=5)
    p.write_text('{"dim": 64, "n_heads": 4}')
    with pytest.raises(ConfigError, match="missing n_layers, vocab_size"):
        ModelArgs.from_json(p)
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_json(p)


def test_weight_errors_name_the_tensor():
    args, w = build(SHAPES[0])
    with pytest.raises(WeightError, match="missing tensor layers.1.ffn_norm.weight"):
        Transformer(args, {k: v for k, v in w.items() if k != "layers.1.ffn_norm.weight"})
    with pytest.raises(WeightError, match=r"layers.0.attention.wk.weight: shape \(32, 64\), the params say"):
        Transformer(args, dict(w, **{"layers.0.attention.wk.weight": np.zeros((32, 64), np.float32)}))
    with pytest.raises(WeightError, match="unexpected tensors.*layers.9.foo"):
        Transformer(args, dict(w, **{"layers.9.foo": np.zeros(3, np.float32)}))
    with pytest.raises(WeightError, match="norm.weight: unsupported dtype int32"):
        Transformer(args, dict(w, **{"norm.weight": np.zeros(64, np.int32)}))


def test_forward_argument_errors():
    args, w = build(SHAPES[0])
    m = Transformer(args, w, max_seq_len=16)
    with pytest.raises(ValueError, match="exceed the context of 16 tokens"):
        m.forward(np.zeros(10, int), start_pos=10)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        m.forward(np.array([1, 97]))
    with pytest.raises(ValueError, match="batch of 2 sequences exceeds"):
        m.forward(np.zeros((2, 3), int))
    with pytest.raises(TypeError, match="integers"):
        m.forward(np.zeros(3))
    with pytest.raises(ValueError, match="T >= 1"):
        m.forward(np.zeros(0, int))
    with pytest.raises(ValueError, match="dtype must be one of"):
        Transformer(args, w, dtype="float16")


# --- weight modes -----------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.sampled_from([2, 8, 64, 130]), st.integers(1, 40))
def test_tiled_bf16_matmul_equals_widened_matmul(seed, M, K, N):
    from npllama.model import tiled
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ws = [bf16.to_bits(rng.standard_normal((n, K)).astype(np.float32)) for n in (N, max(1, N // 3))]
    ref = np.concatenate([x @ bf16.from_bits(w).T for w in ws], axis=1)
    # the even and odd columns are summed separately: float32 summation order only
    got = tiled.matmul(x, ws)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_weights_give_the_resident_results(dtype):
    args, w = build(SHAPES[2])
    bits = {k: bf16.to_bits(v) for k, v in w.items()}
    toks = tokens_for(args, 20)
    resident = Transformer(args, bits, dtype=dtype, weights_mode="resident")
    tiled_model = Transformer(args, bits, dtype=dtype, weights_mode="tiled")
    assert (resident.weights_mode, tiled_model.weights_mode) == ("resident", "tiled")
    a, b = resident.forward(toks), tiled_model.forward(toks)
    if dtype == "float32":
        assert rel_err(b, a) < FP32_TOL
    else:
        assert bf16_scale_ulps(b, a) <= 2.0
    assert not any(v.dtype == np.float32 and v.ndim == 2 for v in tiled_model._ready.values())  # nothing widened
    # float32 weights, tiled, are read where they are: same results, no copies kept
    in_place = Transformer(args, w, dtype=dtype, weights_mode="tiled")
    a, b = Transformer(args, w, dtype=dtype, weights_mode="resident").forward(toks), in_place.forward(toks)
    if dtype == "float32":
        assert rel_err(b, a) < FP32_TOL
    else:
        assert bf16_scale_ulps(b, a) <= 2.0
    assert not any(v.ndim == 2 for v in in_place._ready.values())
    # auto keeps small models resident
    assert Transformer(args, bits).weights_mode == "resident"
    with pytest.raises(ValueError, match="weights mode"):
        Transformer(args, bits, weights_mode="fast")
