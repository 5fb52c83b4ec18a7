"""The Llama 3 Transformer: Meta's reference forward pass over NumPy arrays, with a KV cache."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from . import bf16, memory, tiled
from .config import ModelArgs
from .ops import apply_rotary_emb, blocked_attention, identity, precompute_freqs_cis, rms_norm, swiglu
from .tracing import wants

DTYPES = ("float32", "bfloat16")
WEIGHT_MODES = ("auto", "resident", "tiled")


from .errors import WeightError  # noqa: F401  (re-exported)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta's tensor names and shapes for `args` (output.weight is optional: tied head)."""
    hd, kv = args.head_dim, args.n_kv_heads
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, args.dim),
            p + "attention.wk.weight": (kv * hd, args.dim),
            p + "attention.wv.weight": (kv * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.ffn_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.ffn_dim),
            p + "feed_forward.w3.weight": (args.ffn_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


# Present in some of Meta's older checkpoints and recomputed here, so safe to ignore.
IGNORED_WEIGHTS = ("rope.freqs",)


WEIGHT_DTYPES = ("float32", "float16", "float64", "uint16", "bfloat16")


def check_dtype(name: str, w: np.ndarray) -> None:
    if w.dtype.name not in WEIGHT_DTYPES:
        raise WeightError(f"{name}: unsupported dtype {w.dtype} (expected float32, float16, float64 or bf16 as uint16)")


def as_float32(name: str, w) -> np.ndarray:
    """A weight as float32. uint16 (and ml_dtypes' bfloat16) arrays are bf16 bit patterns,
    widened exactly; float16/float64 are converted; float32 (memory maps too) is kept."""
    w = np.asarray(w)
    check_dtype(name, w)
    if w.dtype == np.uint16 or w.dtype.name == "bfloat16":
        return bf16.from_bits(w.view(np.uint16))
    return w.astype(np.float32, copy=False)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_weights_mode(weights: Mapping[str, np.ndarray], requested: str) -> str:
    """"resident": float32 copies made on first use (fastest, 4 bytes a weight).
    "tiled": bf16 weights stay bf16 and are widened a tile at a time (2 bytes a weight).
    "auto": tiled only when the float32 copies would not fit comfortably in memory."""
    if requested not in WEIGHT_MODES:
        raise ValueError(f"weights mode must be one of {WEIGHT_MODES}, got {requested!r}")
    has_bf16 = any(tiled.supported(w) for w in weights.values())
    if requested != "auto":
        return "tiled" if requested == "tiled" and has_bf16 else "resident"
    resident_bytes = sum(int(np.prod(w.shape)) * 4 for w in weights.values())
    return "tiled" if has_bf16 and resident_bytes > 0.6 * available_memory() else "resident"


class Transformer:
    """Llama 3 with a preallocated KV cache.

    weights: Meta's tensor names -> arrays. dtype: "float32" computes everything in float32;
    "bfloat16" reproduces a PyTorch bf16 run of Meta's reference (see README, Numerics).
    weights_mode: how bf16 weights are held (choose_weights_mode); the numerics are the same.
    max_seq_len: the context; by default the longest that fits in memory, up to the trained
    context (npllama.memory). prefill_chunk: longer prompts go through the KV cache this
    many tokens at a time.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, np.ndarray], dtype: str = "float32",
                 max_seq_len: int | None = None, max_batch_size: int = 1, weights_mode: str = "auto",
                 prefill_chunk: int = memory.PREFILL_CHUNK):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.args, self.dtype = args, dtype
        self.max_batch_size, self.prefill_chunk = int(max_batch_size), int(prefill_chunk)
        if (max_seq_len is not None and max_seq_len <= 0) or self.max_batch_size <= 0 or self.prefill_chunk <= 0:
            raise ValueError("max_seq_len, max_batch_size and prefill_chunk must be positive")
        self.rnd = bf16.round if dtype == "bfloat16" else identity
        self.weights = self._check_weights(weights)
        self.weights_mode = choose_weights_mode(self.weights, weights_mode)
        self._ready: dict[str, np.ndarray] = {}
        self.tied = "output.weight" not in weights
        # Checked before anything is allocated: a context that cannot fit is an error now,
        # not the OOM killer later.
        self.max_seq_len = memory.choose_context(args, max_seq_len and int(max_seq_len), available_memory(),
                                                 self.max_batch_size, dtype, self.weights_mode, self.prefill_chunk)
        scaling = None
        if args.use_scaled_rope:
            scaling = dict(factor=args.rope_scaling_factor, low_freq_factor=args.low_freq_factor,
                           high_freq_factor=args.high_freq_factor,
                           original_max_position_embeddings=args.original_max_position_embeddings)
        self.freqs_cis = precompute_freqs_cis(args.head_dim, self.max_seq_len, args.rope_theta, scaling)
        cache_shape = (args.n_layers, self.max_batch_size, self.max_seq_len, args.n_kv_heads, args.head_dim)
        # np.zeros is lazily backed by the OS, so an unused long context costs no memory.
        # bfloat16 numerics hold the cache as bf16 bits, as Meta's bf16 model does: the keys
        # and values are bf16 values already, so nothing is lost.
        cache_dtype = np.uint16 if dtype == "bfloat16" else np.float32
        self.cache_k = np.zeros(cache_shape, dtype=cache_dtype)
        self.cache_v = np.zeros(cache_shape, dtype=cache_dtype)

    def _check_weights(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Names, shapes and dtypes only: no weight data is read here, so a memory-mapped
        checkpoint stays on disk until a forward pass touches it."""
        shapes = expected_shapes(self.args)
        unknown = sorted(set(weights) - set(shapes) - set(IGNORED_WEIGHTS))
        if unknown:
            raise WeightError(f"unexpected tensors for these params: {', '.join(unknown[:5])}"
                              + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        out = {}
        for name, shape in shapes.items():
            if name not in weights:
                if name == "output.weight":
                    continue
                raise WeightError(f"missing tensor {name} (expected shape {shape})")
            w = weights[name]
            if tuple(w.shape) != shape:
                raise WeightError(f"{name}: shape {tuple(w.shape)} does not match the params' {shape}")
            check_dtype(name, w)
            out[name] = w
        return out

    def _compute_form(self, name: str) -> np.ndarray:
        w = as_float32(name, self.weights[name])
        # bf16 numerics hold bf16 weights, as a torch model in bf16 would.
        return self.rnd(w) if self.dtype == "bfloat16" else w

    def weight(self, name: str) -> np.ndarray:
        """A weight in compute form (float32; bf16-rounded in bfloat16 numerics), made on
        first use and kept."""
        w = self._ready.get(name)
        if w is None:
            w = self._ready[name] = self._compute_form(name)
        return w

    def project(self, x: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        """x (..., in) @ w.T for weights that read the same input, as one matmul (wq/wk/wv,
        w1/w3); each result (..., out_i) rounded as its own torch op would be."""
        x2 = x.reshape(-1, x.shape[-1])
        raw = [self.weights[n] for n in names]
        if self.weights_mode == "tiled" and all(tiled.supported(w) for w in raw):
            y = tiled.matmul(x2, raw)
        else:
            # Kept transposed, (in, sum out), contiguous: OpenBLAS runs x @ w_t ~7% faster
            # than x @ w.T, for GEMV (decode) and GEMM (prefill) alike.
            key = "T:" + "+".join(names)
            w_t = self._ready.get(key)
            if w_t is None:
                w_t = np.empty((x.shape[-1], sum(w.shape[0] for w in raw)), np.float32)
                col = 0
                for n, w in zip(names, raw):
                    w_t[:, col:col + w.shape[0]] = self._compute_form(n).T
                    col += w.shape[0]
                self._ready[key] = w_t
            y = x2 @ w_t
        out, col = [], 0
        for w in raw:
            out.append(self.rnd(y[:, col:col + w.shape[0]].reshape(*x.shape[:-1], w.shape[0])))
            col += w.shape[0]
        return out

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        # Gather the rows first: an untied model never needs the whole table in float32.
        name = "tok_embeddings.weight"
        if name in self._ready:
            return self._ready[name][tokens]
        rows = as_float32(name, self.weights[name][tokens])
        return self.rnd(rows) if self.dtype == "bfloat16" else rows

    def forward(self, tokens, start_pos: int = 0, trace: dict | None = None,
                last_only: bool = False) -> np.ndarray:
        """tokens (T,) or (B, T) ints -> float32 logits (T, vocab) or (B, T, vocab).

        Positions start_pos .. start_pos+T-1; the cache must hold positions < start_pos from
        earlier calls. last_only returns only the last position's logits, (vocab,) or (B, vocab).
        More than prefill_chunk tokens go through the cache in chunks of that many.
        trace, when a dict, receives every intermediate under the names of the Trace format
        (then the tokens run as one chunk, as a trace records whole tensors anyway).
        """
        tokens = np.asarray(tokens)
        single = tokens.ndim == 1
        if single:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (T,) or (B, T) with T >= 1, got {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        B, T = tokens.shape
        args, w, rnd = self.args, self.weight, self.rnd
        if B > self.max_batch_size:
            raise ValueError(f"batch of {B} exceeds max_batch_size={self.max_batch_size}")
        if not 0 <= start_pos or start_pos + T > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len={self.max_seq_len}")
        if tokens.min() < 0 or tokens.max() >= args.vocab_size:
            raise ValueError(f"token ids must be in [0, {args.vocab_size}), got {tokens.min()}..{tokens.max()}")
        if trace is None and T > self.prefill_chunk:
            # A long prompt goes through the KV cache a chunk at a time: every chunk attends
            # to all positions before it, and the activations stay (chunk, ffn_dim).
            n = self.prefill_chunk
            parts = [self.forward(tokens[:, s:s + n], start_pos + s, last_only=last_only) for s in range(0, T, n)]
            logits = parts[-1] if last_only else np.concatenate(parts, axis=1)
            return logits[0] if single else logits
        freqs_cis = self.freqs_cis[start_pos:start_pos + T]           # (T, head_dim // 2)
        hd, n_heads, n_kv = args.head_dim, args.n_heads, args.n_kv_heads

        def record(name, x):
            if trace is not None:
                trace[name] = x[0] if single else x

        h = self.embed(tokens)                                        # (B, T, dim)
        record("tokens", tokens)
        record("token_embeddings", h)
        for i in range(args.n_layers):
            p = f"layers.{i}."
            x = rms_norm(h, w(p + "attention_norm.weight"), args.norm_eps, rnd)
            xq, xk, xv = self.project(x, (p + "attention.wq.weight", p + "attention.wk.weight",
                                          p + "attention.wv.weight"))
            xq, xk, xv = xq.reshape(B, T, n_heads, hd), xk.reshape(B, T, n_kv, hd), xv.reshape(B, T, n_kv, hd)
            if trace is not None:
                record(p + "attention_norm", x)
                record(p + "q", xq)
                record(p + "k", xk)
                record(p + "v", xv)
            xq = apply_rotary_emb(xq, freqs_cis, rnd)
            xk = apply_rotary_emb(xk, freqs_cis, rnd)
            bits = self.cache_k.dtype == np.uint16                     # a bf16 cache (bfloat16 numerics)
            self.cache_k[i, :B, start_pos:start_pos + T] = bf16.to_bits(xk) if bits else xk
            self.cache_v[i, :B, start_pos:start_pos + T] = bf16.to_bits(xv) if bits else xv
            keys = self.cache_k[i, :B, :start_pos + T]                 # (B, S, n_kv_heads, head_dim)
            values = self.cache_v[i, :B, :start_pos + T]
            if bits:
                keys, values = bf16.from_bits(keys), bf16.from_bits(values)
            inner = {} if wants(trace, p + "scores") else None         # the (T, S) tensors, if kept
            attn = blocked_attention(xq, keys, values, start_pos, rnd, inner)  # (B, T, dim)
            (attn_out,) = self.project(attn, (p + "attention.wo.weight",))
            h = rnd(h + attn_out)
            x = rms_norm(h, w(p + "ffn_norm.weight"), args.norm_eps, rnd)
            h1, h3 = self.project(x, (p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"))
            (ffn_out,) = self.project(swiglu(h1, h3, rnd), (p + "feed_forward.w2.weight",))
            if trace is not None:
                record(p + "q_rotated", xq)
                record(p + "k_rotated", xk)
                if inner is not None:
                    record(p + "scores", inner["scores"])
                    record(p + "probs", inner["probs"])
                record(p + "attention", attn)
                record(p + "attention_out", attn_out)
                record(p + "h", h)
                record(p + "ffn_norm", x)
                record(p + "w1", h1)
                record(p + "w3", h3)
                record(p + "ffn_out", ffn_out)
            h = rnd(h + ffn_out)
            if trace is not None:
                record(p + "out", h)
        if last_only:
            h = h[:, -1:]
        h = rms_norm(h, w("norm.weight"), args.norm_eps, rnd)
        (logits,) = self.project(h, ("tok_embeddings.weight" if self.tied else "output.weight",))
        record("norm", h)
        record("logits", logits)
        if last_only:
            logits = logits[:, 0]
        return logits[0] if single else logits

    __call__ = forward
