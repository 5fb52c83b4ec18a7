"""Reading untrusted files. Every path, size, offset, shape, stride and JSON value a
checkpoint states is checked here against the folder it came from and the file's real
size before any of its data is read or any memory is allocated for it.

What is promised: a path named inside a file resolves inside the checkpoint folder; only
regular files are opened (never a FIFO or a device); a byte extent lies inside its file;
a shape has at most MAX_DIMS non-negative dims whose product cannot overflow; a strided
view has positive strides, no overlapping elements and stays inside its storage; JSON
has no duplicate keys, no NaN or infinity, a bounded size and a depth bounded by the recursion limit;
a zip member is unique, stored (not compressed) and read no further than its declared
size. Anything else raises the caller's NpllamaError subclass naming the file (and the
tensor, when there is one).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import stat
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from .errors import CheckpointError, printable  # noqa: F401  (printable: used by every reader)

MAX_DIMS = 8
MAX_JSON_BYTES = 64 * 1024**2          # Llama 3's HF tokenizer.json is 9 MB; index/params are KBs
MAX_ELEMENTS = 2**56                    # numel * itemsize (<= 8) stays far from int64 overflow
MAX_ZIP_MEMBERS = 100_000               # a 405B .pth holds ~1000 storages
MAX_ZIP_DIRECTORY = 64 * 1024**2
_MISSING = object()


MAX_JSON_DEPTH = 64    # real configs and tokenizer.json nest < 10 deep; recursive walkers stay far from Python's limit
MAX_INT_BITS = 4000    # an int of more bits has more than Python's 4,300 digits of str() (and is no size)


class _ShortRepr(reprlib.Repr):
    """repr bounded in depth and length (a 50,000-deep tuple, a 6,021-digit integer)."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 4, 60, 60, 60

    def repr_int(self, x, level):
        return f"<an integer of {x.bit_length():,} bits>" if x.bit_length() > MAX_INT_BITS else \
            super().repr_int(x, level)


_SHORT = _ShortRepr()


def describe(value: Any) -> str:
    """A value from a hostile file, cut short for an error message: bounded depth, length
    and digits, so no value reaches Python's recursion or int-to-str limits here."""
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(n: int) -> str:
    """An integer from a file for a message (one of more than MAX_INT_BITS bits is described)."""
    return describe(n) if isinstance(n, int) and n.bit_length() > MAX_INT_BITS else str(n)


def json_depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests at most `limit` containers deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return True


# --- files and paths ---------------------------------------------------------------------

def open_regular(path: str, error=CheckpointError):
    """A regular file opened for reading. A FIFO would block open() and /dev/zero never
    ends, so the type is checked on the opened descriptor (O_NONBLOCK keeps a FIFO's open
    from waiting for a writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL in the name
        raise error(f"{path}: cannot be opened ({e.strerror if isinstance(e, OSError) else e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path}: not a regular file (a FIFO, device or directory)")
    return os.fdopen(fd, "rb")


def file_size(f) -> int:
    return os.fstat(f.fileno()).st_size


def read_bounded(path: str, max_bytes: int, error=CheckpointError) -> bytes:
    """A whole regular file of at most max_bytes, refused by its size before a byte is read
    (and never read past max_bytes + 1, should it grow meanwhile)."""
    with open_regular(path, error) as f:
        size = file_size(f)
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
        raise error(f"{path}: {max(size, len(data)):,} bytes, more than the {max_bytes:,} accepted")
    return data


def _allowed_roots(root: str) -> list[str]:
    real = os.path.realpath(root)
    roots = [real]
    # The Hugging Face hub cache: snapshots/<revision>/<file> are symbolic links to
    # ../../blobs/<hash> of the same repository, which is where they may lead.
    parent, grand = os.path.dirname(real), os.path.dirname(os.path.dirname(real))
    if os.path.basename(parent) == "snapshots" and os.path.basename(grand).startswith("models--"):
        roots.append(os.path.join(grand, "blobs"))
    return roots


def inside(root: str, name: Any, what: str = "file", error=CheckpointError, where: str | None = None) -> str:
    """root/name, refused unless name is a relative path without `..` that resolves (after
    every symbolic link) inside root. `where` is the file that named it, for messages."""
    where = where or root
    ok = isinstance(name, str) and name and "\0" not in name and not os.path.isabs(name) \
        and ".." not in name.replace("\\", "/").split("/")
    try:
        ok = ok and bool(name.encode("utf-8"))
    except UnicodeEncodeError:
        ok = False
    if not ok:
        raise error(f"{where}: {what} {describe(name)} is not a file name inside {root}")
    full = os.path.join(root, name)
    real = os.path.realpath(full)
    if not any(real == r or real.startswith(r + os.sep) for r in _allowed_roots(root)):
        raise error(f"{full}: leads outside {root} (a symbolic link to {real}); refusing to read it")
    return full


def _descriptor_path(f) -> str | None:
    """Where an open descriptor leads (Linux: /proc/self/fd), or None where that is unknown."""
    try:
        return os.path.realpath(os.readlink(f"/proc/self/fd/{f.fileno()}"))
    except OSError:
        return None


def open_inside(root: str, name: Any, what: str = "file", error=CheckpointError, where: str | None = None):
    """root/name checked as inside() checks it, opened as open_regular opens it, and then the
    opened descriptor itself checked to lead inside root: a file replaced by a link to
    outside between the check and the open is refused, and every later read goes through
    this descriptor (never a re-open by path)."""
    full = inside(root, name, what, error, where)
    f = open_regular(full, error)
    real = _descriptor_path(f)
    if real is not None and not any(real == r or real.startswith(r + os.sep) for r in _allowed_roots(root)):
        f.close()
        raise error(f"{full}: leads outside {root} (opened as {real}); refusing to read it")
    return f


def map_array(f, dtype, offset: int, shape: tuple[int, ...], where: str, error=CheckpointError):
    """A read-only memory map of `shape` elements of `dtype` at byte `offset` of the open
    file f, its extent checked against the descriptor's size now (a file truncated since it
    was checked is an error naming it, not numpy's ValueError)."""
    n = numel(shape) * np.dtype(dtype).itemsize
    check_extent(offset, n, file_size(f), where, error)
    if n == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (ValueError, OSError) as e:
        raise error(f"{where}: cannot be mapped ({e}; truncated or replaced?)") from None


def sha256_open(f, size: int, where: str, chunk: int = 1 << 24) -> str:
    """sha256 of the first `size` bytes of an open file, refused if it holds fewer."""
    h, left = hashlib.sha256(), size
    f.seek(0)
    while left > 0:
        block = f.read(min(chunk, left))
        if not block:
            raise CheckpointError(f"{where}: shorter than the {size:,} bytes it had when checked (truncated?)")
        h.update(block)
        left -= len(block)
    return h.hexdigest()


# --- JSON --------------------------------------------------------------------------------

def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {describe(k)}")
        out[k] = v
    return out


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if value != value or abs(value) == float("inf"):   # 1e999 would otherwise be infinity
        raise ValueError(f"{describe(text)} is not a finite number")
    return value


def parse_json(data: bytes, where: str, error=CheckpointError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    if len(data) > max_bytes:
        raise error(f"{where}: {len(data):,} bytes, more than the {max_bytes:,} accepted")
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant,
                           parse_float=_finite_float)
    except RecursionError:  # json's C scanner stops at the interpreter's recursion limit
        raise error(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys, NaN, huge integers
        raise error(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not json_depth_ok(value):   # before any reader walks it recursively
        raise error(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value


def read_json(path: str, error=CheckpointError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file (regular, at most max_bytes) parsed by parse_json's rules."""
    return parse_json(read_bounded(path, max_bytes, error), path, error, max_bytes)


def field(obj: Any, key: str, kind: type | tuple, where: str, error=CheckpointError, default=_MISSING) -> Any:
    """obj[key], required to be of `kind` (int never admits bool; float admits int and
    must be finite). A missing key returns default, or is an error without one."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        if default is _MISSING:
            raise error(f"{where}: missing {key}")
        return default
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(isinstance(value, k) and not (k in (int, float) and isinstance(value, bool)) for k in kinds)
    if float in kinds and ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = value == value and abs(value) != float("inf")
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise error(f"{where}: {key} should be {names}, got {describe(value)}")
    return value


# --- shapes, strides, extents ----------------------------------------------------------------

def check_shape(shape: Any, where: str, error=CheckpointError) -> tuple[int, ...]:
    """A shape of at most MAX_DIMS non-negative ints whose product fits comfortably in int64."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS or \
            any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in shape):
        raise error(f"{where}: shape {describe(shape)} is not a list of at most {MAX_DIMS} non-negative integers")
    numel = 1
    for n in shape:
        numel *= n
    # each dimension too: a zero-size shape with a 2**70 dimension holds nothing, and numpy
    # still cannot make it
    if numel > MAX_ELEMENTS or any(n > MAX_ELEMENTS for n in shape):
        raise error(f"{where}: shape {describe(shape)} has more elements than any file can hold")
    return tuple(shape)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_extent(start: int, nbytes: int, limit: int, where: str, error=CheckpointError) -> None:
    """bytes [start, start + nbytes) lie within [0, limit)."""
    if not (0 <= start and 0 <= nbytes and start + nbytes <= limit):
        raise error(f"{where}: bytes {number(start)}..{number(start + nbytes)} lie outside the {limit} available "
                    "(truncated or corrupt)")


def strided_span(shape: tuple[int, ...], stride: Any, offset: Any, where: str, error=CheckpointError) -> int:
    """How many storage elements a strided view reaches (offset + last index + 1), after
    checking that it is a view torch.save can write: a non-negative offset, one positive
    stride per dim (any non-negative one for a dim of size 1) and no two elements at the
    same place, so a view never holds more elements than its storage."""
    if not isinstance(stride, (list, tuple)) or len(stride) != len(shape) or \
            any(not isinstance(s, int) or isinstance(s, bool) for s in stride):
        raise error(f"{where}: strides {describe(stride)} do not match shape {shape}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise error(f"{where}: storage offset {describe(offset)} is not a non-negative integer")
    if offset > MAX_ELEMENTS or any(abs(s) > MAX_ELEMENTS for s in stride):   # no file holds that many
        raise error(f"{where}: storage offset {describe(offset)} or strides {describe(stride)} are beyond any file")
    if numel(shape) == 0:
        return 0
    dims = sorted((s, n) for n, s in zip(shape, stride) if n > 1)
    if any(s < 0 for s in stride) or any(s <= 0 for s, _ in dims):
        raise error(f"{where}: strides {describe(stride)} must be positive (zero only where a dim is 1)")
    for (s0, n0), (s1, _) in zip(dims, dims[1:]):
        if s1 < s0 * n0:
            raise error(f"{where}: strides {describe(stride)} make elements overlap")
    return offset + sum((n - 1) * s for s, n in dims) + 1


# --- zip archives (torch.save's .pth, npllama's .npz shards) ----------------------------

class ZipReader:
    """A zip archive trusted for nothing: its central directory is bounded, member names
    are unique, and a member is only ever read as the stored bytes its entry declares,
    located and checked here (zipfile's own reader would inflate compressed members)."""

    def __init__(self, path: str, error=CheckpointError, expected_size: int | None = None, opened=None):
        self.path, self.error = path, error
        self.file = opened if opened is not None else open_regular(path, error)   # opened: by open_inside
        self.size = file_size(self.file)
        if expected_size is not None and self.size != expected_size:
            self.file.close()
            raise error(f"{path}: {self.size} bytes, the index says {expected_size} (truncated or replaced)")
        try:
            end = zipfile._EndRecData(self.file)
            if end is None:
                raise zipfile.BadZipFile("no end of central directory")
            if end[zipfile._ECD_SIZE] > MAX_ZIP_DIRECTORY or end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_MEMBERS:
                raise error(f"{path}: zip directory of {end[zipfile._ECD_ENTRIES_TOTAL]} entries is too large")
            infos = zipfile.ZipFile(self.file).infolist()
        except error:
            self.file.close()
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error,
                OverflowError, IndexError, NotImplementedError) as e:   # NotImplementedError: zip version
            self.file.close()
            raise error(f"{path}: not a readable zip archive ({type(e).__name__}: {e})") from None
        self.members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename in self.members:
                self.file.close()
                raise error(f"{path}: member {describe(info.filename)} appears twice")
            self.members[info.filename] = info

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def extent(self, name: str) -> tuple[int, int]:
        """(offset, size) of a stored member's data in the file."""
        info = self.members[name]
        where = f"{self.path}: member {describe(name)}"
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise self.error(f"{where} is compressed or encrypted; torch.save and npllama store members as they "
                             "are, so this file was made by something else (refusing to inflate it)")
        if info.compress_size != info.file_size:
            raise self.error(f"{where}: stored size {info.compress_size} != size {info.file_size}")
        check_extent(info.header_offset, 30, self.size, where, self.error)
        self.file.seek(info.header_offset)
        header = self.file.read(30)
        if header[:4] != b"PK\x03\x04":
            raise self.error(f"{where}: corrupt local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if self.file.read(name_len) != info.orig_filename.encode(encoding, "replace"):
            raise self.error(f"{where}: local header names another member")
        start = info.header_offset + 30 + name_len + extra_len
        check_extent(start, info.file_size, self.size, where, self.error)
        return start, info.file_size

    def read(self, name: str, cap: int) -> bytes:
        """A whole (small) member, at most cap bytes, its CRC checked."""
        start, size = self.extent(name)
        if size > cap:
            raise self.error(f"{self.path}: member {describe(name)} is {size} bytes, more than the {cap} accepted")
        self.file.seek(start)
        data = self.file.read(size)
        if zlib.crc32(data) != self.members[name].CRC:
            raise self.error(f"{self.path}: member {describe(name)} fails its CRC check (corrupt)")
        return data


# numpy's .npy header, exactly as np.save writes it (keys sorted, repr'd values, space padded);
# parsed here rather than by numpy, whose parser tokenizes and evaluates the text.
NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (False|True), "
                        rb"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n")
MAX_NPY_HEADER = 10000   # numpy's own limit


def npy_header(f, start: int, size: int, where: str, error=CheckpointError) -> tuple:
    """(dtype, shape, data offset in the file) of the .npy array in bytes [start, start + size)
    of the open file f: a plain dtype in C order whose data lies inside those bytes. Nothing
    is allocated from the header."""
    f.seek(start)
    head = f.read(min(size, 12))
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6:8] not in (b"\x01\x00", b"\x02\x00"):
        raise error(f"{where}: not a .npy array (version 1 or 2)")
    n, at = (struct.unpack("<H", head[8:10])[0], 10) if head[6] == 1 else (struct.unpack("<I", head[8:12])[0], 12)
    if n > MAX_NPY_HEADER or at + n > size:
        raise error(f"{where}: .npy header of {n} bytes does not fit the file")
    f.seek(start + at)
    m = NPY_HEADER.fullmatch(f.read(n))
    if m is None:
        raise error(f"{where}: not a .npy header numpy wrote")
    if m.group(2) == b"True":
        raise error(f"{where}: Fortran order is not accepted")
    try:
        dtype = np.dtype(m.group(1).decode())
    except TypeError:
        raise error(f"{where}: unknown dtype {m.group(1).decode()!r}") from None
    shape = check_shape([int(x) for x in m.group(3).decode().replace(" ", "").split(",") if x], where, error)
    data_start = start + at + n
    check_extent(data_start, numel(shape) * dtype.itemsize, start + size, where, error)
    return dtype, shape, data_start


def npy_member(z: ZipReader, member: str) -> tuple:
    """npy_header of a stored .npy member of a zip."""
    start, size = z.extent(member)
    return npy_header(z.file, start, size, f"{z.path}: {describe(member)}", z.error)
