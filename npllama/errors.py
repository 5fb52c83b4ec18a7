"""npllama's errors: one hierarchy under NpllamaError.

Every error a user can cause and fix (a damaged file, a wrong argument, a missing download)
is an NpllamaError whose message names the file, tensor or argument; the CLI prints exactly
these as one line and exits 1. Anything else is a bug and keeps its traceback. Each class
also derives from the built-in exception it refines, so `except ValueError` keeps working.
"""
import re

# Characters that move the cursor, ring, start terminal escapes (ESC, CSI), break a line
# (so a file could print a fake "npllama: ..." line), reorder text (bidi overrides), or
# cannot be written at all (lone surrogates).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff"
                          "\ud800-\udfff]")


def _escape(m) -> str:
    c = ord(m.group(0))
    return "\\n" if c == 10 else "\\t" if c == 9 else f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text) -> str:
    """Text from a file made safe for a terminal and for a one-line message: every control,
    line-breaking, bidi and unencodable character as a visible escape (\\x1b, \\n, \\u2028).
    The one function all file-derived text passes through on its way to the user (every
    NpllamaError message does: its str() is printable)."""
    return _UNPRINTABLE.sub(_escape, text if isinstance(text, str) else str(text))


class NpllamaError(Exception):
    """Base class of the errors npllama reports to users. Its message is printable() text
    whatever a file put into it: a tensor name with ESC sequences or a newline cannot paint
    the terminal or forge another "npllama: ..." line."""

    def __str__(self) -> str:
        return printable(super().__str__())


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


class NonFiniteError(NpllamaError, ArithmeticError):
    """A result that is NaN or infinite (perplexity, KL divergence, a converted tensor, the
    logits): reported as an error naming where, never printed as a number."""


class MissingDependencyError(NpllamaError, ImportError):
    """An optional extra (matplotlib, hypothesis) is not installed: the message names the pip command."""
