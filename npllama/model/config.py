"""Model hyper-parameters, read from Meta's params.json (and presets for the real shapes)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional


from ..errors import ConfigError  # noqa: F401  (re-exported)
from ..untrusted import read_json


# Far beyond every released Llama (405B: dim 16384, 126 layers, 128 heads, 128256 tokens,
# FFN 53248, 131072 positions), and small enough that the tensor list stays small.
LIMITS = {"dim": 2**20, "n_layers": 4096, "n_heads": 4096, "n_kv_heads": 4096, "vocab_size": 2**24,
          "multiple_of": 2**22, "hidden_dim": 2**22, "max_seq_len": 2**26, "original_max_position_embeddings": 2**26}


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # Llama 3.1 rope scaling. Meta's reference hard-codes factor 8, which is right for
    # 3.1 but wrong for 3.2 1B/3B (32): meta-llama/llama-models issues 166 and 241.
    rope_scaling_factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Checkpoints converted from HF/GGUF state their FFN width instead of deriving it.
    hidden_dim: Optional[int] = None
    # The context the model was trained for (HF max_position_embeddings, GGUF
    # context_length); the runtime context is chosen separately (npllama.memory.choose_context).
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "original_max_position_embeddings") + (("hidden_dim",) if self.hidden_dim is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
            if v > LIMITS[name]:
                # A params file is untrusted: n_layers = 2**40 would make the tensor list
                # itself exhaust memory before any shape is compared.
                raise ConfigError(f"{name} {v} is beyond any Llama model (at most {LIMITS[name]} accepted)")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "low_freq_factor", "high_freq_factor") + \
                (("ffn_dim_multiplier",) if self.ffn_dim_multiplier is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ConfigError(f"use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for rotary embeddings")
        if self.use_scaled_rope and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError("high_freq_factor must exceed low_freq_factor")
        if self.ffn_dim < 1:   # a derived width (ffn_dim_multiplier), not checked above
            raise ConfigError(f"the feed-forward width derives to {self.ffn_dim} (ffn_dim_multiplier "
                              f"{self.ffn_dim_multiplier!r}); it must be at least 1")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size, derived exactly as Meta's FeedForward does unless stated."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, params: dict, **overrides) -> "ModelArgs":
        """Meta's params.json fields; unknown keys are ignored, `{"model": {...}}` is unwrapped."""
        if not isinstance(params, dict):
            raise ConfigError(f"params must be a JSON object, got {type(params).__name__}")
        if "model" in params and isinstance(params["model"], dict):
            params = params["model"]
        missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in params and k not in overrides]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (a Llama params.json states them)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in params.items() if k in fields}
        # Meta's own name for the factor, and HF-style nested rope scaling, when present.
        scaling = params.get("rope_scaling")
        if isinstance(scaling, dict):
            kw.setdefault("use_scaled_rope", True)
            for src, dst in (("factor", "rope_scaling_factor"), ("low_freq_factor", "low_freq_factor"),
                             ("high_freq_factor", "high_freq_factor"),
                             ("original_max_position_embeddings", "original_max_position_embeddings")):
                if src in scaling:
                    kw.setdefault(dst, scaling[src])
        if "use_scaled_rope" in params and "rope_scaling_factor" not in kw and params.get("use_scaled_rope"):
            # Meta's 3.2 1B/3B params.json says only use_scaled_rope; their factor is 32.
            if params.get("dim") in (2048, 3072) and params.get("n_layers") in (16, 28):
                kw["rope_scaling_factor"] = 32.0
        if "max_seq_len" not in kw and "max_seq_len" not in overrides:
            kw["max_seq_len"] = trained_context(kw)
        kw.update(overrides)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "hidden_dim",
                     "max_seq_len", "original_max_position_embeddings"):
            if isinstance(kw.get(name), float) and kw[name].is_integer():
                kw[name] = int(kw[name])
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "ModelArgs":
        params = read_json(os.fspath(path), ConfigError)
        try:
            return cls.from_dict(params, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """Meta's fields with the rope scaling and FFN width made explicit."""
        d = dataclasses.asdict(self)
        d["hidden_dim"] = self.ffn_dim
        return d


def trained_context(params: dict) -> int:
    """The context a Meta checkpoint was trained for, which its params.json does not state:
    Llama 3.1/3.2 (scaled RoPE) were trained to 131072 tokens, Llama 3 to 8192."""
    return 131072 if params.get("use_scaled_rope") is True else 8192


# The released shapes (Meta's params.json, vocab 128256).
PRESETS = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        rope_scaling_factor=32.0),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                        ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        rope_scaling_factor=32.0),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    kw = PRESETS[name]
    return ModelArgs(**{**kw, "max_seq_len": trained_context(kw), **overrides})

