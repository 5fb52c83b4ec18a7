"""GGUF files of the llama architecture (llama.cpp's format), read with the gguf package's
reader; every tensor's type, dims, offset and alignment are then checked against the file
and each other here. Converting dequantizes with gguf's own code (read_gguf); opening a GGUF
directly keeps its blocks, mapped, as QuantTensors (open_gguf)."""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import warnings

import numpy as np

from ...errors import CheckpointError, ConfigError
from ...model.config import ModelArgs
from ...model.ops import rope_frequencies
from ...model.quant import TYPES, QuantTensor, dequantize, row_bytes
from ...model.weights import check_shapes
from ...text.tokenizer import spec_json
from ...text.tokenizer_import import gguf_tokenizer_spec
from ...untrusted import MAX_DIMS, check_extent, describe, file_size, numel, open_regular
from .names import gguf_to_meta
from .source import Source


def gguf_field(reader, key: str, kind=None, default=None, path: str = ""):
    """A metadata value, required to be of `kind` (int excludes bool) when given."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        value = f.contents()   # decoded lazily by gguf: strings may not be UTF-8
    except (ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata {key} is unreadable ({type(e).__name__}: {e})") from None
    if kind is not None and (not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool))
                             or (kind is float and not np.isfinite(value))):
        raise CheckpointError(f"{path}: {key} should be {kind.__name__}, got {describe(value)}")
    return value


def check_tensors(reader, path: str, size: int) -> None:
    """Each tensor: a known type, 1..4 dims whose first is a whole number of blocks, data
    aligned and inside the file, and no two tensors' data overlapping."""
    import gguf  # here, not at the top: a start that reads no GGUF does not pay for it (and yaml)
    spans = []
    for t in reader.tensors:
        where = f"{path}: tensor {describe(t.name)}"
        dims = [int(d) for d in t.shape]
        if not 1 <= len(dims) <= min(4, MAX_DIMS) or min(dims) < 1:
            raise CheckpointError(f"{where}: dims {dims} are not 1 to 4 positive sizes")
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if dims[0] % block or numel(tuple(dims)) > 2**56:
            raise CheckpointError(f"{where}: dims {dims} do not fit blocks of {block}")
        nbytes = numel(tuple(dims)) // block * type_size
        if t.data_offset % reader.alignment:
            raise CheckpointError(f"{where}: data offset {t.data_offset} is not aligned to {reader.alignment}")
        check_extent(t.data_offset, nbytes, size, where)
        spans.append((t.data_offset, nbytes, t.name))
    end = 0
    for start, nbytes, name in sorted(spans):
        if start < end:
            raise CheckpointError(f"{path}: tensor {describe(name)} overlaps the one before it")
        end = start + nbytes


# GGUF metadata value types: fixed sizes; 8 is a string, 9 an array.
GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
MAX_GGUF_COUNT = 1 << 20      # tensors, metadata keys, array elements: Llama 3's merges are 280K
MAX_GGUF_STRING = 1 << 24


class _Cursor:
    """A walk through a GGUF header in which every read, length and count is bounded by the
    bytes left in the file."""

    def __init__(self, path: str, data):
        self.path, self.data, self.size, self.pos = path, data, len(data), 0

    def take(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: header runs past the end of the file at byte {self.pos}")
        self.pos += n
        return struct.unpack_from(fmt, self.data, self.pos - n)

    def count(self, n: int, min_bytes: int, what: str) -> int:
        if n > MAX_GGUF_COUNT or n * min_bytes > self.size - self.pos:
            raise CheckpointError(f"{self.path}: {what} count {n} at byte {self.pos} does not fit the file")
        return n

    def string(self, what: str) -> None:
        (n,) = self.take("<Q")
        if n > MAX_GGUF_STRING or self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: {what} of {n} bytes at byte {self.pos} does not fit the file")
        self.pos += n

    def value(self, kind: int, depth: int = 0) -> None:
        if kind in GGUF_SCALAR_SIZES:
            self.take(f"<{GGUF_SCALAR_SIZES[kind]}s")
        elif kind == 8:
            self.string("string")
        elif kind == 9 and depth == 0:
            item, n = self.take("<IQ")
            if item in GGUF_SCALAR_SIZES:
                self.take(f"<{self.count(n, GGUF_SCALAR_SIZES[item], 'array') * GGUF_SCALAR_SIZES[item]}s")
            elif item == 8:
                for _ in range(self.count(n, 8, "array")):
                    self.string("string")
            else:
                raise CheckpointError(f"{self.path}: array of type {item} at byte {self.pos} is not supported")
        else:
            raise CheckpointError(f"{self.path}: metadata type {kind} at byte {self.pos} is not supported")


def check_layout(path: str, data) -> int:
    """Walk a GGUF's header (metadata and tensor infos) with every length and count bounded
    by the bytes left, before gguf's reader, which handles arrays element by element and
    loops without end on an array whose declared length runs past the file. Returns the
    number of values its tensors hold (what float32 copies of them would take / 4)."""
    c = _Cursor(path, data)
    magic, version = c.take("<4sI")
    if magic != b"GGUF" or version not in (2, 3):
        raise CheckpointError(f"{path}: not a little-endian GGUF of version 2 or 3")
    n_tensors, n_kv = c.take("<QQ")
    for _ in range(c.count(n_kv, 12, "metadata")):
        c.string("key")
        c.value(c.take("<I")[0])
    values = 0
    for _ in range(c.count(n_tensors, 24, "tensor")):
        c.string("tensor name")
        (n_dims,) = c.take("<I")
        if n_dims > 4:
            raise CheckpointError(f"{path}: a tensor with {n_dims} dims at byte {c.pos} (GGUF has at most 4)")
        values += numel(c.take(f"<{n_dims}QIQ")[:n_dims])
    return values


def gguf_values(path: str) -> int:
    """How many values a GGUF's tensors hold, from its header alone (checked as check_layout
    checks it; gguf's reader, which takes seconds on a large vocabulary, is not run)."""
    with open_regular(path) as f:
        if file_size(f) < 24:
            raise CheckpointError(f"{path}: too short for a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return check_layout(path, data)


def parse_gguf(path: str):
    """The checked header of a llama GGUF: (reader, args, Meta name -> gguf tensor, extra
    files, a read-only map of the file). The file is opened once; its header is walked with
    bounds (check_layout), parsed by gguf's reader through the same descriptor, and every
    tensor's extent checked against that descriptor's size; tensor data is read from the map."""
    import gguf  # here, not at the top: a start that reads no GGUF does not pay for it (and yaml)
    with open_regular(path) as f:   # a FIFO or device is refused before gguf maps it
        size = file_size(f)
        if size < 24:
            raise CheckpointError(f"{path}: too short for a GGUF file")
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        check_layout(path, data)
        # /proc/self/fd/N is this descriptor: gguf's reader reads the very file checked above
        same_file = f"/proc/self/fd/{f.fileno()}"
        try:
            # quiet: a lying header makes numpy warn inside gguf's reader, and the error below says it in one line
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                reader = gguf.GGUFReader(same_file if os.path.exists(same_file) else path)
        except Exception as e:  # noqa: BLE001  gguf's parser fails in many ways on a damaged file: name the file
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    check_tensors(reader, path, size)
    args = gguf_args(reader, path)
    by_name = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
                raise CheckpointError(f"{path}: rope_freqs.weight is not a float32 vector")
            args = gguf_rope_scaling(args, np.asarray(t.data, dtype=np.float32), path)
            continue
        meta = gguf_to_meta(t.name)
        if meta is None:
            raise CheckpointError(f"{path}: unknown tensor {describe(t.name)}")
        if len(t.shape) == 1 and int(t.tensor_type) not in (0, 1, 30):   # llama.cpp writes norms as floats
            raise CheckpointError(f"{path}: {describe(t.name)} is a vector of type {t.tensor_type.name}, not "
                                  "F32, F16 or BF16")
        by_name[meta] = t
    return reader, args, by_name, gguf_extra(reader, path, args.vocab_size), data


def check_types(path: str, by_name: dict, supported) -> None:
    for t in by_name.values():
        if t.tensor_type not in supported:
            raise CheckpointError(f"{path}: tensor {t.name}: type {t.tensor_type.name} is not supported")


def gguf_args(reader, path: str) -> ModelArgs:
    """The llama.* metadata as ModelArgs."""
    arch = gguf_field(reader, "general.architecture", str, path=path)
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {describe(arch)} is not llama")
    g = lambda k, kind=int, d=None: gguf_field(reader, f"llama.{k}", kind, d, path)  # noqa: E731
    tokens = gguf_field(reader, "tokenizer.ggml.tokens", list, path=path)
    n_heads = g("attention.head_count")
    try:
        args = ModelArgs(dim=g("embedding_length"), n_layers=g("block_count"), n_heads=n_heads,
                         n_kv_heads=g("attention.head_count_kv", int, n_heads),
                         vocab_size=g("vocab_size", int, None) or len(tokens or []),
                         hidden_dim=g("feed_forward_length"),
                         norm_eps=g("attention.layer_norm_rms_epsilon", float, 1e-5),
                         rope_theta=g("rope.freq_base", float, 10000.0),
                         # the trained context, as it is (the runtime context is chosen when running)
                         max_seq_len=g("context_length", int, 2048))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    rope_dim = g("rope.dimension_count")
    if rope_dim is not None and rope_dim != args.head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope dim {rope_dim}) are not supported")
    # Llama 3.1's scaling comes as rope_freqs.weight; llama.cpp's other kinds (linear, yarn)
    # would change every position's rotation, so they are refused, not dropped.
    scaling, factor = g("rope.scaling.type", str, "none"), g("rope.scaling.factor", float, None)
    if scaling != "none" or factor not in (None, 0.0, 1.0):
        raise CheckpointError(f"{path}: rope scaling {describe(scaling)} with factor {describe(factor)} "
                              "(llama.rope.scaling.*) is not supported; Llama 3.1's comes as rope_freqs.weight")
    # Variants llama.cpp runs under the llama architecture that npllama's Llama is not.
    for key, plain in (("expert_count", 0), ("attention.sliding_window", 0), ("logit_scale", 1.0)):
        value = gguf_field(reader, f"llama.{key}", None, plain, path)
        if value != plain:
            raise CheckpointError(f"{path}: llama.{key} {describe(value)} is a variant npllama does not implement")
    return args


def gguf_extra(reader, path: str, vocab_size: int | None = None) -> dict[str, bytes]:
    """What a converted directory holds beside the tensors: the tokenizer, as tokenizer.json."""
    if gguf_field(reader, "tokenizer.ggml.tokens", list, path=path) is None:
        return {}
    spec = gguf_tokenizer_spec(lambda key, default=None: gguf_field(reader, key, None, default, path), path)
    return {"tokenizer.json": spec_json(spec, path, vocab_size)}


def read_gguf(path: str, blocks: bool = False) -> Source:
    """A GGUF as a Source for conversion: each tensor dequantized to float32 with gguf's own
    code (F16 kept as float16, BF16 as its bits); with blocks, each matrix of a block type
    npllama runs (model/quant.py) kept as its blocks, a QuantTensor over the file."""
    import gguf  # here, not at the top: a start that reads no GGUF does not pay for it (and yaml)
    _, args, by_name, extra, data = parse_gguf(path)
    check_types(path, by_name, {q for q in gguf.GGMLQuantizationType if gguf.quants._type_traits.get(q) is not None}
                | {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16})

    def load(name: str) -> np.ndarray:
        t = by_name[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            return np.array(t.data.view(np.float16))
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            return np.array(t.data.view(np.uint16))
        if kept(t, shapes[name]):
            return QuantTensor(_raw(data, t, shapes[name]), int(t.tensor_type), shapes[name], name)
        # GGUF stores q/k already in Meta's interleaved layout: no permutation here. Quiet: a
        # NaN made of a lying type is refused by name when the tensor is written.
        with np.errstate(all="ignore"):
            return np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def kept(t, shape) -> bool:   # kept as its blocks
        return blocks and len(shape) == 2 and int(t.tensor_type) in TYPES and TYPES[int(t.tensor_type)][1] > 1

    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    nbytes = sum(_raw_bytes(t, shapes[n]) if kept(t, shapes[n]) else numel(shapes[n]) * 4 for n, t in by_name.items())
    return Source(path, args, shapes, nbytes, load, extra_data=extra)


def _raw_bytes(t, shape) -> int:
    # whole rows of the tensor's type (check_tensors checked the extent: rows are whole)
    return numel(shape[:-1]) * row_bytes(int(t.tensor_type), shape[-1], t.name)


def _raw(data, t, shape) -> np.ndarray:
    # a tensor's bytes in the mapped file (check_tensors checked they lie inside it)
    return np.frombuffer(data, np.uint8, _raw_bytes(t, shape), t.data_offset)


def open_gguf(path: str) -> tuple[ModelArgs, dict, dict[str, bytes]]:
    """A GGUF's params, its tensors by Meta's names and its tokenizer file, with no float copy:
    each matrix a QuantTensor over its own blocks in a read-only map of the file (whatever
    its type, F32 and F16 included), each vector (the norms: a few KB) widened to float32.
    Shapes are checked against the params before a byte of tensor data is read."""
    _, args, by_name, extra, data = parse_gguf(path)
    check_types(path, by_name, set(TYPES))
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    check_shapes(args, shapes, path, error=CheckpointError)
    tensors = {}
    for name, t in by_name.items():
        qtype, shape = int(t.tensor_type), shapes[name]
        raw = _raw(data, t, shape)
        if len(shape) == 1:
            tensors[name] = dequantize(raw, qtype, shape[0], name).reshape(shape)
        else:
            tensors[name] = QuantTensor(raw, qtype, shape, name)
    return args, tensors, extra


def gguf_rope_scaling(args: ModelArgs, divisors: np.ndarray, path: str) -> ModelArgs:
    """llama.cpp stores Llama 3.1 rope scaling as a divisor per frequency (rope_freqs). Accept
    it when it is Meta's scaling (low/high frequency factors 1 and 4 over 8192 positions) with
    the factor its largest divisor; anything else is refused rather than approximated."""
    if divisors.shape != (args.head_dim // 2,) or not np.all(np.isfinite(divisors)) or not divisors.max() > 0:
        raise CheckpointError(f"{path}: rope_freqs.weight is not Llama 3.1's rope scaling; not supported")
    scaled = dataclasses.replace(args, use_scaled_rope=True, rope_scaling_factor=float(divisors.max()))
    scaling = dict(factor=scaled.rope_scaling_factor, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    plain = rope_frequencies(args.head_dim, args.rope_theta)
    expected = plain / rope_frequencies(args.head_dim, args.rope_theta, scaling)
    if not np.allclose(divisors, expected, rtol=1e-5):
        raise CheckpointError(f"{path}: rope_freqs.weight is not Llama 3.1's rope scaling; not supported")
    return scaled
