"""The Llama 3 Transformer: Meta's reference model.py over NumPy arrays, with a KV cache.

Attention, FeedForward and TransformerBlock mirror Meta's classes. How weights are held
(bf16 widening, fused and transposed copies, tiles) is the weight store's business
(npllama/model/weights.py); what is recorded for a trace is the observer's (npllama/model/observer.py):
the blocks report every intermediate to `record` and do not know whether anyone listens.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

import numpy as np

from . import bf16, ggml, memory
from .config import ModelArgs
from ..errors import UsageError
from .ops import apply_rotary_emb, blocked_attention, identity, precompute_freqs_cis, rms_norm, swiglu
from .observer import IGNORE, recorder
from .weights import Weights

DTYPES = ("float32", "bfloat16", "llama.cpp")


def _to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _from_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


class Attention:
    """Grouped-query attention over this layer's slice of the KV cache."""

    def __init__(self, layer_id: int, args: ModelArgs, weights: Weights, cache_k: np.ndarray, cache_v: np.ndarray):
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.weights, self.rnd = weights, weights.rnd
        p = f"layers.{layer_id}.attention."
        self.wqkv = (p + "wq.weight", p + "wk.weight", p + "wv.weight")
        self.wo = p + "wo.weight"
        self.cache_k, self.cache_v = cache_k, cache_v      # (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # A bf16 cache (bfloat16 numerics) holds bit patterns: the keys and values are bf16 already.
        # An f16 one (llama.cpp numerics) rounds them, as llama.cpp's does.
        self.to_cache, self.from_cache = {np.dtype(np.uint16): (bf16.to_bits, bf16.from_bits),
                                          np.dtype(np.float16): (_to_f16, _from_f16)}.get(cache_k.dtype,
                                                                                           (identity, identity))
        self.queries = ggml.queries if weights.ggml else identity   # from the numerics, as the norm is

    def __call__(self, x: np.ndarray, start_pos, freqs_cis: np.ndarray, record=IGNORE, rows=None) -> np.ndarray:
        B, T, _ = x.shape
        xq, xk, xv = self.weights.fused(x, self.wqkv)
        xq = xq.reshape(B, T, self.n_heads, self.head_dim)
        xk = xk.reshape(B, T, self.n_kv_heads, self.head_dim)
        xv = xv.reshape(B, T, self.n_kv_heads, self.head_dim)
        record(q=xq, k=xk, v=xv)
        xq = apply_rotary_emb(xq, freqs_cis, self.rnd)
        xk = apply_rotary_emb(xk, freqs_cis, self.rnd)
        record(q_rotated=xq, k_rotated=xk)
        xq = self.queries(xq)
        if rows is not None:
            output = self.attend_rows(xq, xk, xv, start_pos, rows)
        else:
            self.cache_k[:B, start_pos:start_pos + T] = self.to_cache(xk)
            self.cache_v[:B, start_pos:start_pos + T] = self.to_cache(xv)
            keys = self.from_cache(self.cache_k[:B, :start_pos + T])  # (B, S, n_kv_heads, head_dim)
            values = self.from_cache(self.cache_v[:B, :start_pos + T])
            # record.sink is None unless tracing: attention then keeps no (T, S) tensors for it.
            output = blocked_attention(xq, keys, values, start_pos, self.rnd, record.sink)  # (B, T, n_heads * head_dim)
        out = self.weights.linear(output, self.wo)
        record(attention=output, attention_out=out)
        return out

    def attend_rows(self, xq, xk, xv, start_pos, rows) -> np.ndarray:
        """Row b is a sequence of its own, in cache row rows[b] at positions start_pos[b]..:
        each attends to its own cached keys (different lengths), one row at a time, exactly
        as that sequence alone (B=1) would. xq (B, T, n_heads, head_dim) -> (B, T, n_heads * head_dim)."""
        B, T = xq.shape[:2]
        out = np.empty((B, T, self.n_heads * self.head_dim), np.float32)
        for b, (row, pos) in enumerate(zip(rows, start_pos)):
            self.cache_k[row, pos:pos + T] = self.to_cache(xk[b])
            self.cache_v[row, pos:pos + T] = self.to_cache(xv[b])
            keys = self.from_cache(self.cache_k[row:row + 1, :pos + T])   # (1, pos + T, n_kv_heads, head_dim)
            values = self.from_cache(self.cache_v[row:row + 1, :pos + T])
            out[b] = blocked_attention(xq[b:b + 1], keys, values, int(pos), self.rnd)[0]
        return out


class FeedForward:
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, layer_id: int, weights: Weights):
        self.weights, self.rnd = weights, weights.rnd
        p = f"layers.{layer_id}.feed_forward."
        self.w13 = (p + "w1.weight", p + "w3.weight")
        self.w2 = p + "w2.weight"

    def __call__(self, x: np.ndarray, record=IGNORE) -> np.ndarray:
        h1, h3 = self.weights.fused(x, self.w13)              # (B, T, ffn_dim) each
        out = self.weights.linear(swiglu(h1, h3, self.rnd), self.w2)
        record(w1=h1, w3=h3, ffn_out=out)
        return out


def ways_to_a_longer_context(max_seq_len: int, trained: int) -> str:
    """What every context-overflow error ends with: how to get out of it."""
    if max_seq_len < trained:
        return (f"give a shorter prompt, or a longer context: --ctx N, up to the "
                f"{trained:,} tokens the model was trained for")
    return (f"give a shorter prompt, or --ctx N --force-ctx to run past the {trained:,} "
            "tokens the model was trained for (quality degrades)")


class TransformerBlock:
    """One layer: pre-norm attention and feed-forward, each added to the residual."""

    def __init__(self, layer_id: int, args: ModelArgs, weights: Weights, cache_k: np.ndarray, cache_v: np.ndarray):
        self.layer_id, self.norm_eps = layer_id, args.norm_eps
        self.weights, self.rnd = weights, weights.rnd
        self.attention = Attention(layer_id, args, weights, cache_k, cache_v)
        self.feed_forward = FeedForward(layer_id, weights)
        self.attention_norm = f"layers.{layer_id}.attention_norm.weight"
        self.ffn_norm = f"layers.{layer_id}.ffn_norm.weight"

    def rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        # looked up when called, so that a profiler's patch of model.rms_norm sees every call
        return (ggml.rms_norm if self.weights.ggml else rms_norm)(x, weight, self.norm_eps, self.rnd)

    def __call__(self, x: np.ndarray, start_pos, freqs_cis: np.ndarray, record=IGNORE, rows=None) -> np.ndarray:
        w, rnd = self.weights.weight, self.rnd
        x_norm = self.rms_norm(x, w(self.attention_norm))
        record(attention_norm=x_norm)
        h = rnd(x + self.attention(x_norm, start_pos, freqs_cis, record, rows))
        h_norm = self.rms_norm(h, w(self.ffn_norm))
        record(h=h, ffn_norm=h_norm)
        out = rnd(h + self.feed_forward(h_norm, record))
        record(out=out)
        return out


class Transformer:
    """Llama 3 with a preallocated KV cache.

    weights: Meta's tensor names -> arrays. dtype: "float32" computes everything in float32;
    "bfloat16" reproduces a PyTorch bf16 run of Meta's reference (see README, Numerics);
    "llama.cpp" what llama.cpp's CPU backend computes on a GGUF's own blocks (QuantTensors):
    activations quantized per weight type, an f16 KV cache (npllama.model.ggml).
    weights_mode: how weights are held (weights.choose_mode); the numerics are the same.
    max_seq_len: the context; by default the longest that fits in memory, up to the trained
    context (npllama.memory). prefill_chunk: longer prompts go through the KV cache this
    many tokens at a time.
    layers: a pipeline stage holds only these layers' weights and KV cache (with the
    embeddings if it holds the first, the head if it holds the last); forward_stage runs it.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, np.ndarray], dtype: str = "float32",
                 max_seq_len: int | None = None, max_batch_size: int = 1, weights_mode: str = "auto",
                 prefill_chunk: int = memory.PREFILL_CHUNK, layers: range | None = None):
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.args, self.dtype = args, dtype
        for name, n in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size),
                        ("prefill_chunk", prefill_chunk)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
                raise UsageError(f"{name} must be a positive integer, got {n!r}")
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.held = range(args.n_layers) if layers is None else layers
        if not (isinstance(self.held, range) and self.held.step == 1
                and 0 <= self.held.start < self.held.stop <= args.n_layers):
            raise UsageError(f"layers must be a range of at least one of the {args.n_layers} layers, got {layers!r}")
        self.rnd = bf16.round if dtype == "bfloat16" else identity
        self.weights = Weights(args, weights, self.rnd, weights_mode, self.held, llama_cpp=dtype == "llama.cpp")
        self.weights_mode = self.weights.mode
        self.output = "output.weight" if "output.weight" in self.weights else "tok_embeddings.weight"  # tied head
        # Checked before anything is allocated: a context that cannot fit is an error now,
        # not the OOM killer later.
        # A pipeline stage needs memory for its own layers only (and embeddings and head, counted
        # in every stage: an overestimate by at most those).
        held_args = args if len(self.held) == args.n_layers else replace(args, n_layers=len(self.held))
        self.max_seq_len = memory.choose_context(held_args, max_seq_len, memory.available_memory(), max_batch_size, dtype,
                                                 self.weights_mode, prefill_chunk, self.weights.stored_bytes)
        scaling = None
        if args.use_scaled_rope:
            scaling = dict(factor=args.rope_scaling_factor, low_freq_factor=args.low_freq_factor,
                           high_freq_factor=args.high_freq_factor,
                           original_max_position_embeddings=args.original_max_position_embeddings)
        self.freqs_cis = precompute_freqs_cis(args.head_dim, self.max_seq_len, args.rope_theta, scaling)
        cache_shape = (len(self.held), self.max_batch_size, self.max_seq_len, args.n_kv_heads, args.head_dim)
        # np.zeros is lazily backed by the OS, so an unused long context costs no memory.
        # bfloat16 numerics hold it as bf16 bits, as Meta's bf16 model holds it.
        cache_dtype = {"bfloat16": np.uint16, "llama.cpp": np.float16}.get(dtype, np.float32)
        self.cache_k = np.zeros(cache_shape, dtype=cache_dtype)
        self.cache_v = np.zeros(cache_shape, dtype=cache_dtype)
        self.layers = [TransformerBlock(i, args, self.weights, self.cache_k[j], self.cache_v[j])
                       for j, i in enumerate(self.held)]

    @property
    def _ready(self) -> dict:
        return self.weights._ready

    def weight(self, name: str) -> np.ndarray:
        """A weight in compute form (float32; bf16-rounded in bfloat16 numerics)."""
        return self.weights.weight(name)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B, T) -> their embedding rows (B, T, dim)."""
        return self.weights.rows("tok_embeddings.weight", tokens)

    def forward_layers(self, h: np.ndarray, start_pos, start: int = 0, stop: int | None = None,
                       record=IGNORE, rows=None) -> np.ndarray:
        """Layers [start, stop) on hidden states h (B, T, dim) at positions start_pos..
        start_pos+T-1, filling their part of the KV cache -> hidden states (B, T, dim).
        rows (B,) ints: row b is its own sequence in cache row rows[b], at its own position
        start_pos[b] ((B,) ints): continuous batching (npllama/serve)."""
        B, T, _ = h.shape
        if rows is None:
            self.check_positions(B, T, start_pos)
        else:
            rows, start_pos = self.check_rows(B, T, start_pos, rows)
        stop = self.args.n_layers if stop is None else stop
        if not self.held.start <= start <= stop <= self.held.stop:
            raise UsageError(f"layers {start}..{stop - 1} asked of a model holding layers "
                             f"{self.held.start}..{self.held.stop - 1}")
        if T > self.prefill_chunk and not record.whole_pass:
            # A long prompt goes through the KV cache a chunk at a time: each chunk attends to
            # every position before it, and the activations stay (chunk, ffn_dim).
            n = self.prefill_chunk
            return np.concatenate([self.forward_layers(h[:, s:s + n], start_pos + s, start, stop, rows=rows)
                                   for s in range(0, T, n)], axis=1)
        if rows is None:
            freqs_cis = self.freqs_cis[start_pos:start_pos + T]       # (T, head_dim // 2)
        else:
            freqs_cis = self.freqs_cis[start_pos[:, None] + np.arange(T)]  # (B, T, head_dim // 2)
        for layer in self.layers[start - self.held.start:stop - self.held.start]:
            h = layer(h, start_pos, freqs_cis, record.layer(layer.layer_id), rows)
        return h

    def head(self, h: np.ndarray, record=IGNORE) -> np.ndarray:
        """Final norm and output projection: h (B, T, dim) -> float32 logits (B, T, vocab)."""
        h = self.layers[0].rms_norm(h, self.weights.weight("norm.weight"))     # the layers' norm, and eps
        logits = self.weights.linear(h, self.output)
        record(norm=h, logits=logits)
        return logits

    def forward(self, tokens, start_pos: int = 0, trace: dict | None = None,
                last_only: bool = False) -> np.ndarray:
        """tokens (T,) or (B, T) ints -> float32 logits (T, vocab) or (B, T, vocab).

        Positions start_pos .. start_pos+T-1; the cache must hold positions < start_pos from
        earlier calls. last_only returns only the last position's logits, (vocab,) or (B, vocab).
        More than prefill_chunk tokens go through the cache in chunks of that many (a traced
        pass runs as one: a trace records whole tensors).
        trace, when a dict, receives every intermediate under the names of the Trace format
        (or give a tracing.Recorder).
        """
        tokens = np.asarray(tokens)
        self.check_tokens(tokens, start_pos)
        if len(self.held) != self.args.n_layers:
            raise UsageError(f"this model holds layers {self.held.start}..{self.held.stop - 1} of "
                             f"{self.args.n_layers}: a pipeline stage runs with forward_stage")
        single = tokens.ndim == 1
        tokens = tokens.reshape(-1, tokens.shape[-1])                  # (B, T)
        logits = self.forward_stage(tokens, start_pos, recorder(trace, squeeze=single), last_only)
        if last_only:
            logits = logits[:, 0]                                     # (B, vocab)
        return logits[0] if single else logits

    __call__ = forward

    def forward_stage(self, x: np.ndarray, start_pos, record=IGNORE, last_only: bool = False,
                      rows=None) -> np.ndarray:
        """The part of the forward pass this model holds: x is tokens (B, T) if it holds the
        first layer (they are embedded), else hidden states (B, T, dim); then its layers; then,
        if it holds the last layer, the head -> logits (B, T, vocab), or (B, 1, vocab) with
        last_only; else hidden states (B, T, dim) for the next stage. A whole model is one stage."""
        h = x
        if self.held.start == 0:
            h = self.embed(x)                                         # (B, T, dim)
            record(tokens=x, token_embeddings=h)
        h = self.forward_layers(h, start_pos, self.held.start, self.held.stop, record, rows)
        if self.held.stop < self.args.n_layers:
            return h
        return self.head(h[:, -1:] if last_only else h, record)      # (B, T or 1, vocab)

    def check_tokens(self, tokens: np.ndarray, start_pos: int) -> None:
        """tokens (T,) or (B, T): integer ids in the vocabulary, positions within the cache."""
        if tokens.ndim not in (1, 2) or tokens.size == 0:
            raise UsageError(f"tokens must have shape (T,) or (B, T) with B, T >= 1, got {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        self.check_positions(tokens.size // tokens.shape[-1], tokens.shape[-1], start_pos)
        if tokens.min() < 0 or tokens.max() >= self.args.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.args.vocab_size}), got {tokens.min()}..{tokens.max()}")

    def forward_rows(self, tokens, start_pos, rows, last_only: bool = True) -> np.ndarray:
        """Continuous batching: tokens (B, T) ints, row b a sequence of its own in cache row
        rows[b] at positions start_pos[b]..start_pos[b]+T-1 -> logits (B, vocab) with
        last_only, else (B, T, vocab). The projections run as one GEMM over all rows;
        attention runs row by row over each row's own cache (npllama/run/batching.py)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise UsageError(f"forward_rows takes tokens (B, T), got shape {tokens.shape}")
        self.check_tokens(tokens, 0)
        logits = self.forward_stage(tokens, start_pos, last_only=last_only, rows=rows)
        return logits[:, 0] if last_only else logits

    def copy_rows(self, src: int, dst: int, n: int) -> None:
        """Positions 0..n-1 of cache row src into cache row dst (a shared prompt prefix)."""
        self.check_rows(1, n, [0], [dst])
        self.check_rows(1, n, [0], [src])
        self.cache_k[:, dst, :n] = self.cache_k[:, src, :n]
        self.cache_v[:, dst, :n] = self.cache_v[:, src, :n]

    def check_rows(self, B: int, T: int, start_pos, rows) -> tuple[np.ndarray, np.ndarray]:
        """rows: B distinct cache rows; start_pos: B positions, each with T tokens in the context."""
        rows, start_pos = np.asarray(rows), np.asarray(start_pos)
        if rows.shape != (B,) or start_pos.shape != (B,) or not (np.issubdtype(rows.dtype, np.integer)
                                                                 and np.issubdtype(start_pos.dtype, np.integer)):
            raise UsageError(f"rows and start_pos must be {B} integers each, got shapes {rows.shape}, {start_pos.shape}")
        if len(set(rows.tolist())) != B or rows.min() < 0 or rows.max() >= self.max_batch_size:
            raise UsageError(f"rows must be distinct cache rows in [0, {self.max_batch_size}), got {rows.tolist()}")
        for pos in start_pos.tolist():
            self.check_positions(1, T, pos)
        return rows, start_pos

    def check_positions(self, B: int, T: int, start_pos: int) -> None:
        if B > self.max_batch_size:
            raise UsageError(f"a batch of {B} sequences exceeds the {self.max_batch_size} this model was made for")
        if not 0 <= start_pos or start_pos + T > self.max_seq_len:
            raise UsageError(f"positions {start_pos}..{start_pos + T - 1} exceed the context of {self.max_seq_len} "
                             f"tokens; {ways_to_a_longer_context(self.max_seq_len, self.args.max_seq_len)}")
