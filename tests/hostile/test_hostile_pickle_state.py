"""Issue 24, class 8: the .pth unpickler's admitted globals are not mutable through BUILD. A
data.pkl that pushes the admitted torch._utils._rebuild_tensor_v2 and BUILDs it with new
__defaults__ and __doc__ is refused, and the running process's function is unchanged; a
state dict's own OrderedDict _metadata (what torch.save writes with BUILD) still loads.
The first fails on main c1182df (checked: the function is rewritten and the load succeeds)."""
import collections
import struct
import zipfile

import numpy as np
import pytest
import torch

from npllama.errors import CheckpointError
from npllama.io.formats import meta_pth
from npllama.io.formats.meta_pth import PthFile
from test_hostile import FakeStorage, FakeTensor, write_pth

pytestmark = pytest.mark.torch


def text(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s)) + s.encode()    # BINUNICODE


# GLOBAL the admitted function, BUILD it with slot state {__defaults__: (...), __doc__: ...}, POP
REWRITE = (b"ctorch._utils\n_rebuild_tensor_v2\n" + b"N}" + text("__defaults__") + b"(K\x07K\x07K\x07t" + b"s"
           + text("__doc__") + text("rewritten by a checkpoint") + b"s" + b"\x86" + b"b" + b"0")


def with_prefix(path, prefix: bytes):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    pkl = members["archive/data.pkl"]
    assert pkl[:2] == b"\x80\x02"
    members["archive/data.pkl"] = pkl[:2] + prefix + pkl[2:]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_build_on_an_admitted_global_is_refused_and_changes_nothing(tmp_path):
    path = str(tmp_path / "consolidated.00.pth")
    write_pth(path, {"a": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))}, {"0": np.zeros(4, np.float32)})
    with_prefix(path, REWRITE)
    defaults, doc = meta_pth._rebuild_tensor_v2.__defaults__, meta_pth._rebuild_tensor_v2.__doc__
    try:
        with pytest.raises(CheckpointError, match="did not create"):
            PthFile(path)
        assert meta_pth._rebuild_tensor_v2.__defaults__ == defaults
        assert meta_pth._rebuild_tensor_v2.__doc__ == doc
    finally:
        meta_pth._rebuild_tensor_v2.__defaults__, meta_pth._rebuild_tensor_v2.__doc__ = defaults, doc


def test_a_state_dict_with_metadata_still_loads(tmp_path):
    # torch.save of a module's state_dict(): an OrderedDict whose _metadata is set with BUILD
    sd = torch.nn.Linear(4, 2).state_dict()
    assert hasattr(sd, "_metadata")
    path = str(tmp_path / "consolidated.00.pth")
    torch.save(sd, path)
    f = PthFile(path)
    np.testing.assert_array_equal(f.array("weight"), sd["weight"].numpy())


class StateDictWithState(collections.OrderedDict):
    """Pickles as an OrderedDict followed by BUILD with the given state (torch.save writes
    only {"_metadata": ...} there): attributes that would shadow the dict's methods."""

    def __init__(self, items, state):
        super().__init__(items)
        self.state = state

    def __reduce__(self):
        return collections.OrderedDict, (), self.state, None, iter(self.items())


@pytest.mark.parametrize("state", [{"get": 1}, {"items": 1}, {"_metadata": {}, "items": 1},
                                   ({"_metadata": {}}, {"get": 1})], ids=["get", "items", "metadata+items", "slots"])
def test_a_state_dict_given_other_state_than_metadata_is_refused(tmp_path, state):
    # before: `get` or `items` shadowed by an int, so reading the state dict raised TypeError
    path = str(tmp_path / "consolidated.00.pth")
    sd = StateDictWithState({"a": FakeTensor(FakeStorage("0", 4), 0, (4,), (1,))}, state)
    write_pth(path, sd, {"0": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="consolidated.00.pth: data.pkl gives a state dict the state") as e:
        PthFile(path)
    assert "\n" not in str(e.value)
