"""What every format reader yields: params, each tensor's declared shape, and a loader that
reads one tensor at a time. The shapes are checked against the params here, once, for
every format, before any tensor data is read."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ...model.config import ModelArgs
from ...errors import CheckpointError
from ...model.weights import check_shapes


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
        check_shapes(self.args, self.shapes, self.path, error=CheckpointError)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) in a fixed order, each read only when reached; check() first."""
        self.check()
        for name in self.shapes:
            arr = self.load(name)
            if arr.shape != tuple(self.shapes[name]):  # the readers build arrays from the checked shapes
                raise CheckpointError(f"{self.path}: tensor {name} read as {arr.shape}, declared {self.shapes[name]}")
            yield name, arr
