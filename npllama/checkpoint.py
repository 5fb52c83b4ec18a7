"""npllama's checkpoint format: params.json, index.json and uncompressed .npz shards whose
members are memory-mapped in place, so loading any size takes well under a second.

Layout of a converted directory:
    params.json                 Meta's fields, rope scaling and FFN width explicit
    index.json                  tensor -> {shard, dtype, shape}; shard -> {size, sha256}
    model-00001-of-0000N.npz    zip (stored, not deflated) of `<tensor name>.npy` members
    tokenizer.model / tokenizer.json   when the source had one
bf16 tensors are stored as uint16 bit patterns and recorded as "bfloat16" in the index.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import time
import zipfile
from typing import Iterable, Iterator

import numpy as np

from .config import ModelArgs

FORMAT = "npllama"
FORMAT_VERSION = 1
STORAGE = {"bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
DEFAULT_SHARD_BYTES = 2 * 1024**3


from .errors import CheckpointError  # noqa: F401  (re-exported)


# --- reading a zip member as an array, in place ----------------------------------------

def zip_member_offset(path: str, info: zipfile.ZipInfo, f) -> int:
    """Byte offset of a stored member's data inside the zip file."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: member {info.filename} is compressed; it cannot be memory-mapped")
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def map_npy_member(path: str, info: zipfile.ZipInfo, f, file_size: int) -> np.ndarray:
    """A read-only memory map of an uncompressed .npy member of a zip."""
    start = zip_member_offset(path, info, f)
    f.seek(start)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: {info.filename}: not a valid .npy member ({e})") from None
    data_start = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject:
        raise CheckpointError(f"{path}: {info.filename}: object arrays are not allowed")
    if data_start + nbytes > file_size or data_start + nbytes > start + info.file_size:
        raise CheckpointError(f"{path}: {info.filename}: truncated ({file_size} bytes on disk)")
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=shape, order="F" if fortran else "C")


# --- writing -----------------------------------------------------------------------------

class Progress:
    """One line per tensor on stderr: count, bytes done / total, rate."""

    def __init__(self, total_bytes: int, n: int, stream=None, quiet: bool = False):
        self.total, self.n, self.done, self.i = total_bytes, n, 0, 0
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def step(self, name: str, nbytes: int) -> None:
        self.i += 1
        self.done += nbytes
        if self.quiet:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        line = (f"[{self.i:>{len(str(self.n))}}/{self.n}] {name:<40} {self.done / 1e9:7.2f} / {self.total / 1e9:.2f} GB"
                f"  {self.done / dt / 1e6:7.0f} MB/s")
        # On a terminal one line updates in place; in a log, a line per tensor.
        if self.stream.isatty():
            print("\r" + line, end="\n" if self.i == self.n else "", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _aligned_zipinfo(name: str, offset: int, npy_bytes: int) -> zipfile.ZipInfo:
    """A ZipInfo whose data starts on a 64-byte boundary (numpy pads the .npy header to 64),
    so the mapped arrays are aligned: pad with an extra field of an unused id."""
    zi = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    zi.compress_type = zipfile.ZIP_STORED
    zi.file_size = npy_bytes
    zip64 = npy_bytes > zipfile.ZIP64_LIMIT
    base = offset + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(base + 4)) % 64
    zi.extra = struct.pack("<HH", 0x6E70, pad) + b"\0" * pad  # id "np", ignored by readers
    return zi


def _npy_header(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def write_checkpoint(dst: str, args: ModelArgs, tensors: Iterable[tuple[str, np.ndarray]], total_bytes: int,
                     n_tensors: int, dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     extra_files: dict[str, str] | None = None, extra_data: dict[str, bytes] | None = None,
                     force: bool = False, quiet: bool = False) -> dict:
    """Stream (name, array) pairs into a checkpoint directory, atomically.

    Arrays are float32/float16 or uint16 (bf16 bits). dtype converts every tensor to
    "bfloat16", "float16" or "float32"; None keeps each as it comes. The directory appears
    under `dst` only when complete; an existing `dst` is replaced only with force.
    """
    from . import bf16  # local: keeps this module's import light
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    if dtype is not None and dtype not in STORAGE:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(STORAGE)}")
    tmp = f"{dst}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        index = {"format": FORMAT, "version": FORMAT_VERSION, "tensors": {}, "shards": {}}
        progress = Progress(total_bytes, n_tensors, quiet=quiet)
        shard_names: list[str] = []
        zf = None
        for name, arr in tensors:
            logical = "bfloat16" if arr.dtype == np.uint16 else arr.dtype.name
            if logical not in STORAGE:
                raise CheckpointError(f"{name}: unsupported dtype {arr.dtype}")
            if dtype is not None and dtype != logical:
                f32 = bf16.from_bits(arr) if logical == "bfloat16" else arr.astype(np.float32)
                arr = bf16.to_bits(f32) if dtype == "bfloat16" else f32.astype(dtype)
                logical = dtype
            arr = np.ascontiguousarray(arr)
            header = _npy_header(arr)
            if zf is None or (zf.fp.tell() > 0 and zf.fp.tell() + arr.nbytes > shard_bytes):
                if zf is not None:
                    zf.close()
                shard_names.append(f"shard-{len(shard_names) + 1:05d}.npz")
                zf = zipfile.ZipFile(os.path.join(tmp, shard_names[-1]), "w", allowZip64=True)
            zi = _aligned_zipinfo(name + ".npy", zf.fp.tell(), len(header) + arr.nbytes)
            with zf.open(zi, "w") as out:
                out.write(header)
                out.write(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")
            index["tensors"][name] = {"shard": shard_names[-1], "dtype": logical, "shape": list(arr.shape)}
            progress.step(name, arr.nbytes)
        if zf is not None:
            zf.close()
        # Final names say how many shards there are, which is known only now.
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
        for target, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, target))
        for target, data in (extra_data or {}).items():
            with open(os.path.join(tmp, target), "wb") as f:
                f.write(data)
        if os.path.exists(dst):
            old = f"{dst}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old)
        else:
            os.rename(tmp, dst)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- reading -----------------------------------------------------------------------------

def read_index(path: str) -> dict:
    index_path = os.path.join(path, "index.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (convert a checkpoint with `npllama convert`)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{index_path}: missing (is {path} a converted npllama checkpoint?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT or not isinstance(index.get("tensors"), dict):
        raise CheckpointError(f"{index_path}: not an npllama index")
    if index.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{index_path}: format version {index['version']} is newer than this npllama reads")
    return index


def open_tensors(path: str, index: dict | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a converted checkpoint, memory-mapped (bf16 as uint16 bits).
    Checks sizes, dtypes and shapes against the index; reads no tensor data."""
    index = index or read_index(path)
    by_shard: dict[str, list[str]] = {}
    for name, t in index["tensors"].items():
        if t.get("dtype") not in STORAGE:
            raise CheckpointError(f"{path}: tensor {name}: unknown dtype {t.get('dtype')!r}")
        by_shard.setdefault(t["shard"], []).append(name)
    out = {}
    for shard, names in by_shard.items():
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file}: missing shard (holds {names[0]} and {len(names) - 1} more)")
        size = os.path.getsize(file)
        want = index.get("shards", {}).get(shard, {}).get("size")
        if want is not None and size != want:
            raise CheckpointError(f"{file}: {size} bytes, index says {want} (truncated or replaced)")
        try:
            zf = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{file}: not a readable zip ({e})") from None
        with zf, open(file, "rb") as f:
            members = {i.filename: i for i in zf.infolist()}
            for name in names:
                info = members.get(name + ".npy")
                if info is None:
                    raise CheckpointError(f"{file}: tensor {name} listed in index.json is not in the shard")
                arr = map_npy_member(file, info, f, size)
                t = index["tensors"][name]
                if arr.dtype != STORAGE[t["dtype"]] or list(arr.shape) != list(t["shape"]):
                    raise CheckpointError(f"{file}: tensor {name} is {arr.dtype}{list(arr.shape)}, index says "
                                          f"{t['dtype']}{t['shape']}")
                out[name] = arr
    return out


def verify(path: str) -> list[str]:
    """Shards whose sha256 differs from the index (an empty list: all good)."""
    index = read_index(path)
    bad = []
    for shard, meta in index.get("shards", {}).items():
        file = os.path.join(path, shard)
        if not os.path.isfile(file) or sha256_file(file) != meta.get("sha256"):
            bad.append(shard)
    return bad


def open_checkpoint(path: str) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """A converted checkpoint's params and its tensors, memory-mapped (npllama.load makes
    the model from them)."""
    index = read_index(path)
    return ModelArgs.from_json(os.path.join(path, "params.json")), open_tensors(path, index)
