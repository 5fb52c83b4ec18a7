"""Traces and the comparer: npllama against HF and Meta traces of the same model, broken
implementations flagged at the right first tensor, causal prefixes, golden bundles."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import npllama
from npllama.io import checkpoint
from npllama.model import model as model_module, ops
from npllama.inspect import tracefile as tracing
from npllama.inspect import compare as comparing
from npllama.inspect import golden as golden_module
from npllama.model import observer
from npllama.model.model import Transformer
from npllama.text.tokenizer import load as load_tokenizer
from oracles import (ROOT, hf_logits, hf_model, hf_trace, llama3_tokenizer_path, meta_model, meta_trace, random_weights,
                     small_args, write_random_model)

pytestmark = pytest.mark.torch

ARGS = small_args(dim=128, n_heads=8, n_kv_heads=2, n_layers=2, vocab_size=300)
TOKENS = np.random.default_rng(0).integers(0, 300, 24)


@pytest.fixture(scope="module")
def weights():
    return random_weights(ARGS, seed=11)


@pytest.fixture(scope="module")
def hf(weights):
    return hf_trace(hf_model(ARGS, weights), TOKENS)


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, timeout=300)


def test_trace_names_shapes_and_metadata(weights):
    tr = npllama.trace(Transformer(ARGS, weights), TOKENS)
    T, H, KV, hd = len(TOKENS), ARGS.n_heads, ARGS.n_kv_heads, ARGS.head_dim
    assert [k for k in observer.forward_order(ARGS.n_layers) if k in tr] == observer.forward_order(ARGS.n_layers)
    expected = {"tokens": (T,), "token_embeddings": (T, ARGS.dim), "layers.1.q": (T, H, hd), "layers.1.k": (T, KV, hd),
                "layers.1.scores": (H, T, T), "layers.1.probs": (H, T, T), "layers.1.attention": (T, ARGS.dim),
                "layers.1.w1": (T, ARGS.ffn_dim), "logits": (T, ARGS.vocab_size)}
    assert {k: tr[k].shape for k in expected} == expected
    assert tr["__meta__"]["dtype"] == "float32" and tr["__meta__"]["params"]["dim"] == 128
    only = npllama.trace(Transformer(ARGS, weights), TOKENS, layers=[1])
    assert "layers.0.q" not in only and "layers.1.q" in only and "logits" in only


def test_npllama_trace_matches_hf_trace(weights, hf, tmp_path):
    ours = npllama.trace(Transformer(ARGS, weights), TOKENS)
    ok, first, rows = comparing.compare(ours, hf)
    assert ok, first
    assert len(rows) == len(observer.forward_order(ARGS.n_layers)) - ARGS.n_layers  # HF has no `scores`
    # and through the files and the CLI
    tracing.save(str(tmp_path / "np.npz"), ours)
    tracing.save(str(tmp_path / "hf.npz"), hf)
    r = run_cli("compare", str(tmp_path / "np.npz"), str(tmp_path / "hf.npz"))
    assert r.returncode == 0 and "all within tolerance" in r.stdout


def rotate_half_rope(x, freqs_cis, rnd=ops.identity):
    # A classic porting mistake: HF's rotate-half RoPE applied to Meta-layout q/k.
    half = x.shape[-1] // 2
    cos = np.concatenate([freqs_cis.real] * 2, -1)[None, :, None, :]
    sin = np.concatenate([freqs_cis.imag] * 2, -1)[None, :, None, :]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return rnd((x * cos + rotated * sin).astype(np.float32))


def tiled_gqa_attention(xq, keys, values, start_pos, rnd=ops.identity, trace=None):
    # Another: query head h reading KV head h % n_kv_heads instead of h // n_rep.
    rep = xq.shape[2] // keys.shape[2]
    return ops.attention(xq, np.tile(keys, (1, 1, rep, 1)), np.tile(values, (1, 1, rep, 1)), start_pos, rnd, trace)


@pytest.mark.parametrize("patch,first", [("apply_rotary_emb", "layers.0.q_rotated"),
                                         ("blocked_attention", "layers.0.probs")])
def test_broken_implementations_are_flagged_at_the_first_wrong_tensor(weights, hf, monkeypatch, patch, first):
    monkeypatch.setattr(model_module, patch, {"apply_rotary_emb": rotate_half_rope,
                                               "blocked_attention": tiled_gqa_attention}[patch])
    broken = npllama.trace(Transformer(ARGS, weights), TOKENS)
    ok, got, _ = comparing.compare(broken, hf)
    assert not ok and got == first


# bf16 against Meta's reference run in bf16: every shared tensor within 2 bf16 ulps at its
# scale (the matmul summation-order flips of test_model, compounded over two layers;
# measured <= 1.5).
BF16_ULPS = 2.0


def test_bf16_trace_matches_meta_bf16_run_and_flags_a_missing_rounding(weights, monkeypatch):
    ref = meta_trace(meta_model(ARGS, weights, torch.bfloat16), TOKENS)
    ours = npllama.trace(Transformer(ARGS, weights, dtype="bfloat16"), TOKENS)
    ok, first, rows = comparing.compare(ours, ref, ulps=BF16_ULPS)
    assert ok, first
    assert len(rows) >= 2 + 11 * ARGS.n_layers
    # Asked for identical values, the correct run gets past attention_norm (bit-exact); the
    # first difference is a matmul's rare rounding flip.
    _, first_correct, _ = comparing.compare(ours, ref, ulps=0)
    assert observer.forward_order(2).index(first_correct) > observer.forward_order(2).index("layers.0.attention_norm")
    # RMSNorm that skips Meta's `.type_as(x)` before the weight (rounds once, HF-style):
    # flagged at once.
    monkeypatch.setattr(model_module, "rms_norm", lambda x, w, eps, rnd=ops.identity: rnd(ops.rms_norm(x, w, eps)))
    broken = npllama.trace(Transformer(ARGS, weights, dtype="bfloat16"), TOKENS)
    ok, first, rows = comparing.compare(broken, ref, ulps=0)
    assert not ok and first == "layers.0.attention_norm"
    assert dict((r[0], r[1]) for r in rows)["layers.0.attention_norm"]["ulp_dist"] == 1


def test_prefix_trace_equals_rows_of_longer_trace(weights):
    full = npllama.trace(Transformer(ARGS, weights), TOKENS)
    for k in (1, 7):
        part = npllama.trace(Transformer(ARGS, weights), TOKENS[:k])
        for name, v in part.items():
            if name == "__meta__":
                continue
            w = full[name]
            w = w[:, :k, :k] if name.endswith(("scores", "probs")) else w[:k]
            if name == "tokens":
                assert np.array_equal(v, w)
            else:  # causal: the same computation, GEMM shapes aside (float32 rounding only)
                s = comparing.compare_arrays(v, w, masked=name.endswith("scores"))  # the causal mask: -inf both
                assert s["max_abs"] <= 1e-5 * max(s["scale"], 1e-30), name


def test_rotate_half_layout_conversion_round_trips():
    x = np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)
    hf_layout = x.reshape(3, 4, 8, 2).swapaxes(-1, -2).reshape(3, 4, 16)
    assert np.array_equal(comparing.rotate_half_to_interleaved(hf_layout), x)


def test_compare_cli_flags_and_exits_nonzero(tmp_path, weights):
    a = npllama.trace(Transformer(ARGS, weights), TOKENS)
    b = {k: (v if k in ("__meta__", "tokens") else v.copy()) for k, v in a.items()}
    b["layers.1.w3"] = b["layers.1.w3"] * np.float32(1.001)
    tracing.save(str(tmp_path / "a.npz"), a)
    tracing.save(str(tmp_path / "b.npz"), b)
    r = run_cli("compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    assert r.returncode == 1
    flagged = [line for line in r.stdout.splitlines() if "first outside tolerance" in line and "<--" in line]
    assert len(flagged) == 1 and flagged[0].startswith("layers.1.w3")
    assert run_cli("compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--rtol", "0.01").returncode == 0


def test_trace_and_golden_cli(tmp_path):
    args = small_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=128256, max_seq_len=256)
    model_dir = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    r = run_cli("trace", "-m", model_dir, "Hello there, general", "-o", str(tmp_path / "t.npz"), "--layers", "1")
    assert r.returncode == 0, r.stderr
    tr = tracing.load(str(tmp_path / "t.npz"))
    assert "layers.1.probs" in tr and "layers.0.q" not in tr and tr["__meta__"]["prompt"] == "Hello there, general"
    r = run_cli("trace", "-m", model_dir, "x", "-o", str(tmp_path / "u.npz"), "--layers", "5")
    assert r.returncode == 1 and "layer 5 does not exist" in r.stderr
    r = run_cli("golden", "-m", model_dir, "-o", str(tmp_path / "gold"), "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "gold" / "golden.json").read_text())
    assert (tmp_path / "gold" / "README.md").exists()
    golden = {f[:-len(".npy")]: np.load(tmp_path / "gold" / f, allow_pickle=False) for f in meta["files"]}
    for f, info in meta["files"].items():
        assert list(golden[f[:-len(".npy")]].shape) == info["shape"]
    # The bundle against HF transformers on the same weights: every tensor HF's trace has
    # (logits, embeddings, layer 0's intermediates, the last layer, the norm) within the
    # trace comparer's float32 tolerance, and the greedy tokens are argmax over HF's logits.
    hf = hf_model(args, {k: np.asarray(v) for k, v in checkpoint.open_tensors(model_dir).items()})
    ref = hf_trace(hf, meta["tokens"])
    golden["__meta__"] = {"qk_layout": "interleaved"}
    ok, first, rows = comparing.compare(ref, golden)     # HF checked against the bundle
    assert ok, first
    # the bundle's directory is itself a trace compare reads, strictly
    assert comparing.compare(ref, tracing.load(str(tmp_path / "gold"))).ok
    assert meta["weights_sha256"] == golden_module.weights_digest(checkpoint.open_tensors(model_dir))
    assert {row[0] for row in rows} >= {"tokens", "logits", "layers.0.q_rotated", "layers.0.probs", "layers.1.out"}
    seq, greedy = list(meta["tokens"]), meta["greedy"]
    for token in greedy["tokens"] + ([None] if greedy["stop_reason"] == "stop_token" else []):
        best = int(np.argmax(hf_logits(hf, seq)[-1]))
        assert best == token if token is not None else best in load_tokenizer(model_dir).stop_ids
        seq.append(best)
    assert len(greedy["tokens"]) == 5 or greedy["stop_reason"] == "stop_token"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_walkthrough_runs_and_checks_itself(tmp_path, dtype):
    # head_dim 128 and 4 query heads per KV head, as Llama 3 8B; Llama 3's tokenizer: 17 tokens.
    args = small_args(dim=512, n_heads=4, n_kv_heads=1, vocab_size=128256, max_seq_len=64)
    model_dir = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    tool = os.path.join(ROOT, "tools", "walkthrough.py")
    r = subprocess.run([sys.executable, tool, "-m", model_dir, "--dtype", dtype], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": 17 tokens" in r.stdout and "q_per_token [17, 128]" in r.stdout
    assert "4 query heads share 1 key/value heads" in r.stdout and "stacked_qkv_attention [17, 512]" in r.stdout
    assert r.stdout.strip().endswith("OK")


def test_cli_trace_chunks_and_strict_compare(tmp_path):
    # the command line reaches the library's KV-cache schedules and strictness: a chunked
    # trace of a correct model compares equal to the one-pass trace, and a trace holding a
    # few of the reference's tensors fails unless --allow-missing is given
    args = small_args(dim=64, n_heads=4, n_kv_heads=2, vocab_size=128256, max_seq_len=256)
    model_dir = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    one, chunked = str(tmp_path / "one.npz"), str(tmp_path / "chunked.npz")
    for out, extra in ((one, []), (chunked, ["--chunks", "3,1,1"])):
        r = run_cli("trace", "-m", model_dir, "Hello there, general Kenobi", "-o", out, *extra)
        assert r.returncode == 0, r.stderr
    r = run_cli("compare", chunked, one)
    assert r.returncode == 0 and "all within tolerance" in r.stdout, r.stdout + r.stderr
    tr = tracing.load(one)
    few = str(tmp_path / "few.npz")
    tracing.save(few, {k: tr[k] for k in ("tokens", "token_embeddings", "logits", "__meta__")})
    r = run_cli("compare", few, one)
    assert r.returncode == 1 and "missing from A" in r.stdout, r.stdout + r.stderr
    assert run_cli("compare", few, one, "--allow-missing").returncode == 0
    r = run_cli("golden", "-m", model_dir, "Hello there, general Kenobi", "-o", str(tmp_path / "gold"),
                "--chunks", "3,1,1", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "gold" / "golden.json").read_text())["chunks"][:3] == [3, 1, 1]   # then 1 a call
    r = run_cli("compare", str(tmp_path / "gold"), one, "--allow-missing")   # the bundle holds a selection
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("trace", "-m", model_dir, "x", "-o", str(tmp_path / "bad.npz"), "--chunks", "3,0")
    assert r.returncode == 2 and "--chunks" in r.stderr and "Traceback" not in r.stderr
