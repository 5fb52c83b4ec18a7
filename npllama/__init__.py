"""npllama: Llama 3 in plain NumPy."""
__version__ = "0.1.0"

from .config import ConfigError, ModelArgs, preset  # noqa: E402
from .model import Transformer, WeightError  # noqa: E402
from . import hub  # noqa: E402,F401  (npllama.hub.default_model())
from .tracing import trace  # noqa: E402


def load(path, dtype: str = "float32", **kwargs) -> Transformer:
    """A converted checkpoint directory (see `npllama convert`) as a ready Transformer."""
    from .checkpoint import load as _load
    return _load(path, dtype=dtype, **kwargs)


__all__ = ["ConfigError", "ModelArgs", "Transformer", "WeightError", "load", "preset", "trace", "__version__"]
