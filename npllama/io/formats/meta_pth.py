"""Meta's checkpoints: consolidated.NN.pth (torch.save zip archives) and params.json, read
without torch. The pickle is loaded by an unpickler that admits only the globals a state
dict of tensors needs; every tensor's storage, offset, shape and strides are then checked
against its zip member before any of its data is read."""
from __future__ import annotations

import collections
import glob
import io
import os
import pickle
from typing import Any, NamedTuple

import numpy as np

from ...model.config import ModelArgs
from ...errors import CheckpointError
from .source import Source
from ...untrusted import ZipReader, check_shape, describe, inside, map_array, numel, open_inside, strided_span
from ...model.weights import IGNORED_WEIGHTS

MAX_PICKLE_BYTES = 64 * 1024**2     # a 405B shard's data.pkl is ~100 KB

# torch storage class -> numpy dtype of its elements (BFloat16 as uint16 bits).
TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": np.uint16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


# NamedTuples: a pickle cannot build them except through the functions below, and its
# BUILD opcode cannot change their fields afterwards.
class _Storage(NamedTuple):
    kind: str
    key: str


class LazyTensor(NamedTuple):
    """A tensor of a .pth file whose data stays in the file until asked for."""
    storage: Any
    offset: Any
    shape: Any
    stride: Any


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _RestrictedUnpickler(pickle._Unpickler):
    """Admits only what a state dict of tensors needs; a checkpoint is untrusted input. The
    pure-Python unpickler (a data.pkl is ~100 KB), so that BUILD (which sets attributes, or
    calls __setstate__) can be held to the objects this unpickler created for the checkpoint
    (a state dict's OrderedDict and its _metadata): applied to an admitted global (our
    _rebuild_tensor_v2, say) it would rewrite that function's __defaults__ in this process."""

    dispatch = dict(pickle._Unpickler.dispatch)

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    ALLOWED.update({("torch", name): name for name in TORCH_STORAGES})

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path
        self.created: dict[int, Any] = {}   # id -> object made by REDUCE or NEWOBJ (kept alive, so ids stay unique)

    def _made(self) -> None:
        self.created[id(self.stack[-1])] = self.stack[-1]

    def load_reduce(self):
        pickle._Unpickler.load_reduce(self)
        self._made()
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        pickle._Unpickler.load_newobj(self)
        self._made()
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_build(self):
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if id(target) not in self.created or not isinstance(target, collections.OrderedDict):
            raise CheckpointError(f"{self.path}: data.pkl sets the state of {describe(target)}, which it did not "
                                  "create (only a state dict's own OrderedDicts may be given one)")
        state = self.stack[-1]
        # torch.save gives a state dict only its _metadata (the module versions); any other
        # attribute would shadow the dict's own methods (get, items) for every later reader
        if not (state is None or (type(state) is dict and all(type(k) is str and k == "_metadata" for k in state))):
            raise CheckpointError(f"{self.path}: data.pkl gives a state dict the state {describe(state)} (torch.save "
                                  "writes only _metadata there); refusing to load it")
        pickle._Unpickler.load_build(self)
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.path}: refusing to load global {describe(module)}.{describe(name)} "
                                  "(only tensor state dicts are accepted)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], str)
                and pid[1] in TORCH_STORAGES and isinstance(pid[2], str)):
            raise CheckpointError(f"{self.path}: unsupported persistent id {describe(pid)}")
        return _Storage(pid[1], pid[2])


class PthFile:
    """A torch.save zip archive read without torch: the state dict's tensors, checked, and
    read one at a time."""

    def __init__(self, path: str, opened=None):
        self.path = path
        # the archive's descriptor stays open: every tensor is read through the one checked
        self.zip = z = ZipReader(path, opened=opened)
        pkl = [n for n in z.members if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: {len(pkl)} data.pkl members (a torch.save zip has one; legacy "
                                  "non-zip torch files are not supported)")
        self.prefix = pkl[0][: -len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in z.members and z.read(byteorder, 16) != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        data = z.read(pkl[0], MAX_PICKLE_BYTES)
        members = {n: z.extent(n) for n in z.members if n.startswith(self.prefix + "data/")}
        try:
            state = _RestrictedUnpickler(io.BytesIO(data), path).load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  a malformed pickle fails in pickle's own ways: name the file
            raise CheckpointError(f"{path}: unreadable data.pkl ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        self.tensors: dict[str, LazyTensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, tuple[np.dtype, int, int]] = {}  # name -> dtype, storage offset, size
        for name, t in state.items():
            where = f"{path}: tensor {describe(name)}"
            if not isinstance(t, LazyTensor) or not isinstance(t.storage, _Storage):
                raise CheckpointError(f"{where} is not a tensor over a storage ({type(t).__name__})")
            shape = check_shape(t.shape, where)
            span = strided_span(shape, t.stride, t.offset, where)
            dtype = np.dtype(TORCH_STORAGES[t.storage.kind])
            member = f"{self.prefix}data/{t.storage.key}"
            if member not in members:
                raise CheckpointError(f"{where}: storage {describe(member)} is missing")
            start, size = members[member]
            if span * dtype.itemsize > size:
                raise CheckpointError(f"{where} extends past its storage ({span} elements of {dtype}, "
                                      f"{size} bytes stored)")
            self.tensors[name] = LazyTensor(t.storage, t.offset, shape, tuple(t.stride))
            self.shapes[name] = shape
            self._where[name] = (dtype, start, size)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a contiguous array (bf16 as uint16 bits), read from its checked extent."""
        t = self.tensors[name]
        dtype, start, size = self._where[name]
        if numel(t.shape) == 0:
            return np.zeros(t.shape, dtype)
        storage = map_array(self.zip.file, dtype, start, (size // dtype.itemsize,), f"{self.path}: tensor {name}")
        view = np.lib.stride_tricks.as_strided(storage[t.offset:], shape=t.shape,
                                               strides=tuple(s * dtype.itemsize for s in t.stride))
        return np.ascontiguousarray(view)


# Llama 3 model-parallel sharding (Meta's fairscale layers): column-parallel weights are
# split on the output axis, row-parallel on the input axis, norms are replicated.
MP_CONCAT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "tok_embeddings": 0,
                  "wo": 1, "w2": 1}


def mp_axis(name: str) -> int | None:
    """Concatenation axis for a model-parallel tensor, None for a replicated one."""
    parts = name.split(".")
    key = parts[-2] if parts[-1] == "weight" else parts[-1]
    return MP_CONCAT_AXIS.get(key)


def merged_shape(name: str, files: list[PthFile]) -> tuple[int, ...]:
    """The shape of a tensor once its model-parallel pieces are put together."""
    axis = mp_axis(name)
    shapes = [f.shapes[name] for f in files]
    first = shapes[0]
    if axis is None or len(files) == 1:
        bad = next((f for f, s in zip(files, shapes) if s != first), None)
        if bad is not None:
            raise CheckpointError(f"{bad.path}: replicated tensor {name} has shape {bad.shapes[name]}, "
                                  f"{files[0].path} has {first}")
        return first
    if len(first) <= axis or any(len(s) != len(first) or s[:axis] + s[axis + 1:] != first[:axis] + first[axis + 1:]
                                 for s in shapes):
        raise CheckpointError(f"{files[0].path}: tensor {name}: model-parallel pieces {shapes} do not concatenate "
                              f"on axis {axis}")
    return first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1:]


def read_meta(src: str) -> Source:
    paths = sorted(glob.glob(os.path.join(glob.escape(src), "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{src}: no consolidated.*.pth files")
    args = ModelArgs.from_json(inside(src, "params.json"))
    files = [PthFile(inside(src, os.path.basename(p)), open_inside(src, os.path.basename(p))) for p in paths]
    names = list(files[0].tensors)
    for f in files[1:]:
        if set(f.tensors) != set(names):
            differ = sorted(set(names) ^ set(f.tensors))[:3]
            raise CheckpointError(f"{f.path}: tensor names differ from {files[0].path} ({', '.join(differ)})")
    names = [n for n in names if n not in IGNORED_WEIGHTS]
    shapes = {n: merged_shape(n, files) for n in names}

    def load(name: str) -> np.ndarray:
        axis = mp_axis(name)
        if len(files) == 1 or axis is None:
            # Norms are replicated; Meta's copies are not bit-identical, shard 0's is taken.
            return files[0].array(name)
        return np.concatenate([f.array(name) for f in files], axis=axis)

    nbytes = sum(numel(s) * files[0]._where[n][0].itemsize for n, s in shapes.items())
    extra = {}
    if os.path.lexists(os.path.join(src, "tokenizer.model")):
        extra["tokenizer.model"] = open_inside(src, "tokenizer.model")   # copied through this checked descriptor
    return Source(src, args, shapes, nbytes, load, extra)
