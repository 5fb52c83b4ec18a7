"""Property-test another Llama 3 implementation against npllama.

    from hypothesis import given, settings
    from npllama.testing import check_against_reference, checkpoints, chunk_schedules, data_tokens

    @settings(deadline=None)
    @given(checkpoints(), data_tokens(), chunk_schedules())
    def test_my_llama(checkpoint, tokens_for, chunks):
        args, weights = checkpoint                 # npllama.ModelArgs, Meta-named float32 arrays
        # my_forward(args, weights) -> forward(tokens, start_pos), keeping its own KV cache
        check_against_reference(my_forward(args, weights), args, weights, tokens_for(args), chunks=chunks)

The strategies need hypothesis (pip install 'npllama[testing]'); random_weights, to_hf and
check_against_reference do not. The README's "Testing another implementation" has a
complete example against HF transformers.
"""
from __future__ import annotations

import numpy as np

from .model.config import ModelArgs
from .errors import MissingDependencyError, NpllamaError, UsageError
from .model.model import Transformer
from .model.weights import as_float32, expected_shapes
from .inspect import locate
from .inspect.compare import compare, normalise
from .inspect.namemaps import rename
from .inspect.tracefile import schedule, stitch, trace
from .io.formats.names import meta_to_hf, meta_to_hf_qk


def _strategies():
    try:
        from hypothesis import strategies as st
    except ImportError:
        raise MissingDependencyError("npllama.testing's strategies need hypothesis: "
                                     "pip install 'npllama[testing]'") from None
    return st


# --- weights ---------------------------------------------------------------------------

def random_weights(args: ModelArgs, seed: int = 0, tied: bool = False,
                   embedding_scale: float = 1.0) -> dict[str, np.ndarray]:
    """float32 weights under Meta's names, scaled like a trained model's (unit-variance
    activations), so every layer matters to the logits. tied leaves out output.weight.
    embedding_scale < 1 gives the small embeddings of real checkpoints (Llama 3's are
    ~0.01): RMSNorm's eps then matters, so a wrong eps shows."""
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(args).items():
        if tied and name == "output.weight":
            continue
        if len(shape) == 1:
            w[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "tok_embeddings.weight":
            w[name] = (embedding_scale * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return w


# --- strategies ------------------------------------------------------------------------

def model_args(max_layers: int = 2, max_dim: int = 256, max_vocab: int = 512, max_seq_len: int = 64,
               rope_scaling: bool | None = None):
    """ModelArgs of small models that still cover what differs between real ones: GQA ratios
    1-8, head_dim 8-128, Meta's FFN width rule with and without ffn_dim_multiplier, both
    norm eps, rope theta 1e4 and 5e5, and Llama 3.1 rope scaling (rope_scaling: None draws
    it on or off) with factors and a pre-scaling context short enough to matter within
    max_seq_len tokens."""
    st = _strategies()

    @st.composite
    def build(draw):
        head_dim = draw(st.sampled_from([h for h in (8, 16, 32, 64, 128) if h <= max_dim] or [8]))
        n_kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if k * head_dim <= max_dim] or [1]))
        n_heads = n_kv_heads * draw(st.sampled_from([r for r in (1, 2, 4, 8) if r * n_kv_heads * head_dim <= max_dim]
                                                    or [1]))
        scaled = draw(st.booleans()) if rope_scaling is None else rope_scaling
        kw = dict(dim=n_heads * head_dim, n_layers=draw(st.integers(1, max_layers)), n_heads=n_heads,
                  n_kv_heads=n_kv_heads, vocab_size=draw(st.integers(2, max_vocab)),
                  multiple_of=draw(st.sampled_from([16, 32, 64])),
                  ffn_dim_multiplier=draw(st.sampled_from([None, 1.3, 1.5])),
                  norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
                  rope_theta=draw(st.sampled_from([10000.0, 500000.0])), max_seq_len=max_seq_len)
        if scaled:
            kw.update(use_scaled_rope=True, rope_scaling_factor=draw(st.sampled_from([8.0, 32.0])),
                      low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=draw(st.sampled_from([16, 64, 8192])))
        return ModelArgs(**kw)

    return build()


class Checkpoint(tuple):
    """(args, weights), shown as how it was drawn (what hypothesis prints for a failing
    example): random_weights(args, seed, tied, embedding_scale) rebuilds the weights."""

    def __new__(cls, args: ModelArgs, seed: int, tied: bool, embedding_scale: float):
        self = super().__new__(cls, (args, random_weights(args, seed, tied, embedding_scale)))
        self.seed, self.tied, self.embedding_scale = seed, tied, embedding_scale
        return self

    def __repr__(self):
        return f"Checkpoint({self[0]!r}, seed={self.seed}, tied={self.tied}, embedding_scale={self.embedding_scale})"


def checkpoints(**model_args_kwargs):
    """(args, weights): model_args() with random_weights(), tied and untied heads, trained-like
    and small embeddings. Weights are float32 arrays under Meta's names, in Meta's
    interleaved RoPE layout (to_hf gives HF's)."""
    st = _strategies()
    return st.builds(Checkpoint, model_args(**model_args_kwargs), st.integers(0, 2**32 - 1), st.booleans(),
                     st.sampled_from([1.0, 0.01]))


def chunk_schedules(max_calls: int = 4, max_chunk: int = 8):
    """Schedules for check_against_reference's chunks: up to max_calls prefill chunks of 1 to
    max_chunk tokens, the rest of the tokens as decode steps (tracefile.schedule). They
    shrink toward (1,): every token its own call."""
    st = _strategies()
    return st.lists(st.integers(1, max_chunk), min_size=1, max_size=max_calls).map(tuple)


class TokensFor:
    """args -> token ids (1-D int64): the drawn integers modulo args.vocab_size, at most
    args.max_seq_len of them."""

    def __init__(self, draws: list[int]):
        self.draws = draws

    def __call__(self, args: ModelArgs) -> np.ndarray:
        return np.array(self.draws[:args.max_seq_len], dtype=np.int64) % args.vocab_size

    def __repr__(self):
        return f"TokensFor({self.draws})"


def data_tokens(min_len: int = 1, max_len: int = 64):
    """A function args -> token ids (a TokensFor). Draws shrink toward short sequences of
    token 0."""
    st = _strategies()
    return st.lists(st.integers(0, 2**31 - 1), min_size=min_len, max_size=max_len).map(TokensFor)


# --- HF transformers' layout -------------------------------------------------------------

def to_hf(args: ModelArgs, weights: dict) -> tuple[dict[str, np.ndarray], dict]:
    """The same model for HF transformers: (state dict of float32 numpy arrays under
    LlamaForCausalLM's names, keyword arguments for transformers.LlamaConfig). q/k are
    permuted into HF's rotate-half layout; a tied head (no output.weight) is given as
    lm_head.weight too, so a strict load_state_dict accepts the dict either way."""
    return dict(hf_tensors(args, weights)), hf_config(args, tied="output.weight" not in weights)


def hf_tensors(args: ModelArgs, weights: dict):
    """to_hf's state dict one (name, float32 array) at a time, so that a large model can be
    copied into torch without a second whole copy of it in numpy."""
    for name, x in weights.items():
        x = as_float32(name, x)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            x = meta_to_hf_qk(x, args.n_heads if name.endswith("wq.weight") else args.n_kv_heads)
        yield meta_to_hf(name), np.ascontiguousarray(x, dtype=np.float32)
        if name == "tok_embeddings.weight" and "output.weight" not in weights:
            yield "lm_head.weight", np.ascontiguousarray(x, dtype=np.float32)


def hf_config(args: ModelArgs, tied: bool) -> dict:
    """to_hf's keyword arguments for transformers.LlamaConfig."""
    rope_scaling, max_positions = None, args.max_seq_len
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                        "low_freq_factor": args.low_freq_factor, "high_freq_factor": args.high_freq_factor,
                        "original_max_position_embeddings": args.original_max_position_embeddings}
        # HF checks that the scaled context exceeds the original one; it changes no number.
        max_positions = max(max_positions, int(args.original_max_position_embeddings * args.rope_scaling_factor))
    # rope_theta/rope_scaling: the names transformers 4 takes, and 5 converts to rope_parameters.
    return dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                rope_scaling=rope_scaling, max_position_embeddings=max_positions, tie_word_embeddings=tied,
                bos_token_id=None, eos_token_id=None)   # HF's defaults (1, 2) may not exist in a small vocabulary


# --- the check -----------------------------------------------------------------------------

# float32: npllama agrees with HF transformers and Meta's reference to ~5e-7 of the logit
# scale (tests/model/test_model.py); 1e-5 leaves room for summation order over a few layers and none
# for a wrong operation (those show as 1e-3 or more). bfloat16: 2^-6 of the logit scale, two
# bf16 ulps at that scale rounded down to a power of two (npllama is within 1.5 of Meta's own
# bf16 run); a missing or extra rounding shows as many more.
DEFAULT_RTOL = {"float32": 1e-5, "bfloat16": 2.0 ** -6}


def check_against_reference(forward, args: ModelArgs, weights: dict, tokens, dtype: str = "float32",
                            rtol: float | None = None, chunks=None, trace_hook=None) -> np.ndarray:
    """Run `tokens` through npllama (numerics `dtype`) and through the implementation under
    test. chunks None: one call `forward(tokens) -> logits (T, vocab)` from position 0.
    chunks (e.g. (3, 1, 1); tracefile.schedule): `forward(part, start_pos)` once per call of
    the schedule, Meta's signature, the implementation keeping its own KV cache; each call's
    logits (t, vocab) or (1, t, vocab) are checked at their absolute positions, against
    npllama run through its cache the same way. Raises AssertionError naming the first
    position whose logits part (and, with chunks, the call it was in): max |theirs -
    npllama| over the vocabulary above rtol times that position's logit scale
    (logit_scale). trace_hook: a function returning the intermediates the implementation
    recorded since it was last called (npllama.inspect.hooks.TorchHooks.take), called after
    each forward call; a failure then also names the first diverging tensor and where
    (npllama.inspect.compare). Returns npllama's logits."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if dtype not in DEFAULT_RTOL:
        raise UsageError(f"dtype must be one of {', '.join(DEFAULT_RTOL)}, got {dtype!r:.40}")
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.number)) or not np.isfinite(rtol) or rtol < 0:
        raise UsageError(f"rtol must be a finite number >= 0, got {rtol!r:.40}")
    model = Transformer(args, weights, dtype=dtype, max_seq_len=max(args.max_seq_len, len(tokens)))
    # without a hook: tokens, embeddings, norm, logits only
    tr = trace(model, tokens, layers=None if trace_hook else [], chunks=chunks)
    ours = tr["logits"].astype(np.float64)
    steps, parts, recorded = schedule(len(tokens), chunks), [], []
    for k, (s, n) in enumerate(steps):   # each call's results copied now: a port may reuse its buffers
        parts.append(their_logits(forward(tokens) if chunks is None else forward(tokens[s:s + n], s), n,
                                  ours.shape[1], f"call {k + 1} of {len(steps)}"))
        recorded += [snapshot(trace_hook())] if trace_hook else []
    theirs = np.concatenate(parts)
    err = np.abs(theirs - ours).max(axis=-1)
    err = np.where(np.isnan(err), np.inf, err)                 # NaN anywhere is a failure
    head = weights.get("output.weight", weights["tok_embeddings.weight"])
    scale = logit_scale(ours, tr["norm"], as_float32("output.weight", head))
    bad = np.nonzero(err > rtol * scale)[0]
    if len(bad):
        t = int(bad[0])
        k, (s, n) = next((k, st) for k, st in enumerate(steps) if st[0] <= t < st[0] + st[1])
        call = f", in call {k + 1} of {len(steps)} (start_pos {s}, {n} tokens)" if chunks is not None else ""
        agree = f"positions 0..{t - 1} agree (max {float((err / scale)[:t].max()):.2e})" if t else "from the first"
        raise AssertionError(
            f"logits part at position {t} (token {int(tokens[t])}){call}: max |yours - npllama| = {err[t]:.3e}, "
            f"{err[t] / scale[t]:.2e} of the logit scale {scale[t]:.3g} (rtol {rtol:g}, {dtype}); {agree}; "
            f"{len(bad)} of {len(tokens)} positions outside" + (hook_divergence(recorded, tr, steps, rtol)
                                                                 if trace_hook else ""))
    return ours.astype(np.float32)


def hook_divergence(recorded: list[dict], ours: dict, steps: list[tuple[int, int]], rtol: float) -> str:
    """first_divergence, or, when the hook's recordings cannot be stitched or compared, a note
    saying why: the logits' failure is the finding, and must not be hidden by the hook's."""
    try:
        return first_divergence(recorded, ours, steps, rtol)
    except (NpllamaError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        return f"; the trace_hook's recording could not be used ({type(e).__name__}: {str(e)[:200]})"


def first_divergence(recorded: list[dict], ours: dict, steps: list[tuple[int, int]], rtol: float) -> str:
    """The first tensor where the implementation's recorded steps, stitched at their
    positions, leave npllama's trace (each step renamed by its name map and put in
    npllama's layout first), and where its largest error is."""
    parts, meta = [], {}
    for (s, n), tr in zip(steps, recorded):
        tr, _, _ = rename(tr, tr.get("__meta__", {}).get("names"))
        meta = {k: v for k, v in tr.pop("__meta__", {}).items() if k != "names"}
        rows = {name: ours[name][:, s:s + n, :s + n] if locate.kind(name) in locate.SCORES else ours[name][s:s + n]
                for name in tr if name in ours}
        parts.append((s, {name: normalise(x, rows[name], name)[0] for name, x in tr.items() if name in rows}))
    theirs = stitch(parts, steps[-1][0] + steps[-1][1])
    theirs["__meta__"] = meta
    rep = compare(theirs, ours, rtol=rtol, allow_missing=True, allow_unknown=True)
    if rep.first is None:
        return f"; the {len(rep.rows)} recorded tensors all agree"
    s = next(r[1] for r in rep.rows if r[0] == rep.first)
    where = f" at {locate.describe_where(s['where'])}" if s is not None else ""
    hints = "".join(f"; {h}" for h in ([s["heads"]] if s and s["heads"] else []) + (s["hints"] if s else []))
    return f"; first diverging tensor: {rep.first}{where}{hints}"


def snapshot(recording):
    """A hook's recording with each array (or torch tensor) copied, so a later call that
    writes into the same buffers does not change what this call recorded."""
    if not isinstance(recording, dict):
        return recording
    return {k: v.detach().clone() if hasattr(v, "detach") else np.array(v, copy=True) if isinstance(v, np.ndarray)
            else v for k, v in recording.items()}


def their_logits(x, n: int, vocab: int, call: str = "the call") -> np.ndarray:
    """One call's logits as a float64 copy (n, vocab): a torch tensor (without importing
    torch) or an array of real numbers, with or without a batch axis of one. Complex, bool
    and object logits are refused, not cast."""
    if hasattr(x, "detach"):
        if getattr(x, "is_complex", lambda: False)() or str(getattr(x, "dtype", "")) == "torch.bool":
            raise UsageError(f"forward's logits in {call} are {x.dtype}, not real numbers")
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise UsageError(f"forward's logits in {call} have dtype {x.dtype}, not real numbers")
    x = np.array(x, dtype=np.float64, copy=True)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.shape != (n, vocab):
        raise AssertionError(f"logits have shape {x.shape}, expected {(n, vocab)} (tokens, vocab)")
    return x


def logit_scale(logits: np.ndarray, h: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Per position, the size float32 errors in the logits are relative to: the largest
    |logit|, or, where the logits cancel to near zero (a tiny vocabulary, small
    embeddings), the size of a typical logit before cancelling, ||h|| * rms(head)."""
    typical = np.linalg.norm(h.astype(np.float64), axis=-1) * np.sqrt(np.mean(np.square(head, dtype=np.float64)))
    return np.maximum(np.maximum(np.abs(logits).max(axis=-1), typical), np.finfo(np.float32).tiny)
