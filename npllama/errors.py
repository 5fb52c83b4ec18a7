"""npllama's errors: one hierarchy under NpllamaError.

Every error a user can cause and fix (a damaged file, a wrong argument, a missing download)
is an NpllamaError whose message names the file, tensor or argument; the CLI prints exactly
these as one line and exits 1. Anything else is a bug and keeps its traceback. Each class
also derives from the built-in exception it refines, so `except ValueError` keeps working.
"""


class NpllamaError(Exception):
    """Base class of the errors npllama reports to users."""


class ConfigError(NpllamaError, ValueError):
    """A params.json (or preset, or keyword) that does not describe a valid Llama model."""


class CheckpointError(NpllamaError, ValueError):
    """A checkpoint that cannot be read: the message names the file and tensor."""


class WeightError(NpllamaError, ValueError):
    """A weight that is missing, misshapen or of an unusable dtype."""


class TokenizerError(NpllamaError, ValueError):
    """A tokenizer file that is missing, malformed or not the one expected."""


class DownloadError(NpllamaError, RuntimeError):
    """The default model could not be fetched or did not verify."""


class UsageError(NpllamaError, ValueError):
    """An argument out of range or inconsistent with the model (names the argument)."""


class StageError(NpllamaError, RuntimeError):
    """A pipeline stage (npllama.distributed) that could not start, did not answer or died:
    the message names the stage, its layers and its node."""


class MissingDependencyError(NpllamaError, ImportError):
    """An optional extra (matplotlib, hypothesis) is not installed: the message names the pip command."""
