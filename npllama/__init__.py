"""npllama: Llama 3 in plain NumPy."""
from .config import ModelArgs, preset
from .errors import ConfigError, WeightError
from .model import Transformer
from . import hub  # noqa: F401  (npllama.hub.default_model())
from .tracing import trace
from .version import __version__


def load(path, dtype: str = "float32", **kwargs) -> Transformer:
    """A converted checkpoint directory (see `npllama convert`) as a ready Transformer;
    kwargs are Transformer's (max_seq_len, max_batch_size, weights_mode). The weights stay
    memory-mapped until a forward pass uses them."""
    from .checkpoint import open_checkpoint
    args, tensors = open_checkpoint(path)
    model = Transformer(args, tensors, dtype=dtype, **kwargs)
    model.path = path
    return model


__all__ = ["ConfigError", "ModelArgs", "Transformer", "WeightError", "load", "preset", "trace", "__version__"]
