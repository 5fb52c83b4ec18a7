"""npllama's checkpoint format: params.json, index.json and uncompressed .npz shards whose
members are memory-mapped in place, so loading any size takes well under a second.

Layout of a converted directory:
    params.json                 Meta's fields, rope scaling and FFN width explicit
    index.json                  tensor -> {shard, dtype, shape}; shard -> {size, sha256}
    model-00001-of-0000N.npz    zip (stored, not deflated) of `<tensor name>.npy` members
    tokenizer.model / tokenizer.json   when the source had one
bf16 tensors are stored as uint16 bit patterns and recorded as "bfloat16" in the index; a
GGUF's block-quantized matrices (converted without --dtype) as their raw blocks, uint8
(rows, bytes per row), recorded under their type ("Q4_K") and logical shape (rows, columns),
and opened as QuantTensors.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
from typing import Callable, Iterable

import numpy as np

from .atomic import check_directory, staged_directory
from ..model import bf16
from ..model.config import ModelArgs
from ..model.model import Transformer
from ..model.quant import BY_NAME, TYPES, QuantTensor, row_bytes
from ..model.weights import check_shapes, fits_resident
from ..progress import Progress
from .formats.gguf_file import gguf_values, open_gguf
from ..untrusted import (ZipReader, check_shape, describe, field, inside, map_array, npy_member, numel, open_inside,
                         open_regular, read_json)

FORMAT = "npllama"
FORMAT_VERSION = 1
# What the converters write beside the tensors (tokenizer, chat template, stop ids, params)
# changes as npllama learns more of a source; raised when it does, so that a conversion the
# cache holds from an older npllama is made again (npllama.hub) instead of silently lacking it.
CONVERTER = 2
STORAGE = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
# GGUF block types kept as their blocks (F32, F16 and BF16 are stored as arrays)
BLOCKS = {name: qtype for name, qtype in BY_NAME.items() if TYPES[qtype][1] > 1}
DEFAULT_SHARD_BYTES = 2 * 1024**3


from ..errors import CheckpointError, NonFiniteError, NpllamaError, UsageError  # noqa: F401  (CheckpointError re-exported)


# --- reading a zip member as an array, in place ----------------------------------------

def map_npy_member(z: ZipReader, member: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only memory map of a stored .npy member, which must hold exactly `dtype` and
    `shape` (C order) within the member's and the file's bounds."""
    got_dtype, got_shape, data_start = npy_member(z, member)
    if got_dtype != dtype or got_shape != tuple(shape):
        raise CheckpointError(f"{z.path}: {describe(member)} is {got_dtype.str}{list(got_shape)}, index says "
                              f"{dtype.str}{list(shape)}")
    return map_array(z.file, dtype, data_start, tuple(shape), f"{z.path}: {describe(member)}")


# --- writing -----------------------------------------------------------------------------

def _aligned_zipinfo(name: str, offset: int, npy_bytes: int) -> zipfile.ZipInfo:
    """A ZipInfo whose data starts on a 64-byte boundary (numpy pads the .npy header to 64),
    so the mapped arrays are aligned: pad with an extra field of an unused id."""
    zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = npy_bytes
    # zipfile writes a 20-byte zip64 extra into the local header on this condition
    # (ZipFile._open_to_write), not only past ZIP64_LIMIT itself.
    zip64 = npy_bytes * 1.05 > zipfile.ZIP64_LIMIT
    base = offset + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(base + 4)) % 64
    zi.extra = struct.pack("<HH", 0x6E70, pad) + b"\0" * pad  # id "np", ignored by readers
    return zi


def _npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def write_checkpoint(dst: str, args: ModelArgs, tensors: Iterable[tuple[str, np.ndarray]], total_bytes: int,
                     n_tensors: int, dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     extra_files: dict | None = None, extra_data: dict[str, bytes] | None = None,
                     force: bool = False, quiet: bool = False, allow_nonfinite: bool = False,
                     verify: Callable[[], None] | None = None) -> dict:
    """Stream (name, array) pairs into a checkpoint directory, atomically.

    Arrays are float32/float16 or uint16 (bf16 bits). dtype converts every tensor to
    "bfloat16", "float16" or "float32"; None keeps each as it comes. A NaN or infinity in a
    tensor (or made by the conversion) is refused naming the tensor, unless allow_nonfinite
    (a test writing a damaged checkpoint on purpose). The directory appears
    under `dst` only when complete (and after verify(), if given, returned); an existing
    `dst` is replaced only with force.
    """
    if dtype is not None and dtype not in STORAGE:
        raise UsageError(f"unknown dtype {dtype!r}; choose from {', '.join(STORAGE)}")
    with staged_directory(dst, force, is_checkpoint, "converted checkpoint", verify) as tmp:
        index = {"format": FORMAT, "version": FORMAT_VERSION, "converter": CONVERTER, "tensors": {}, "shards": {}}
        progress = Progress("convert", total_bytes, "GB", scale=1e9, stream=io.StringIO() if quiet else None)
        shards = _Shards(tmp, shard_bytes)
        for name, arr in tensors:
            arr, logical, shape = _stored(name, arr, dtype, allow_nonfinite)
            index["tensors"][name] = {"shard": shards.add(name, arr), "dtype": logical, "shape": list(shape)}
            progress.update(progress.done + arr.nbytes, name)
        shards.close()
        progress.close(summary=True)
        _finish(tmp, index, shards.names, args, extra_files or {}, extra_data or {})
    return index


def _stored(name: str, arr, dtype: str | None, allow_nonfinite: bool) -> tuple[np.ndarray, str, tuple]:
    """A tensor as it is stored, converted to dtype if asked (bf16 as its uint16 bits), its
    logical dtype and shape; a NaN or infinity in it refused (naming it) unless allowed. A
    QuantTensor keeps its blocks unless a dtype is asked for (NaN/inf scales refused)."""
    if isinstance(arr, QuantTensor) and dtype is None and arr.type_name in BLOCKS:
        try:
            if not allow_nonfinite:
                arr.check()
        except NpllamaError as e:
            raise NonFiniteError(f"{e}; nothing was written") from None
        return np.ascontiguousarray(arr.raw), arr.type_name, arr.shape
    if isinstance(arr, QuantTensor):
        arr = arr.widen()
    logical = "bfloat16" if arr.dtype == np.uint16 else arr.dtype.name
    if logical not in STORAGE:
        raise CheckpointError(f"{name}: unsupported dtype {arr.dtype}")
    if dtype is not None and dtype != logical:
        with np.errstate(over="ignore", invalid="ignore"):   # an overflow is refused just below, by name
            f32 = bf16.from_bits(arr) if logical == "bfloat16" else arr.astype(np.float32)
            arr = bf16.to_bits(f32) if dtype == "bfloat16" else f32.astype(dtype)
        logical = dtype
    arr = np.ascontiguousarray(arr)
    if not allow_nonfinite:
        check_finite(name, arr, logical)
    return arr, logical, arr.shape


class _Shards:
    """Uncompressed .npz shards of at most shard_bytes (a larger tensor gets one of its own),
    each member's data aligned so that it can be memory-mapped in place."""

    def __init__(self, folder: str, shard_bytes: int):
        self.folder, self.shard_bytes, self.names, self.zf = folder, shard_bytes, [], None

    def add(self, name: str, arr: np.ndarray) -> str:
        """Write arr as member name.npy -> the (staging) name of the shard holding it."""
        header = _npy_header(arr)
        if self.zf is None or (self.zf.fp.tell() > 0 and self.zf.fp.tell() + arr.nbytes > self.shard_bytes):
            self.close()
            self.names.append(f"shard-{len(self.names) + 1:05d}.npz")
            self.zf = zipfile.ZipFile(os.path.join(self.folder, self.names[-1]), "w", allowZip64=True)
        zi = _aligned_zipinfo(name + ".npy", self.zf.fp.tell(), len(header) + arr.nbytes)
        with self.zf.open(zi, "w") as out:
            out.write(header)
            out.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
        return self.names[-1]

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()
            self.zf = None


def _finish(tmp: str, index: dict, shard_names: list[str], args: ModelArgs, extra_files: dict[str, str],
            extra_data: dict[str, bytes]) -> None:
    """The shards under their final names (which say how many there are, known only now),
    with sizes and digests in the index; params.json, index.json and the extra files."""
    renames = {s: f"model-{i + 1:05d}-of-{len(shard_names):05d}.npz" for i, s in enumerate(shard_names)}
    for old, new in renames.items():
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        index["shards"][new] = {"size": os.path.getsize(os.path.join(tmp, new)),
                                "sha256": sha256_file(os.path.join(tmp, new))}
    for t in index["tensors"].values():
        t["shard"] = renames[t["shard"]]
    with open(os.path.join(tmp, "params.json"), "w") as f:
        json.dump(args.to_dict(), f, indent=2)
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    for target, src in extra_files.items():   # a path, or a file already opened and checked
        fin = src if hasattr(src, "read") else open_regular(src)
        with fin, open(os.path.join(tmp, target), "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    for target, data in extra_data.items():
        with open(os.path.join(tmp, target), "wb") as f:
            f.write(data)


def finite_part(part: np.ndarray) -> np.ndarray:
    """Which elements are finite (bf16 bits: an all-ones exponent is inf or NaN)."""
    return (part & 0x7F80) != 0x7F80 if part.dtype == np.uint16 else np.isfinite(part)


def check_finite(name: str, arr: np.ndarray, logical: str, chunk_bytes: int = 1 << 24) -> None:
    """A tensor about to be written holds no NaN or infinity (one in the source, or a value
    beyond the stored dtype's range: an F64 1e300 as float32, 1e6 as float16), read a
    chunk at a time."""
    flat = arr.reshape(-1)
    step = max(1, chunk_bytes // max(arr.itemsize, 1))
    for i in range(0, flat.size, step):
        ok = finite_part(flat[i:i + step])
        if not ok.all():
            raise NonFiniteError(f"tensor {name}: element {i + int(np.argmin(ok)):,} is NaN or infinite as {logical} "
                                 "(a NaN or inf in the source, or a value beyond the range of the dtype it is stored "
                                 "as: try --dtype float32); nothing was written")


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------------

def read_index(path: str) -> dict:
    """index.json of a converted checkpoint, every field checked (names, dtypes, shapes, shard
    file names that stay inside the directory) before anything else is opened."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (convert a checkpoint with `npllama convert`)")
    index_path = os.path.join(path, "index.json")
    if not os.path.lexists(index_path):
        raise CheckpointError(f"{index_path}: missing (is {path} a converted npllama checkpoint?)")
    index = read_json(inside(path, "index.json"))
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{index_path}: not an npllama index")
    version = field(index, "version", int, index_path, default=1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{index_path}: format version {version} is newer than this npllama reads")
    shards = index["shards"] = field(index, "shards", dict, index_path, default={})   # every reader may use it
    for shard, meta in shards.items():
        where = f"{index_path}: shard {describe(shard)}"
        inside(path, shard, "shard", where=index_path)
        if field(meta, "size", int, where) < 0:
            raise CheckpointError(f"{where}: negative size")
        field(meta, "sha256", str, where)
    for name, t in field(index, "tensors", dict, index_path).items():
        where = f"{index_path}: tensor {describe(name)}"
        shard = field(t, "shard", str, where)
        if shards and shard not in shards:
            raise CheckpointError(f"{where}: shard {describe(shard)} is not listed under shards")
        if field(t, "dtype", str, where) not in STORAGE and t["dtype"] not in BLOCKS:
            raise CheckpointError(f"{where}: unknown dtype {describe(t['dtype'])}")
        check_shape(field(t, "shape", list, where), where)
        stored_shape(t, where)
    unused = sorted(set(shards) - {t["shard"] for t in index["tensors"].values()})
    if unused:   # a size or digest nothing checks against a file npllama reads
        raise CheckpointError(f"{index_path}: shard {describe(unused[0])} holds no tensor the index lists")
    return index


def stored_shape(t: dict, where: str) -> tuple[int, ...]:
    """The shape of an index entry's .npy member: its own, or for blocks (rows, bytes per row)."""
    if t["dtype"] not in BLOCKS:
        return tuple(t["shape"])
    if len(t["shape"]) != 2 or 0 in t["shape"]:
        raise CheckpointError(f"{where}: {t['dtype']} blocks must be a matrix with rows and columns, "
                              f"shape {t['shape']}")
    try:
        return t["shape"][0], row_bytes(BLOCKS[t["dtype"]], t["shape"][1], "its columns")
    except NpllamaError as e:
        raise CheckpointError(f"{where}: {e}") from None


def stored_bytes(t: dict) -> int:
    """Bytes an index entry's tensor takes as stored (read_index checked it)."""
    itemsize = 1 if t["dtype"] in BLOCKS else STORAGE[t["dtype"]].itemsize
    return numel(stored_shape(t, "")) * itemsize


def read_params(path: str) -> ModelArgs:
    """A converted model's params.json: a regular file inside the folder (a link leading out
    of it is refused), checked as ModelArgs checks it. What `info` and `memory -m` read."""
    return ModelArgs.from_json(inside(path, "params.json"))


def read_checked(path: str) -> tuple[ModelArgs, dict]:
    """params.json and index.json, every tensor the index lists checked against the params."""
    index = read_index(path)
    args = read_params(path)
    check_shapes(args, {n: tuple(t["shape"]) for n, t in index["tensors"].items()}, os.path.join(path, "index.json"),
                 error=CheckpointError)
    return args, index


WRITTEN = {"params.json", "index.json", "tokenizer.json", "tokenizer.model"}   # and the shards


def is_checkpoint(path: str) -> bool:
    """Whether a directory is a checkpoint npllama wrote, and holds nothing else (what --force
    may replace: replacing it deletes the folder): a valid index, and only the files npllama
    writes, regular files all (a note or a folder of the user's inside makes it not ours)."""
    try:
        shards = set(read_index(path)["shards"])
        entries = os.listdir(path)
    except (NpllamaError, OSError):
        return False
    return all(e in WRITTEN | shards and os.path.isfile(os.path.join(path, e))
               and not os.path.islink(os.path.join(path, e)) for e in entries)


def check_destination(dst: str, force: bool) -> None:
    """Whether a checkpoint may be written at dst; raises before any work otherwise."""
    check_directory(os.path.abspath(dst), force, is_checkpoint, "converted checkpoint")


def open_tensors(path: str, index: dict | None = None, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a converted checkpoint (or those named), memory-mapped (bf16 as uint16
    bits). Checks the files, sizes, members, dtypes and shapes they involve against the index;
    reads no tensor data. A shard holding none of the named tensors is not opened."""
    index = index or read_index(path)
    wanted = index["tensors"] if names is None else {n: index["tensors"][n] for n in names if n in index["tensors"]}
    by_shard: dict[str, list[str]] = {}
    for name, t in wanted.items():
        by_shard.setdefault(t["shard"], []).append(name)
    out = {}
    for shard, names in by_shard.items():
        file = inside(path, shard, "shard", where=os.path.join(path, "index.json"))
        if not os.path.lexists(file):
            raise CheckpointError(f"{file}: missing shard (holds {names[0]} and {len(names) - 1} more)")
        opened = open_inside(path, shard, "shard", where=os.path.join(path, "index.json"))
        with ZipReader(file, expected_size=index.get("shards", {}).get(shard, {}).get("size"), opened=opened) as z:
            for name in names:
                if name + ".npy" not in z.members:
                    raise CheckpointError(f"{file}: tensor {name} listed in index.json is not in the shard")
                out[name] = _mapped(z, name, index["tensors"][name])
    return out


def _mapped(z: ZipReader, name: str, t: dict):
    # a member as the index describes it: an array, or a GGUF type's blocks as a QuantTensor
    if t["dtype"] not in BLOCKS:
        return map_npy_member(z, name + ".npy", STORAGE[t["dtype"]], tuple(t["shape"]))
    raw = map_npy_member(z, name + ".npy", np.dtype(np.uint8), stored_shape(t, f"{z.path}: {name}"))
    return QuantTensor(raw, BLOCKS[t["dtype"]], tuple(t["shape"]), name)


def verify(path: str) -> list[str]:
    """Shards whose sha256 differs from the index (an empty list: all good). An index that
    records no shards has nothing to verify against: an error, not a pass."""
    index = read_index(path)
    if not index["shards"] and index["tensors"]:
        raise CheckpointError(f"{os.path.join(path, 'index.json')}: lists no shards with their sha256, so nothing "
                              "can be verified")
    bad = []
    for shard, meta in index.get("shards", {}).items():
        file = inside(path, shard, "shard", where=os.path.join(path, "index.json"))
        if not os.path.lexists(file) or sha256_file(file) != meta["sha256"]:
            bad.append(shard)
    return bad


def nonfinite(path: str, chunk_bytes: int = 1 << 24) -> list[str]:
    """Tensors holding a NaN or an infinity, read through the maps a chunk at a time."""
    bad = []
    tensors = open_tensors(path)
    for name in list(tensors):
        arr = tensors.pop(name)   # unmapped once checked: only one tensor's pages are held
        if isinstance(arr, QuantTensor):
            bad += _bad_scales(arr)
            continue
        flat = arr.reshape(-1)
        step = max(1, chunk_bytes // max(arr.itemsize, 1))
        for i in range(0, flat.size, step):
            if not finite_part(flat[i:i + step]).all():
                bad.append(name)
                break
        del arr, flat
    return bad


def _bad_scales(w: QuantTensor) -> list[str]:
    try:
        w.check()
    except NpllamaError:
        return [w.name]
    return []


def open_checkpoint(path: str) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """A converted checkpoint's params and its tensors, memory-mapped and checked against the
    params (npllama.load makes the model from them)."""
    args, index = read_checked(path)
    return args, open_tensors(path, index)


def is_gguf(path) -> bool:
    """Whether path is a regular file that starts as a GGUF does."""
    if not os.path.isfile(path):
        return False
    with open_regular(path) as f:
        return f.read(4) == b"GGUF"


def runs_as_gguf(path, weights_mode: str) -> bool:
    """Whether -m PATH runs as the GGUF file itself, its blocks mapped (no conversion, no
    float copy): a GGUF with weights_mode "quantized", or "auto" when float32 copies of its
    weights would not fit in memory (model.weights.fits_resident, decided from the header).
    Anything else is converted once into the cache, as before."""
    if weights_mode not in ("quantized", "auto") or not is_gguf(path):
        return False
    return weights_mode == "quantized" or not fits_resident(4 * gguf_values(str(path)))


def make_model(path, args: ModelArgs, tensors: dict, dtype: str = "float32", **kwargs) -> Transformer:
    """A Transformer of opened tensors (open_checkpoint's, open_gguf's), remembering the path
    they came from; kwargs are Transformer's."""
    model = Transformer(args, tensors, dtype=dtype, **kwargs)
    model.path = path
    return model


def load(path, dtype: str = "float32", **kwargs) -> Transformer:
    """A converted checkpoint directory (see `npllama convert`), or a GGUF file opened as it
    is (its blocks mapped, as QuantTensors: weights_mode "quantized" tiles them, "auto"
    when float copies would not fit), as a ready Transformer; kwargs are Transformer's
    (max_seq_len, max_batch_size, weights_mode). The weights stay memory-mapped until a
    forward pass uses them."""
    args, tensors = open_gguf(str(path))[:2] if is_gguf(path) else open_checkpoint(path)
    return make_model(path, args, tensors, dtype, **kwargs)
