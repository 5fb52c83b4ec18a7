"""Token ids from the command line or a file (--tokens, --tokens-file): untrusted input,
checked as it is read, one line naming the argument or file when it is refused."""
from __future__ import annotations

import re

import numpy as np

from ..errors import UsageError
from ..untrusted import file_size, npy_header, open_regular, read_bounded

# Ids a --tokens-file may hold: 4M, beyond any context and any perplexity run on a CPU; a
# file is refused by its size before it is read (a .npy of int64, or text of 16 bytes an id).
MAX_TOKEN_IDS = 1 << 22


def parse_token_ids(text: str, where: str) -> list[int]:
    """Ids separated by commas and/or whitespace (at most MAX_TOKEN_IDS, read one at a time)."""
    ids = []
    for m in re.finditer(r"[^\s,]+", text):
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", m.group()):
            raise UsageError(f"{where}: {m.group()[:20]!r} is not a token id")
        if len(ids) == MAX_TOKEN_IDS:
            raise UsageError(f"{where}: more than {MAX_TOKEN_IDS:,} token ids")
        ids.append(int(m.group()))
    if not ids:
        raise UsageError(f"{where}: no token ids")
    return ids


def read_token_ids(path: str) -> list[int]:
    """A .npy of integers (1-D, no pickles; its header parsed and checked against the file
    before anything is allocated), or a UTF-8 text file of ids: a regular file either way."""
    if not path.endswith(".npy"):
        try:
            text = read_bounded(path, 16 * MAX_TOKEN_IDS, UsageError).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return parse_token_ids(text, path)
    with open_regular(path, UsageError) as f:
        dtype, shape, start = npy_header(f, 0, file_size(f), path, UsageError)
        if len(shape) != 1 or dtype.kind not in "iu":
            raise UsageError(f"{path}: expected a 1-D array of integer ids, got {dtype} {shape}")
        if not 0 < shape[0] <= MAX_TOKEN_IDS:
            raise UsageError(f"{path}: {shape[0]:,} token ids (1 to {MAX_TOKEN_IDS:,} are accepted)")
        f.seek(start)
        return np.frombuffer(f.read(shape[0] * dtype.itemsize), dtype).tolist()   # inside the file: checked
