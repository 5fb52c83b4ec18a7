"""Long prompts and contexts in bounded memory: blocked attention against the reference,
the bf16 KV cache, prefill in chunks, the memory model against real allocations and a
memory-capped run, trace limits, and RoPE with Llama 3.1 scaling at 9k-131k positions
against HF transformers."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import npllama
from npllama.model import bf16, memory, model as model_module, ops
from npllama.inspect import tracefile as tracing
from npllama.errors import UsageError
from npllama.model.model import Transformer
from oracles import TESTS, hf_model, llama3_tokenizer_path, random_weights, small_args, write_random_model

pytestmark = [pytest.mark.torch, pytest.mark.slow]

SEEDS = st.integers(0, 2**31 - 1)
U = 2.0**-24  # float32 unit roundoff


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def bf16_scale_ulps(a, b):
    """max |a - b| in bf16 ulps of the largest |b|."""
    return float(np.abs(a - b).max() / 2.0 ** (np.floor(np.log2(np.abs(b).max())) - 7))


def attention_inputs(seed, B, T, start_pos, n_kv, n_rep, head_dim, scale, rnd=ops.identity):
    rng = np.random.default_rng(seed)
    S = start_pos + T
    q = rnd((rng.standard_normal((B, T, n_kv * n_rep, head_dim)) * scale).astype(np.float32))
    k = rnd((rng.standard_normal((B, S, n_kv, head_dim)) * scale).astype(np.float32))
    v = rnd(rng.standard_normal((B, S, n_kv, head_dim)).astype(np.float32))
    return q, k, v


SHAPES = dict(B=st.integers(1, 2), T=st.integers(0, 40).map(lambda k: 2 * k + 1), start_pos=st.integers(0, 100),
              n_kv=st.integers(1, 2), n_rep=st.integers(1, 8), head_dim=st.sampled_from([16, 32, 64, 128]))


# --- blocked attention == the reference ---------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(seed=SEEDS, scale=st.sampled_from([0.1, 1.0, 3.0, 5.0]), block_q=st.sampled_from([1, 2, 5, 16, 64]),
       block_k=st.sampled_from([1, 3, 16, 64, 1000]), **SHAPES)
def test_flash_attention_equals_reference_within_float32_rounding(seed, scale, block_q, block_k, B, T, start_pos,
                                                                   n_kv, n_rep, head_dim):
    q, k, v = attention_inputs(seed, B, T, start_pos, n_kv, n_rep, head_dim, scale)
    tr = {}
    ref = ops.attention(q, k, v, start_pos, trace=tr)
    flash = ops.flash_attention(q, k, v, start_pos, block_q, block_k)
    # A score s rounded by u|s| moves its weight exp(s - m) by that relative amount, so two
    # correct float32 computations differ by a few u * max|s| * max|v|: the scores' own
    # GEMMs sum in different orders (tile shapes differ), the online softmax rounds each
    # rescale exp(m_old - m_new) and the products with it once per key block (o and l
    # alike, so the roundings mostly cancel in o / l), and the sums run in other orders.
    # Measured <= 1.7 u (1 + max|s|) max|v| over 400 random shapes with |s| up to 120 and
    # 1 to 180 key blocks; allowed 8. A wrong mask or a missed rescale is off by O(max|v|).
    s = tr["scores"]
    tol = 8 * U * (1 + np.abs(s[np.isfinite(s)]).max()) * np.abs(v).max()
    assert np.abs(flash - ref).max() <= tol
    assert flash.dtype == np.float32 and flash.shape == ref.shape


def test_flash_attention_matches_torch_sdpa():
    # An implementation nobody here wrote: torch's fused CPU attention, float32, with GQA,
    # cached positions (start_pos > 0) and several query and key blocks.
    B, T, start_pos, n_kv, n_rep, hd = 2, 301, 77, 2, 4, 64
    q, k, v = attention_inputs(0, B, T, start_pos, n_kv, n_rep, hd, 2.0)
    ours = ops.flash_attention(q, k, v, start_pos, 64, 96)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # noqa: E731
    visible = torch.from_numpy(ops.causal_mask(T, start_pos) == 0)
    ref = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=visible, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(B, T, -1).numpy()
    scores = np.einsum("bthd,bshd->bhts", q[:, :, ::n_rep], k) / math.sqrt(hd)
    assert np.abs(ours - ref).max() <= 8 * U * (1 + np.abs(scores).max()) * np.abs(v).max()


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, scale=st.sampled_from([1.0, 3.0]), rows=st.integers(1, 9), **SHAPES)
def test_rows_attention_keeps_every_bf16_rounding_point(seed, scale, rows, B, T, start_pos, n_kv, n_rep, head_dim):
    q, k, v = attention_inputs(seed, B, T, start_pos, n_kv, n_rep, head_dim, scale, bf16.round)
    tr, tr_rows = {}, {}
    ref = ops.attention(q, k, v, start_pos, bf16.round, tr)
    S = start_pos + T
    out = ops.attention_rows(q, k, v, start_pos, bf16.round, tr_rows, scratch_bytes=16 * B * n_kv * n_rep * S * rows)
    # Rows are independent, so every rounding point is the reference's. What can differ is
    # the float32 summation order inside a GEMM or a row sum, which BLAS and numpy choose by
    # the operands' shapes (a block has fewer rows, and no trailing masked columns): a sum
    # that lands near a bf16 rounding boundary can round the other way. Measured: <= 0.2% of
    # elements, by 1 ulp at the tensor's scale. A missing rounding point changes 20-40% of
    # the elements.
    for ours, theirs in ((out, ref), (tr_rows["probs"], tr["probs"])):
        assert np.array_equal(bf16.round(ours), ours)
        assert bf16_scale_ulps(ours, theirs) <= 1.0
        assert np.mean(ours != theirs) <= 0.01
    finite = np.isfinite(tr["scores"])
    assert np.array_equal(np.isfinite(tr_rows["scores"]), finite)      # the same mask
    assert bf16_scale_ulps(tr_rows["scores"][finite], tr["scores"][finite]) <= 1.0


def test_blocked_attention_traces_the_reference_and_returns_the_same_output():
    q, k, v = attention_inputs(3, 2, 45, 20, 2, 4, 32, 1.0)
    tr_ref, tr = {}, {}
    ops.attention(q, k, v, 20, trace=tr_ref)
    plain = ops.blocked_attention(q, k, v, 20)
    traced = ops.blocked_attention(q, k, v, 20, trace=tr)
    assert np.array_equal(plain, traced)                   # tracing changes no result
    # the trace's scores and probs are the reference's, row block by row block
    assert np.array_equal(np.isfinite(tr["scores"]), np.isfinite(tr_ref["scores"]))
    assert rel_err(tr["probs"], tr_ref["probs"]) < 1e-6


# --- the model: chunks, bf16 cache, blocked vs reference end to end -----------------------

ARGS = small_args(dim=128, n_heads=8, n_kv_heads=2, n_layers=2, vocab_size=97, max_seq_len=512)


@pytest.fixture(scope="module")
def weights():
    return random_weights(ARGS, seed=5)


def close(a, b, dtype):
    # Other GEMM shapes sum in other orders: float32 rounding only (test_model's 1e-5 of the
    # logit scale), and in bf16 numerics a rare flip of a rounding (test_model: <= 2 ulps).
    return rel_err(a, b) < 1e-5 if dtype == "float32" else bf16_scale_ulps(a, b) <= 2.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_prompt_in_chunks_equals_the_reference_in_one_pass(weights, dtype, monkeypatch):
    toks = np.random.default_rng(0).integers(0, ARGS.vocab_size, (2, 301))
    chunked = Transformer(ARGS, weights, dtype=dtype, max_batch_size=2, prefill_chunk=64)
    ours = chunked.forward(toks)
    assert ours.shape == (2, 301, ARGS.vocab_size)
    assert close(chunked.forward(toks, last_only=True), ours[:, -1], dtype)
    with monkeypatch.context() as m:                    # the unblocked reference, one pass
        m.setattr(model_module, "blocked_attention", ops.attention)
        ref = Transformer(ARGS, weights, dtype=dtype, max_batch_size=2, prefill_chunk=1000).forward(toks)
    assert close(ours, ref, dtype)
    # decoding on after the chunked prefill sees the same cache
    nxt = np.array([[3], [4]])
    one = Transformer(ARGS, weights, dtype=dtype, max_batch_size=2, prefill_chunk=1000)
    one.forward(toks)
    assert close(chunked.forward(nxt, start_pos=301), one.forward(nxt, start_pos=301), dtype)


def test_bf16_cache_holds_bits_and_changes_no_result(weights):
    toks = np.random.default_rng(1).integers(0, ARGS.vocab_size, 40)
    m = Transformer(ARGS, weights, dtype="bfloat16")
    assert m.cache_k.dtype == np.uint16 and m.cache_v.dtype == np.uint16
    assert m.cache_k.nbytes + m.cache_v.nbytes == memory.kv_cache_bytes(ARGS, m.max_seq_len, 1, "bfloat16")
    # the same model with a float32 cache, as before: keys and values are bf16 values already
    f = Transformer(ARGS, weights, dtype="bfloat16")
    f.cache_k, f.cache_v = (np.zeros(c.shape, np.float32) for c in (f.cache_k, f.cache_v))
    for i, layer in enumerate(f.layers):   # the blocks hold views of the cache
        layer.attention = model_module.Attention(i, ARGS, f.weights, f.cache_k[i], f.cache_v[i])
    assert np.array_equal(m.forward(toks[:30]), f.forward(toks[:30]))
    for i in range(30, 40):
        assert np.array_equal(m.forward(toks[i:i + 1], start_pos=i), f.forward(toks[i:i + 1], start_pos=i))
    assert np.array_equal(bf16.from_bits(m.cache_k[:, :, :40]), f.cache_k[:, :, :40])
    assert Transformer(ARGS, weights).cache_k.dtype == np.float32


# --- the memory model ---------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_weight_bytes_are_what_a_resident_model_holds(tied):
    w = random_weights(ARGS, seed=1, tied=tied)
    m = Transformer(ARGS, w, weights_mode="resident")
    m.forward(np.arange(5))
    # the float32 copies made on first use (the head, tied or not, is one of them)
    assert sum(a.nbytes for a in m._ready.values()) == memory.weight_bytes(ARGS, "resident")


def test_context_defaults_to_what_fits_and_refuses_what_does_not():
    args = small_args(dim=256, n_heads=8, n_kv_heads=2, n_layers=16, vocab_size=1000, max_seq_len=131072)
    need = lambda ctx: memory.needed_bytes(args, ctx)["total"]  # noqa: E731
    # plenty: the trained context
    assert memory.choose_context(args, None, need(131072)) == 131072
    # less: the longest multiple of 256 that fits
    budget = need(50_000)
    ctx = memory.choose_context(args, None, budget)
    assert ctx % memory.CONTEXT_STEP == 0 and need(ctx) <= budget < need(ctx + memory.CONTEXT_STEP)
    assert memory.choose_context(args, 4096, budget) == 4096
    with pytest.raises(UsageError, match=rf"context of 131,072 positions .* needs .* GiB.* at most {ctx:,} "
                                         r"positions fit"):
        memory.choose_context(args, 131072, budget)
    with pytest.raises(UsageError, match="no context fits; --weights tiled"):
        memory.choose_context(args, None, memory.weight_bytes(args))
    # bf16 numerics hold the cache in half the bytes: a longer context fits
    assert memory.choose_context(args, None, budget, dtype="bfloat16") > ctx


def test_model_checks_its_context_before_allocating(weights):
    m = Transformer(ARGS, weights)
    assert m.max_seq_len == ARGS.max_seq_len                      # a small model: all of it
    assert m.cache_k.nbytes + m.cache_v.nbytes == memory.kv_cache_bytes(ARGS, ARGS.max_seq_len)
    with pytest.raises(UsageError, match=r"context of 1,099,511,627,776 positions .* needs [\d.]+ GiB"):
        Transformer(ARGS, weights, max_seq_len=2**40)


LONG_RUN = r"""
import json, resource, sys, tracemalloc
import numpy as np
sys.path.insert(0, sys.argv[1])
from npllama.model import memory
from npllama.bench.peers import proc_status as status, reset_peak_rss  # VmRSS, VmHWM: this process's own
from npllama.model.model import Transformer
from oracles import random_weights, small_args

T, dtype = int(sys.argv[2]), sys.argv[3]
args = small_args(dim=512, n_heads=32, n_kv_heads=8, n_layers=2, vocab_size=256, multiple_of=256, max_seq_len=T)
model = Transformer(args, random_weights(args), dtype=dtype)
model.forward(np.arange(8), last_only=True)            # every weight in compute form
model.cache_k[:] = 0; model.cache_v[:] = 0              # the whole cache touched (resident)
reset_peak_rss()                                        # VmHWM from here on
base = status("VmRSS")
# A regression to (n_heads, T, T) attention would need gigabytes: fail fast, not eat the machine.
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + (1 << 30), resource.RLIM_INFINITY))
tracemalloc.start()                                    # numpy reports its arrays' memory to it
logits = model.forward(np.random.default_rng(0).integers(0, 256, T), last_only=True)
print(json.dumps({"base": base, "peak": status("VmHWM"), "finite": bool(np.isfinite(logits).all()),
                  "live": tracemalloc.get_traced_memory()[1], "reserve": memory.RESERVE,
                  "scratch": memory.scratch_bytes(args, T, model.prefill_chunk, 1, dtype),
                  "unblocked": 3 * 4 * args.n_heads * T * T}))
"""


@pytest.mark.parametrize("dtype,T", [("float32", 4096), ("bfloat16", 2048)])
def test_long_prompt_on_many_heads_stays_within_the_memory_model(dtype, T):
    # 4,096 tokens on 32 heads: the unblocked attention would hold 3 x 2 GiB of scores (bf16
    # numerics, slower: 2,048 tokens, 3 x 0.5 GiB).
    import json
    tests = TESTS
    r = subprocess.run([sys.executable, "-c", LONG_RUN, tests, str(T), dtype], capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(tests))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    # The arrays alive at once during the forward pass never exceed the memory model's
    # scratch for it; the process's peak RSS over the loaded model (weights in compute form,
    # KV cache touched) stays within that plus the model's reserve, which is there for what
    # the allocator keeps of freed blocks (one arena per thread) and the interpreter.
    assert res["live"] <= res["scratch"], (res["live"], res["scratch"])
    assert res["peak"] - res["base"] <= res["scratch"] + res["reserve"]
    assert res["scratch"] + res["reserve"] < res["unblocked"] / 2   # the unblocked attention would not fit


# --- trace on long prompts ----------------------------------------------------------------

def test_trace_keeps_scores_only_when_asked_and_within_budget(weights):
    toks = np.random.default_rng(2).integers(0, ARGS.vocab_size, 50)
    m = Transformer(ARGS, weights)
    full = npllama.trace(m, toks)
    lean = npllama.trace(m, toks, layers=[1], scores=False)
    assert "layers.1.scores" in full and "layers.1.probs" in full
    assert "layers.1.q" in lean and "layers.0.q" not in lean
    assert not any(k.endswith((".scores", ".probs")) for k in lean)
    # tracing changes no result: the same logits with, without, and without a trace
    assert np.array_equal(full["logits"], lean["logits"]) and np.array_equal(full["logits"], m.forward(toks))
    per_layer = 2 * ARGS.n_heads * 50 * 50 * 4
    npllama.trace(m, toks, scores_budget=2 * per_layer)
    with pytest.raises(UsageError, match=r"scores and probs of 2 layer\(s\) \(8 heads x 50 x 50 float32, twice\) "
                                         r"need 0.00 GiB, over the 0.00 GiB limit: .*--layers.*--no-scores"):
        npllama.trace(m, toks, scores_budget=2 * per_layer - 1)
    assert "layers.0.scores" in npllama.trace(m, toks, layers=[0], scores_budget=per_layer)


def test_trace_cli_no_scores_and_budget_error(tmp_path):
    args = small_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=128256, max_seq_len=8192)
    model_dir = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    out = tmp_path / "t.npz"
    run = lambda *a: subprocess.run([sys.executable, "-m", "npllama", "trace", "-m", model_dir, *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("hello " * 3, "-o", str(out), "--no-scores")
    assert r.returncode == 0, r.stderr
    tr = tracing.load(str(out))
    assert "layers.0.q" in tr and not any(k.endswith((".scores", ".probs")) for k in tr)
    # ~6,000 tokens: 2 layers' scores and probs (4 heads) would take 2.1 GiB; refused before any work
    r = run(" hello" * 6000, "-o", str(tmp_path / "u.npz"))
    assert r.returncode == 1 and not (tmp_path / "u.npz").exists()
    assert r.stderr.startswith("npllama: trace: the scores and probs of 2 layer(s) (4 heads x 6,0") and \
        "GiB limit: trace fewer layers (--layers) or leave them out (--no-scores)" in r.stderr, r.stderr


def test_memory_cli_prints_the_model():
    r = subprocess.run([sys.executable, "-m", "npllama", "memory", "--shape", "llama3.2-1b", "--ctx", "8192,131072"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    args = npllama.preset("llama3.2-1b")
    need = memory.needed_bytes(args, 131072)
    row = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("131,072")][0]
    assert row[1:3] == [f"{need['weights'] / memory.GiB:.2f}", "GiB"] and row[3] == "8.00"   # 16 x 8 x 64 x 4 x 2
    assert "this machine: " in r.stdout


# --- RoPE with Llama 3.1/3.2 scaling far past the original context, against HF ------------

@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_logits_at_positions_past_8k_match_hf(factor):
    from transformers import DynamicCache
    args = small_args(dim=64, n_heads=4, n_kv_heads=2, use_scaled_rope=True, rope_theta=500000.0,
                      rope_scaling_factor=factor, max_seq_len=131072)
    w = random_weights(args, seed=0)
    rng = np.random.default_rng(1)
    first, later = rng.integers(0, args.vocab_size, 8), rng.integers(0, args.vocab_size, 16)
    hf = hf_model(args, w)
    unscaled_args = npllama.ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
    for P in (9000, 65536, 100000, 131072 - 16):
        # Tokens at 0..7, cached keys and values at 8..P-1 (random: the queries at P.. must
        # rotate correctly to score them; zeros would score 0 whatever the rotation), then
        # 16 tokens at P..P+15. HF is given the same cache (its keys in HF's rotate-half
        # layout) and position_ids, so it never runs P tokens.
        gap_k = rng.standard_normal((args.n_layers, P - 8, args.n_kv_heads, args.head_dim)).astype(np.float32)
        gap_v = rng.standard_normal((args.n_layers, P - 8, args.n_kv_heads, args.head_dim)).astype(np.float32)

        def ours(a):
            m = Transformer(a, w)
            m.forward(first)
            m.cache_k[:, 0, 8:P], m.cache_v[:, 0, 8:P] = gap_k, gap_v
            return m.forward(later, start_pos=P)

        cache = DynamicCache(config=hf.config)
        with torch.no_grad():
            hf(torch.tensor(first[None]), cache=cache, use_cache=True)
            for i in range(args.n_layers):
                k = gap_k[i].reshape(P - 8, args.n_kv_heads, args.head_dim // 2, 2).swapaxes(-1, -2)
                cache.update(torch.from_numpy(k.reshape(P - 8, args.n_kv_heads, -1)).transpose(0, 1)[None],
                             torch.from_numpy(gap_v[i]).transpose(0, 1)[None], i)
            ref = hf(torch.tensor(later[None]), cache=cache, use_cache=True,
                     position_ids=torch.arange(P, P + 16)[None]).logits[0].numpy()
        # float32 throughout: the same angles t * freq (one float32 product, as HF's), cos
        # and sin of them within an ulp; measured ~3e-7 of the logit scale, test_model's 1e-5.
        assert rel_err(ours(args), ref) < 1e-5, P
        assert rel_err(ours(unscaled_args), ref) > 1e-3, P     # the check tells scaling from none
