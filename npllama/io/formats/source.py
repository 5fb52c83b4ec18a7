"""What every format reader yields: params, each tensor's declared shape, and a loader that
reads one tensor at a time. The shapes are checked against the params here, once, for
every format, before any tensor data is read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ...model.config import ModelArgs
from ...errors import CheckpointError


def check_shapes(args: ModelArgs, shapes: dict[str, tuple[int, ...]], where: str, ignored=("rope.freqs",)) -> None:
    """Every tensor the params need is there with the shape they imply, and nothing else
    (output.weight may be absent: a tied head). `where` names the file in the error."""
    from ...model.model import expected_shapes
    from ...untrusted import describe
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(shapes) - {"output.weight"})
    if missing:
        more = f" (+{len(missing) - 1} more)" if missing[1:] else ""
        raise CheckpointError(f"{where}: missing tensor {missing[0]}{more}")
    for name, shape in shapes.items():
        if name in ignored:
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {describe(name)} for these params")
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(shape)}, the params say {expected[name]}")


@dataclass
class Source:
    path: str
    args: ModelArgs
    shapes: dict[str, tuple[int, ...]]       # Meta's name -> shape, as the file declares it
    nbytes: int                              # bytes the loaded tensors will take
    load: Callable[[str], np.ndarray]        # name -> float32/float16 or uint16 (bf16 bits)
    extra_files: dict = field(default_factory=dict)    # name in DST -> file to copy (path, or open_inside's file)
    extra_data: dict[str, bytes] = field(default_factory=dict)   # name in DST -> contents

    def check(self) -> None:
        check_shapes(self.args, self.shapes, self.path)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in a fixed order, each read only when reached; check() first."""
        self.check()
        for name in self.shapes:
            arr = self.load(name)
            if arr.shape != tuple(self.shapes[name]):  # the readers build arrays from the checked shapes
                raise CheckpointError(f"{self.path}: tensor {name} read as {arr.shape}, declared {self.shapes[name]}")
            yield name, arr
