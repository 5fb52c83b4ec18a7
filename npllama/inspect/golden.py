"""Golden-vector bundles: a small set of plain .npy/.json files another implementation can
drop into its test suite."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np

from ..version import __version__
from ..io.atomic import check_directory, refuse_overlap, staged_directory
from ..model.quant import QuantTensor
from .tracefile import trace
from ..errors import NpllamaError
from ..untrusted import inside, read_json

README = """# npllama golden vectors

Made by npllama {version} (`npllama golden`) from the model in `golden.json` ("params"),
numerics `{dtype}`. Everything is plain `.npy` (`np.load`, no pickles) and JSON.

- `tokens.npy` — the prompt's token ids, shape (T,), positions 0..T-1.
- `logits.npy` — float32 logits, shape (T, vocab): row t predicts token t+1.
- `<name>.npy` — intermediates, named and laid out as in npllama's README "Trace format":
  q/k in Meta's interleaved RoPE layout, `probs` shape (n_heads, T, T), `attention`
  (T, dim) with heads stacked in order.
- `golden.json` — `weights_sha256` (which weights made it: weights_digest, over every
  tensor's name, dtype, shape and bytes as npllama held them), `chunks` (the forward calls the
  prompt ran as, null for one pass: the intermediates are the same either way), params,
  dtype, prompt (null for a bundle made from token ids), tokens, the greedy continuation
  (`greedy.tokens`, `greedy.text`, {n_new} new tokens or up to a stop token), and the
  shape/dtype of every file.

Suggested tolerances for a float32 implementation: max |yours - golden| <= 1e-4 * max |golden|
per tensor (npllama agrees with HF transformers and Meta's reference to ~1e-6); the greedy
tokens should match exactly unless two logits tie within that tolerance. Check with
`npllama compare yours.npz THIS_DIRECTORY` (a bundle is a trace compare reads; strict:
every tensor here must be in yours).
"""


def weights_digest(weights: Mapping[str, np.ndarray], chunk: int = 1 << 24) -> str:
    """sha256 over the tensors in name order: each one's name, dtype and shape, then its
    bytes, a chunk at a time (a memory-mapped checkpoint is read, not copied). A GGUF's
    quantized matrix: its type, logical shape and blocks."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        x = np.ascontiguousarray(w.raw if isinstance(w, QuantTensor) else w)
        kind = w.type_name if isinstance(w, QuantTensor) else x.dtype.str
        h.update(f"{name} {kind} {list(w.shape)}\n".encode())
        flat = x.reshape(-1).view(np.uint8) if x.size else np.zeros(0, np.uint8)
        for i in range(0, flat.size, chunk):
            h.update(flat[i:i + chunk])
    return h.hexdigest()


def selected_names(n_layers: int) -> list[str]:
    first = [f"layers.0.{n}" for n in ("attention_norm", "q", "k", "v", "q_rotated", "k_rotated", "probs",
                                          "attention", "attention_out", "h", "ffn_out", "out")]
    return ["token_embeddings", *first, f"layers.{n_layers - 1}.out", "norm", "logits"]


def is_bundle(path: str) -> bool:
    """Whether a directory holds a golden.json npllama wrote (what --force may replace)."""
    try:
        meta = read_json(inside(path, "golden.json"))
    except NpllamaError:
        return False
    return isinstance(meta, dict) and "npllama" in meta and "files" in meta


def check_destination(out: str, force: bool) -> None:
    check_directory(os.path.abspath(out), force, is_bundle, "golden bundle")


DEFAULT_PROMPT = "The answer to the ultimate question of life, the universe, and everything is"


def write_golden(gen, out: str, prompt: str | None = None, max_new_tokens: int = 32, force: bool = False,
                 tokens: list[int] | None = None, chunks: Sequence[int] | None = None) -> dict:
    """The bundle for `prompt` (default DEFAULT_PROMPT), or for token ids given as they are;
    chunks: the intermediates recorded from the prompt run as these KV-cache calls
    (tracefile.schedule)."""
    refuse_overlap(out, [getattr(gen.model, "path", None)], "golden bundle")
    check_destination(out, force)
    model, tok = gen.model, gen.tokenizer
    if tokens is None:
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        tokens = tok.encode(prompt, bos=tok.add_bos)
    n = model.args.n_layers
    tr = trace(model, tokens, layers=sorted({0, n - 1}), chunks=chunks)
    result = gen.generate(tokens, max_new_tokens)
    with staged_directory(out, force, is_bundle, "golden bundle") as tmp:
        files = {}
        for name in ["tokens", *selected_names(n)]:
            arr = np.asarray(tr[name])
            np.save(os.path.join(tmp, name + ".npy"), arr)
            files[name + ".npy"] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
        meta = {"npllama": __version__, "weights_sha256": weights_digest(model.weights),
                "chunks": tr["__meta__"]["chunks"], "params": model.args.to_dict(), "dtype": model.dtype, "prompt": prompt,
                "tokens": [int(t) for t in tokens],
                "greedy": {"tokens": result.tokens, "text": result.text, "stop_reason": result.stop_reason},
                "files": files}
        with open(os.path.join(tmp, "golden.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(README.format(version=__version__, dtype=model.dtype, n_new=max_new_tokens))
    return meta
