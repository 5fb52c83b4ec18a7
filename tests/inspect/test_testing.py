"""npllama.testing: its strategies drive property tests of npllama against HF transformers and
Meta's reference; check_against_reference passes correct implementations and catches subtly
broken ones (a wrong RoPE pairing, a wrong RMSNorm eps), naming the first position."""
import linecache
import os
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from transformers import LlamaConfig, LlamaForCausalLM

from npllama import Transformer
from npllama.errors import MissingDependencyError
from npllama.testing import check_against_reference, checkpoints, data_tokens, model_args, random_weights, to_hf
from oracles import ROOT, meta_logits, meta_model, small_args

pytestmark = pytest.mark.torch

def hf_forward(args, weights, config_changes=(), keep_meta_qk=False):
    """HF transformers' LlamaForCausalLM on to_hf's state dict and config, as the README's
    example builds it; the keyword arguments break it on purpose."""
    state, config = to_hf(args, weights)
    config.update(config_changes)
    if keep_meta_qk:   # RoPE pairing: Meta's interleaved q/k fed to HF's rotate-half RoPE
        for i in range(args.n_layers):
            state[f"model.layers.{i}.self_attn.q_proj.weight"] = weights[f"layers.{i}.attention.wq.weight"]
            state[f"model.layers.{i}.self_attn.k_proj.weight"] = weights[f"layers.{i}.attention.wk.weight"]
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)

    def forward(tokens):
        with torch.no_grad():
            return model(torch.as_tensor(tokens)[None]).logits[0]
    return forward


README = os.path.join(ROOT, "README.md")


def test_the_readme_example_passes_for_hf_transformers():
    # The README's complete property test, run as written: HF transformers against npllama.
    code = re.search(r"```python\n(# test_against_npllama\.py.*?)```", open(README).read(), re.S).group(1)
    # Compiled under a name of its own whose lines are the snippet's: under "README.md",
    # hypothesis's inspect.getsource would read the whole README's lines at the snippet's numbers.
    name = "<README.md: test_against_npllama.py>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    namespace = {}
    exec(compile(code, name, "exec"), namespace)
    namespace["test_hf_llama_matches_npllama"]()


def meta_scaling(checkpoint):
    # Meta's reference hard-codes Llama 3.1's scaling constants
    a = checkpoint[0]
    return not a.use_scaled_rope or (a.rope_scaling_factor, a.original_max_position_embeddings) == (8, 8192)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(checkpoints().filter(meta_scaling), data_tokens())
def test_meta_reference_agrees_with_npllama_in_float32_and_bf16(checkpoint, tokens_for):
    args, weights = checkpoint
    tokens = tokens_for(args)
    check_against_reference(lambda t: meta_logits(meta_model(args, weights), t), args, weights, tokens)
    check_against_reference(lambda t: meta_logits(meta_model(args, weights, torch.bfloat16), t), args, weights,
                            tokens, dtype="bfloat16")


# A property that must fail: every example is generated (derandomized, so the same ones each
# run), none is shrunk (the first failure is enough and shrinking would rebuild many models).
MUST_FAIL = settings(deadline=None, max_examples=20, derandomize=True, database=None, phases=[Phase.generate],
                     suppress_health_check=list(HealthCheck))


def test_a_wrong_rope_pairing_is_caught():
    @MUST_FAIL
    @given(checkpoints(), data_tokens())
    def prop(checkpoint, tokens_for):
        args, weights = checkpoint
        check_against_reference(hf_forward(args, weights, keep_meta_qk=True), args, weights, tokens_for(args))
    # position 0 is never rotated, so the first difference is at 1 or later
    with pytest.raises(AssertionError, match=r"logits part at position [1-9]"):
        prop()


def test_a_wrong_rms_norm_eps_is_caught():
    @MUST_FAIL
    @given(checkpoints(), data_tokens())
    def prop(checkpoint, tokens_for):
        args, weights = checkpoint
        # an implementation that hard-codes the other common eps instead of reading the config
        wrong = {"rms_norm_eps": 1e-6 if args.norm_eps == 1e-5 else 1e-5}
        check_against_reference(hf_forward(args, weights, wrong), args, weights, tokens_for(args))
    with pytest.raises(AssertionError, match="logits part at position 0"):
        prop()


def test_the_report_names_the_first_position_and_the_error():
    args = small_args()
    w = random_weights(args, seed=2)
    tokens = np.arange(10) * 7 % args.vocab_size
    ours = Transformer(args, w).forward(tokens)
    assert np.array_equal(check_against_reference(lambda t: ours.copy(), args, w, tokens), ours)
    bent = ours.copy()
    bent[3:, 5] += 1e-3 * np.abs(ours[3]).max()
    with pytest.raises(AssertionError, match=r"position 3 \(token 21\).*1\.00e-03 of the logit scale.*"
                                             r"positions 0\.\.2 agree.*7 of 10 positions outside"):
        check_against_reference(lambda t: bent, args, w, tokens)
    check_against_reference(lambda t: bent, args, w, tokens, rtol=2e-3)    # within a looser tolerance
    nan = ours.copy()
    nan[0, 0] = np.nan
    with pytest.raises(AssertionError, match="position 0"):
        check_against_reference(lambda t: nan, args, w, tokens)
    with pytest.raises(AssertionError, match=r"shape \(10, 96\), expected \(10, 97\)"):
        check_against_reference(lambda t: ours[:, :96], args, w, tokens)


def test_strategies_cover_what_they_claim():
    # Each is found among 100 derandomized examples, or find() raises; the first one found
    # will do (no shrinking).
    budget = settings(max_examples=100, derandomize=True, database=None, phases=[Phase.generate])

    def some(strategy, condition):
        return find(strategy, condition, settings=budget)
    some(model_args(), lambda a: a.n_heads // a.n_kv_heads == 8)
    some(model_args(), lambda a: a.head_dim == 128)
    some(model_args(), lambda a: a.use_scaled_rope and a.original_max_position_embeddings == 16)
    some(model_args(), lambda a: not a.use_scaled_rope and a.ffn_dim_multiplier is not None)
    assert some(model_args(rope_scaling=False), lambda a: True).use_scaled_rope is False
    some(checkpoints(max_vocab=16), lambda c: "output.weight" not in c[1])
    args, w = some(checkpoints(max_vocab=16), lambda c: "output.weight" in c[1])
    assert all(v.dtype == np.float32 for v in w.values()) and set(w) <= set(Transformer(args, w).weights)
    some(checkpoints(max_vocab=16), lambda c: np.abs(c[1]["tok_embeddings.weight"]).max() < 0.1)
    f = some(data_tokens(), lambda f: len(f(small_args(vocab_size=5))) > 3)
    ids = f(small_args(vocab_size=5, max_seq_len=2))
    assert len(ids) == 2 and ids.dtype == np.int64 and ids.max() < 5


def test_without_hypothesis_the_strategies_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'npllama[testing]'")):
        checkpoints()
    args = small_args()
    state, config = to_hf(args, random_weights(args))      # the rest works without it
    assert config["vocab_size"] == 97 and "lm_head.weight" in state


def test_the_extras_are_imported_only_when_used():
    import subprocess
    code = ("import sys, npllama, npllama.testing, npllama.inspect.plot, npllama.inspect.perplexity, npllama.cli; "
            "print(sorted(m for m in ('hypothesis', 'matplotlib', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
