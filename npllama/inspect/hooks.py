"""A trace from any torch module: forward hooks on the submodules a name map knows
(npllama.inspect.namemaps), recording what each computes under the module's own path.
compare reads the result through the same map, so the trace needs no renaming by hand.

    hooks = TorchHooks(model, "hf")       # LlamaForCausalLM; "meta" for Meta's Transformer
    model(tokens)
    tr = hooks.take()                     # {module path: array, "__meta__": {"names": "hf", ...}}

torch is never imported here: the hooks only call the tensors' own methods. One forward call
is one step; with a KV cache, call take() after each call (npllama.testing does).
"""
from __future__ import annotations

import numpy as np

from ..model.observer import forward_key
from .namemaps import HOOK_OMITS, compiled, map_name


def to_numpy(t) -> np.ndarray | None:
    """A torch tensor (any dtype, device) as a float32 numpy copy; None for anything else."""
    if not hasattr(t, "detach"):
        return None
    t = t.detach()
    return t.float().cpu().numpy().copy() if t.is_floating_point() else t.cpu().numpy().copy()


class TorchHooks:
    """Forward hooks on every submodule of `module` whose path (or `path:input`, its input;
    `path:1`, its output's second element) the name map `names` gives a trace name, and on
    modules whose path is a trace name."""

    def __init__(self, module, names: str):
        self.names, self.recorded, self.handles = names, {}, []
        table = compiled(names)
        for path, sub in module.named_modules():
            for suffix in ("", ":input", ":1"):
                known, target = map_name(path + suffix, table)
                # a module at a trace name's path the map does not claim (an nn.Identity
                # probe, `self.q_rotated = nn.Identity()`) records that tensor
                if target is not None or (not known and not suffix and forward_key(path) is not None):
                    self.handles.append(self.hook(sub, path + suffix))

    def hook(self, sub, key: str):
        if key.endswith(":input"):
            return sub.register_forward_pre_hook(lambda mod, inp: self.put(key, inp[0] if inp else None))
        index = 1 if key.endswith(":1") else 0
        return sub.register_forward_hook(
            lambda mod, inp, out: self.put(key, out[index] if isinstance(out, (tuple, list)) else
                                           (out if index == 0 else None)))

    def put(self, key: str, t) -> None:
        x = to_numpy(t)
        if x is not None:
            self.recorded[key] = x

    def take(self) -> dict:
        """What the forward calls since the last take() recorded, as a trace under the
        module paths (the last call's value where a module ran more than once)."""
        out, self.recorded = self.recorded, {}
        out["__meta__"] = {"names": self.names, "source": f"torch forward hooks ({self.names} name map)",
                           "omits": HOOK_OMITS.get(self.names, [])}
        return out

    __call__ = take

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
