"""npllama: Llama 3 in plain NumPy."""
from .model.config import ModelArgs, preset
from .errors import ConfigError, WeightError
from .io.checkpoint import load
from .model.model import Transformer
from .io import hub  # noqa: F401  (npllama.hub.default_model())
from .inspect.tracefile import trace
from .version import __version__


__all__ = ["ConfigError", "ModelArgs", "Transformer", "WeightError", "load", "preset", "trace", "__version__"]
