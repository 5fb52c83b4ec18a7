#!/usr/bin/env python3
"""A mutation fuzzer for every reader of untrusted files.

    python tools/fuzz.py --minutes 30 [--targets meta,hf,gguf,npllama,trace,tokenizer,...] [--keep DIR]

Each target starts from a small valid input it writes with the format's own writer
(torch.save for Meta's .pth, safetensors' for HF, gguf's for GGUF, npllama's for its own
checkpoints and traces), applies random mutations (truncation, byte flips, interesting
integers over header fields, JSON edits, zip member renames/duplicates/compression,
pickle integer edits, .npy header edits, the file swapped for a FIFO, a directory or a
symbolic link leading out) and runs npllama's reader on the result in a worker process
with an address-space limit. A case passes when the reader returns data that is in
bounds (the output re-reads and every value is touched) or raises npllama's own error
naming a file of the case; anything else (another exception, a crash, a hang, memory
beyond the limit) fails. The test suite (tests/hostile/test_fuzz.py) runs a few hundred cases
with hypothesis; this runs for as long as asked and keeps failing cases under --keep.

A new target is a seed writer and a reader: add them to TARGETS.
"""
from __future__ import annotations

import argparse
import json
import os
import pickletools
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_LIMIT = 2 * 1024**3      # address space of a worker: numpy and gguf need ~1 GB of it
BATCH_TIMEOUT = 120             # seconds for a whole batch: a hang fails
# Per case, asserted (not only the absence of exceptions): the peak resident memory of the
# worker and of any confined child it waited for, and the wall time. A template or
# tokenizer is confined to 1 GiB past its worker's start and 10 CPU s (60 s wall) per
# request (npllama.text.confined), and a case makes a few requests: anything past these
# bounds means a limit did not hold.
CASE_MEMORY = 1536 * 1024**2
CASE_SECONDS = 150.0
SECRET = b"NPLLAMA-FUZZ-SECRET-OUTSIDE-THE-CHECKPOINT"


# --- seeds: small valid inputs, written by each format's own writer ----------------------

def _args(vocab: int = 8):
    from npllama import ModelArgs
    return ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=vocab, multiple_of=32,
                     rope_theta=10000.0, max_seq_len=64)


def _weights(args, seed: int = 0):
    import numpy as np
    from npllama.model.weights import expected_shapes
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in expected_shapes(args).items()}


def seed_meta(d: str) -> None:
    import torch
    args = _args()
    sd = {k: torch.from_numpy(v).to(torch.bfloat16 if v.ndim == 2 else torch.float32)
          for k, v in _weights(args).items()}
    torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump({"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                   "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "norm_eps": 1e-5,
                   "rope_theta": args.rope_theta}, f)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(b"IQ== 0\n")


def seed_hf(d: str, vocab: int = 8) -> None:
    from safetensors.numpy import save_file
    from npllama.io.formats.names import meta_to_hf
    args = _args(vocab)
    w = {meta_to_hf(k): v.astype("float16" if v.ndim == 2 else "float32") for k, v in _weights(args).items()}
    names = sorted(w)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
        save_file({k: w[k] for k in keys}, os.path.join(d, file), metadata={"format": "pt"})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: file for file, keys in parts.items() for k in keys}}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
                   "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
                   "vocab_size": args.vocab_size, "intermediate_size": args.ffn_dim, "rms_norm_eps": 1e-5,
                   "rope_theta": args.rope_theta, "max_position_embeddings": 64, "tie_word_embeddings": False}, f)


def seed_gguf(d: str) -> None:
    import gguf
    import numpy as np
    from npllama.text.tokenizer_import import gpt2_byte_decoder
    from npllama.io.formats.names import meta_to_gguf
    alphabet = sorted(gpt2_byte_decoder(), key=gpt2_byte_decoder().get)
    tokens = alphabet + ["<|im_start|>", "<|im_end|>"]
    args = _args(vocab=len(tokens))
    w = gguf.GGUFWriter(os.path.join(d, "model.gguf"), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(64)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(args.rope_theta)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_merges([])
    w.add_eos_token_id(257)
    w.add_chat_template("<|im_start|>system\nBe brief.<|im_end|>")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, x in _weights(args).items():
        if name.endswith("wq.weight"):
            w.add_tensor(meta_to_gguf(name), gguf.quants.quantize(x, q8), raw_dtype=q8)
        elif x.ndim == 2 and "ffn" in meta_to_gguf(name):
            w.add_tensor(meta_to_gguf(name), x.astype(np.float16))
        else:
            w.add_tensor(meta_to_gguf(name), x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def seed_npllama(d: str) -> None:
    from npllama.model import bf16
    from npllama.io import checkpoint
    args = _args()
    w = {k: (bf16.to_bits(v) if k.endswith("wk.weight") else v) for k, v in _weights(args).items()}
    os.rmdir(d)
    checkpoint.write_checkpoint(d, args, iter(w.items()), 0, len(w), shard_bytes=4000, quiet=True)


def seed_trace(d: str) -> None:
    import numpy as np
    from npllama.inspect import tracefile as tracing
    from npllama.model.model import Transformer
    args = _args()
    tr = tracing.trace(Transformer(args, _weights(args)), np.array([1, 2, 3]))
    tracing.save(os.path.join(d, "a.npz"), tr)


def seed_hf_tokenizer(d: str) -> None:
    """An HF tokenizer folder: tokenizer.json written by HF tokenizers (a byte-level BPE with
    SmolLM's pre-tokenizer, three merges, two control tokens, and without the bytes 0xF5-0xFF,
    as SmolLM2's vocabulary lacks some), tokenizer_config.json, generation_config.json and
    chat_template.jinja as transformers saves them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from npllama.text.tokenizer_import import gpt2_byte_decoder
    alphabet = [c for c in sorted(gpt2_byte_decoder(), key=gpt2_byte_decoder().get) if gpt2_byte_decoder()[c] < 0xF5]
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({"ab": len(vocab), "Ġab": len(vocab) + 1, "abab": len(vocab) + 2})   # each from the last
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "ab"), ("ab", "ab")]))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    t.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": {"content": "<|im_end|>"}, "model_max_length": 64}, f)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [len(vocab) + 1]}, f)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def seed_tokenizer(d: str) -> None:
    """npllama's tokenizer.json, as the converter writes it from the HF folder above."""
    from npllama.text.tokenizer import spec_json
    from npllama.text.tokenizer_import import hf_tokenizer_spec
    with tempfile.TemporaryDirectory() as hf:
        seed_hf_tokenizer(hf)
        data = spec_json(hf_tokenizer_spec(hf))
    with open(os.path.join(d, "tokenizer.json"), "wb") as f:
        f.write(data)


def seed_tokenizer_model(d: str) -> None:
    """A tokenizer.model of tiktoken ranks (256 bytes and four merges), in the lines tiktoken's
    dump_tiktoken_bpe writes (`base64(token) rank`; that function needs blobfile)."""
    import base64
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b" t", b" th", b"he"]
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.writelines(base64.b64encode(t) + b" " + str(i).encode() + b"\n" for i, t in enumerate(ranks))


def seed_kl_base(d: str) -> None:
    """A KL-divergence base file (llama-perplexity's --kl-divergence-base format), written by
    npllama's writer: three chunks of 8 tokens over a vocabulary of 11."""
    import numpy as np
    from npllama.inspect import perplexity as pp
    rng = np.random.default_rng(0)
    with pp.base_writer(os.path.join(d, "base.kld"), rng.integers(0, 11, (3, 8)), 11) as add:
        for _ in range(3):
            add((rng.standard_normal((pp.scored_rows(8), 11)) * 6).astype(np.float32))


def seed_tokens(d: str) -> None:
    """--tokens-file inputs: a .npy written by np.save and a text file of ids."""
    import numpy as np
    np.save(os.path.join(d, "tokens.npy"), np.array([1, 2, 3, 40000, 7], dtype=np.int32))
    with open(os.path.join(d, "tokens.txt"), "w") as f:
        f.write("128000, 9906 1917\n0,1\n")


# --- readers: run in the worker, on a mutated copy ---------------------------------------

def _touch(arrays) -> None:
    """Read every value (a map past the end of its file would crash here)."""
    import numpy as np
    for a in arrays:
        np.asarray(a).astype("float64").sum()


def read_converted(case: str, src: str) -> None:
    from npllama.io import checkpoint
    from npllama.io.convert import convert
    from npllama.model.weights import expected_shapes
    out = case.rstrip("/") + ".out"   # beside the case: an output inside its source is refused
    convert(src, out, quiet=True)
    try:
        index = checkpoint.read_index(out)
        args = checkpoint.ModelArgs.from_json(os.path.join(out, "params.json"))
        tensors = checkpoint.open_tensors(out, index)
        shapes = expected_shapes(args)
        assert all(tuple(a.shape) == shapes[n] for n, a in tensors.items()), "converted shapes differ from params"
        _touch(tensors.values())
        for name in os.listdir(out):
            with open(os.path.join(out, name), "rb") as f:
                assert SECRET not in f.read(), f"{name} holds bytes from outside the checkpoint"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def read_meta(case: str) -> None:
    read_converted(case, case)


def read_hf(case: str) -> None:
    read_converted(case, case)


def read_gguf(case: str) -> None:
    read_converted(case, os.path.join(case, "model.gguf"))


def read_npllama(case: str) -> None:
    import numpy as np
    import npllama
    from npllama.io import checkpoint
    model = npllama.load(case)
    checkpoint.verify(case)
    checkpoint.nonfinite(case)
    _touch(model.weights.values())
    model.forward(np.array([1, 2, 3]))


def read_trace(case: str) -> None:
    from npllama.inspect import tracefile as tracing
    from npllama.inspect import compare as comparing
    tr = tracing.load(os.path.join(case, "a.npz"))
    _touch(v for k, v in tr.items() if k != "__meta__")
    comparing.compare(tr, tr)


# Text for tokenizers: contractions, digits, a control token typed as text, characters whose
# bytes the seed vocabulary lacks (U+40000, U+FFFF) and a recently assigned letter (U+323B0).
TOKENIZER_TEXT = "it's 1234 <|im_end|> ab abab \U00040000\U000323b0's \uffff x\n\n y"


def use_tokenizer(tok) -> None:
    """Encode, decode and chat with a tokenizer; every id must be in its vocabulary."""
    from npllama.text.tokenizer import chat_format
    for ids in (tok.encode(TOKENIZER_TEXT, bos=True, eos=True), tok.encode(TOKENIZER_TEXT, allowed_special="all")):
        assert all(0 <= t < tok.n_words for t in ids), "an id outside the vocabulary"
        tok.decode(ids)
    if tok.chat_template or tok.chat_format:
        chat_format(tok, tok.default_system).encode_dialog_prompt([{"role": "user", "content": TOKENIZER_TEXT}])


def read_tokenizer(case: str) -> None:
    from npllama.text.tokenizer import load
    use_tokenizer(load(case))


def read_hf_tokenizer(case: str) -> None:
    from npllama.text.tokenizer import load, spec_json
    from npllama.text.tokenizer_import import hf_tokenizer_spec
    spec = hf_tokenizer_spec(case)
    if spec is None:
        return
    out = os.path.join(case, "out")
    os.mkdir(out)
    with open(os.path.join(out, "tokenizer.json"), "wb") as f:
        f.write(spec_json(spec, os.path.join(case, "tokenizer.json")))
    use_tokenizer(load(out))


def read_kl_base(case: str) -> None:
    import math
    import numpy as np
    from npllama.inspect import perplexity as pp
    base = pp.BaseFile.open(os.path.join(case, "base.kld"))
    kl, rng = pp.KLDivergence(), np.random.default_rng(1)
    first = base.n_ctx // 2
    for i in range(len(base.tokens)):
        rows = base.chunk(i)
        kl.add(rng.standard_normal((len(rows), base.n_vocab)).astype(np.float32), rows, base.tokens[i, first + 1:])
    summary = kl.summary()
    pp.format_kl_report(summary)
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float)), "a statistic is not finite"


def read_tokens(case: str) -> None:
    from npllama.io.tokens import read_token_ids
    for name in ("tokens.npy", "tokens.txt"):
        ids = read_token_ids(os.path.join(case, name))
        assert ids and all(type(t) is int for t in ids), "ids are not a list of integers"


# Dialogs a template target renders: plain, with a system turn, and with tool-call-like
# extra keys and a text holding template syntax.
DIALOGS = [[{"role": "user", "content": TOKENIZER_TEXT}],
           [{"role": "system", "content": "s"}, {"role": "user", "content": "{{ 7*7 }} {% if %}"},
            {"role": "assistant", "content": "a", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]]


def read_template(case: str) -> None:
    """The HF folder's tokenizer and chat template, converted and loaded as a converted
    model's, then every dialog rendered (the template compiles and runs confined)."""
    from npllama.text.tokenizer import chat_format
    read_hf_tokenizer(case)
    tok = _converted_tokenizer(case)
    if tok is not None and (tok.chat_template or tok.chat_format):
        for dialog in DIALOGS:
            ids = chat_format(tok, tok.default_system).encode_dialog_prompt(dialog)
            assert all(0 <= t < tok.n_words for t in ids), "an id outside the vocabulary"


def _converted_tokenizer(case: str):
    from npllama.text.tokenizer import load
    out = os.path.join(case, "out")
    return load(out) if os.path.isfile(os.path.join(out, "tokenizer.json")) else None


@dataclass
class Target:
    seed: Callable[[str], None]
    read: Callable[[str], None]
    kinds: tuple = ()          # mutation kinds (default: KINDS)
    batch: int = 40            # cases per worker in a campaign


TARGETS = {
    "meta": Target(seed_meta, read_meta),
    "hf": Target(seed_hf, read_hf),
    "gguf": Target(seed_gguf, read_gguf),
    "npllama": Target(seed_npllama, read_npllama),
    "trace": Target(seed_trace, read_trace),
    "tokenizer": Target(seed_tokenizer, read_tokenizer),
    "hf-tokenizer": Target(seed_hf_tokenizer, read_hf_tokenizer),
    "tokenizer-model": Target(seed_tokenizer_model, read_tokenizer),
    "kl-base": Target(seed_kl_base, read_kl_base),
    "tokens-file": Target(seed_tokens, read_tokens),
    # hostile Jinja (loops, fills, widths, recursion, sandbox escapes) spliced into a real
    # template, and tokenizers grown with many long control tokens or deep pre-tokenizers:
    # what the confined worker bounds (their batches are small: a case may run to a limit)
    "template": Target(seed_hf_tokenizer, read_template, ("jinja", "jinja", "jinja", "splice", "flip"), 6),
    "tokenizer-build": Target(seed_hf_tokenizer, read_hf_tokenizer, ("controls", "controls", "nest", "json"), 6),
}


def _allocate(case: str) -> None:
    import numpy as np
    np.ones(4 * 1024**3, np.uint8)


# Readers that misbehave on purpose, so the tests can show each failure is caught.
CANARIES = {
    "canary-exception": lambda case: {}["not an npllama error"],
    "canary-crash": lambda case: os.kill(os.getpid(), signal.SIGSEGV),
    "canary-memory": _allocate,
    "canary-hang": lambda case: time.sleep(3600),
}


# --- mutations ---------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 7, 64, 255, 256, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1,
               2**63, 2**64 - 1, -1, -2, -2**31, -2**63]
JSON_VALUES = [-1, 0, 1, 2**31, 2**63, 2**64, 10**30, 1e308, -0.0, 0.5, "", "x", "../x", "/etc/hostname",
               "..", None, True, [], {}, [-1], [0, 0], [2**62, 2**62], [1, -1], [[[[1]]]], {"a": 1}, "F32", "BF16",
               "I8", "bfloat16", [0, 2**63]]
KINDS = ("truncate", "flip", "integer", "splice", "json", "zip", "special")
SIZES = [0, 1, 7, 100, 3000, 10**5, 10**6, 10**7, 10**9, 2**31, 2**63]
# Jinja that is cheap to write and may be dear to run; N becomes one of SIZES.
JINJA = [
    "{% for i in range(N) %}{{ messages[0]['content'] }}{% endfor %}", "{{ 'x' * N }}",
    "{% set s = 'ab' %}{% for i in range(40) %}{% set s %}{{ s }}{{ s }}{% endset %}{% endfor %}{{ s }}",
    "{{ (messages|list|batch(N, 'x' * N))|list }}", "{{ '%Ns'|format('a') }}", "{{ '{:N}'.format(1) }}",
    "{{ 'a'.ljust(N) }}", "{{ ([[0]] * N)|sum(start=[]) }}", "{{ messages|tojson(indent=N) }}",
    "{{ messages|tojson(indent='x' * N) }}", "{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}",
    "{{ raise_exception('\x1b[2J\nnpllama: fake line') }}", "{{ range(N)|join(',') }}",
    "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ lipsum(N) }}",
    "{{ 'x'|indent(N) }}", "{{ 'abc'.translate({97: 'x' * N}) }}", "{{ {'a': 'b' * N}.items()|join }}",
    "{{ strftime_now('%' ~ N ~ 'd') }}", "{{ 'x'|center(N) }}", "{{ 'x'|wordwrap(N) }}",
    "{% for a in range(N) %}{% for b in range(N) %}{% endfor %}{% endfor %}",
    "{% if true %}" * 120 + "{% endif %}" * 120, "{{ ((((((((1)))))))) }}" * 1000,
    "{{ x" + "[0]" * 5000 + " }}", "{% set ns = namespace(a=[]) %}{% for i in range(N) %}"
    "{% set ns.a = ns.a + ns.a + [i] %}{% endfor %}{{ ns.a|length }}",
]


def _rewrite_zip(path: str, rng: random.Random) -> bool:
    """Rename, duplicate, drop, compress or edit one member of a zip; False if not a zip."""
    try:
        with zipfile.ZipFile(path) as z:
            members = [(i, z.read(i.filename)) for i in z.infolist()]
    except Exception:  # noqa: BLE001  an earlier mutation broke it: leave it to the byte mutations
        return False
    if not members:
        return False
    k = rng.randrange(len(members))
    info, data = members[k]
    op = rng.choice(["rename", "duplicate", "drop", "deflate", "edit", "edit"])
    if op == "rename":
        other = rng.choice([m[0].filename for m in members] + ["x/data/99", "../evil", "archive/data.pkl"])
        members[k] = (zipfile.ZipInfo(other), data)
    elif op == "duplicate":
        members.insert(rng.randrange(len(members) + 1), (zipfile.ZipInfo(info.filename), data))
    elif op == "drop":
        del members[k]
    elif op == "deflate":
        zi = zipfile.ZipInfo(info.filename)
        zi.compress_type = zipfile.ZIP_DEFLATED
        members[k] = (zi, data + (b"\0" * rng.choice([0, 1 << 20]) if rng.random() < 0.3 else b""))
    else:
        members[k] = (zipfile.ZipInfo(info.filename), _edit_member(info.filename, data, rng))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point
        with zipfile.ZipFile(path, "w") as z:
            for zi, d in members:
                z.writestr(zi, d)
    return True


def _edit_member(name: str, data: bytes, rng: random.Random) -> bytes:
    if name.endswith(".pkl"):
        ints = [(pos, op.name) for op, arg, pos in pickletools.genops(data)
                if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
        if ints:
            pos, opname = rng.choice(ints)
            width = {"BININT": 5, "BININT1": 2, "BININT2": 3}.get(opname) or 2 + data[pos + 1]
            value = rng.choice(INTERESTING)
            raw = value.to_bytes(9, "little", signed=True).rstrip(b"\0" if value >= 0 else b"\xff") or b"\0"
            if value >= 0 and raw[-1] & 0x80 or value < 0 and not raw[-1] & 0x80:
                raw += b"\0" if value >= 0 else b"\xff"
            return data[:pos] + b"\x8a" + bytes([len(raw)]) + raw + data[pos + width:]
    if name.endswith(".npy") and data.startswith(b"\x93NUMPY"):
        header_end = data.index(b"\n") + 1
        header = data[10:header_end].decode("latin1")
        choice = rng.choice([f"'shape': ({rng.choice(INTERESTING)},)", "'shape': (2, -3)", "'descr': '|O'",
                             "'descr': '>f4'", "'fortran_order': True", "'shape': ()"])
        key = choice.split(":")[0]
        start = header.index(key)
        end = header.index(",", start) if key != "'shape'" else header.index(")", start) + 1
        header = header[:start] + choice + header[end:]
        return data[:8] + struct.pack("<H", len(header)) + header.encode("latin1") + data[header_end:]
    return _flip(data, rng)


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 2, 8])):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _json_edit(text: bytes, rng: random.Random) -> bytes | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    paths = []

    def walk(x, path):
        paths.append(path)
        if len(paths) < 500:
            items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
            for k, v in list(items)[:50]:
                walk(v, path + [k])
    walk(obj, [])
    path = rng.choice(paths)
    if not path:
        return json.dumps(rng.choice(JSON_VALUES)).encode()
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.25 and isinstance(parent, dict):
        # a duplicate key, which json.dumps cannot write
        dup = json.dumps({path[-1]: rng.choice(JSON_VALUES)})[1:-1]
        return json.dumps(obj).replace("{", "{" + dup + ", ", 1).encode()
    else:
        parent[path[-1]] = rng.choice(JSON_VALUES)
    return json.dumps(obj).encode()


def mutate(case: str, kind: str, seed: int) -> None:
    """Apply one mutation of `kind`, its details drawn from `seed`, to one file of case."""
    rng = random.Random(seed)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(case) for f in fs
                   if os.path.isfile(os.path.join(dp, f)) and not os.path.islink(os.path.join(dp, f)))
    if not files:
        return
    path = rng.choice(files)
    with open(path, "rb") as f:
        data = f.read()
    if kind == "truncate":
        data = data[: rng.randrange(len(data) + 1)]
    elif kind == "flip":
        data = _flip(data, rng)
    elif kind == "integer":
        # interesting integers over header fields (GGUF dims/offsets/counts, zip sizes, lengths)
        width = rng.choice([1, 2, 4, 8])
        value = rng.choice(INTERESTING) % (1 << (8 * width))
        span = min(len(data), 4096 if rng.random() < 0.8 else len(data))
        pos = rng.randrange(max(span - width, 0) + 1)
        data = data[:pos] + value.to_bytes(width, "little") + data[pos + width:]
    elif kind == "splice":
        a, b = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        data = data[:a] + (rng.randbytes(rng.randrange(64)) if rng.random() < 0.5 else b"") + data[b:]
    elif kind == "json":
        if path.endswith(".safetensors") and len(data) >= 8:
            n = int.from_bytes(data[:8], "little")
            edited = _json_edit(data[8:8 + n], rng) if n <= len(data) - 8 else None
            if edited is not None:
                data = len(edited).to_bytes(8, "little") + edited + data[8 + n:]
        else:
            data = _json_edit(data, rng) or _flip(data, rng)
    elif kind == "zip":
        if _rewrite_zip(path, rng):
            return
        data = _flip(data, rng)
    elif kind in ("jinja", "controls", "nest"):
        data = _hostile_text(case, path, kind, rng, data)
        if data is None:
            return
    elif kind == "special":
        os.remove(path)
        how = rng.choice(["fifo", "symlink_out", "directory", "empty", "dev_zero"])
        if how == "fifo":
            os.mkfifo(path)
        elif how == "symlink_out":
            os.symlink(os.path.join(os.path.dirname(case.rstrip("/")), "secret"), path)
        elif how == "directory":
            os.mkdir(path)
        elif how == "dev_zero":
            os.symlink("/dev/zero", path)
        else:
            open(path, "wb").close()
        return
    with open(path, "wb") as f:
        f.write(data)


def _hostile_text(case: str, path: str, kind: str, rng: random.Random, data: bytes) -> bytes | None:
    """A Jinja snippet into the chat template, control tokens or pre-tokenizer depth into an
    HF tokenizer.json (written in place: returns None), or a byte flip where neither is."""
    template, tokenizer = os.path.join(case, "chat_template.jinja"), os.path.join(case, "tokenizer.json")
    n = str(rng.choice(SIZES))
    if kind == "jinja" and os.path.isfile(template):
        with open(template, encoding="utf-8", errors="replace") as f:
            text = f.read()
        at = rng.choice([i for i in range(len(text)) if text.startswith("{%", i)] + [len(text)])
        with open(template, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text[:at] + rng.choice(JINJA).replace("N", n) + text[at:])
        return None
    try:
        with open(tokenizer, "rb") as f:
            spec = json.loads(f.read())
    except (OSError, ValueError, RecursionError):   # an earlier mutation nested it deeply already
        return _flip(data, rng)
    if not isinstance(spec, dict):
        return _flip(data, rng)
    if kind == "controls" and isinstance(spec.get("added_tokens"), list):
        count, length = rng.choice([10, 1000, 6000]), rng.choice([1, 100, 3000])
        alphabet = "ab|()[]*+?\\^$.{}<>\u0000\u202e\U0001f600"
        ids = [t.get("id") for t in spec["added_tokens"] if isinstance(t, dict)]
        vocab = (spec.get("model") or {}).get("vocab") if isinstance(spec.get("model"), dict) else None
        ids += list(vocab.values()) if isinstance(vocab, dict) else []
        start = 1 + max([i for i in ids if isinstance(i, int)] or [0])   # after the vocabulary: no gap
        spec["added_tokens"] += [{"id": start + i, "content": "".join(rng.choice(alphabet) for _ in range(length))
                                  + str(i), "special": True} for i in range(count)]
    else:
        spec["pre_tokenizer"] = _nested(spec.get("pre_tokenizer"), rng.choice([10, 100, 600, 5000]))
    with open(tokenizer, "w") as f:
        json.dump(spec, f) if kind == "controls" else f.write(_dump_deep(spec))
    return None


def _nested(inner, depth: int) -> str:
    """A pre-tokenizer Sequence nested `depth` deep around inner, as JSON text (json.dumps
    itself recurses, so it is built as text)."""
    return '{"type": "Sequence", "pretokenizers": [' * depth + json.dumps(inner) + "]}" * depth


def _dump_deep(spec: dict) -> str:
    nested = spec.pop("pre_tokenizer")
    return json.dumps(spec)[:-1] + ', "pre_tokenizer": ' + nested + "}"


def make_case(seed_dir: str, case: str, mutations: list[tuple[str, int]]) -> None:
    shutil.copytree(seed_dir, case, symlinks=True)
    secret = os.path.join(os.path.dirname(case.rstrip("/")), "secret")
    if not os.path.exists(secret):
        with open(secret, "wb") as f:
            f.write(SECRET * 64)
    for kind, seed in mutations:
        mutate(case, kind, seed)


def write_seed(target: str, root: str) -> str:
    d = os.path.join(root, f"seed-{target}")
    if not os.path.isdir(d):
        os.makedirs(d)
        TARGETS[target].seed(d)
    return d


# --- the worker and its runner -----------------------------------------------------------

def worker(target: str, cases: list[str]) -> None:
    """Runs in a child: each case's outcome as one JSON line (a crash or hang shows as a
    case that started and never finished)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.path.insert(0, ROOT)
    from npllama.errors import NpllamaError
    read = CANARIES[target] if target in CANARIES else TARGETS[target].read
    for i, case in enumerate(cases):
        print(json.dumps({"i": i, "start": True}), flush=True)
        t0 = time.monotonic()
        try:
            read(case)
            out = {"outcome": "ok"}
        except NpllamaError as e:
            msg = str(e)
            named = os.path.dirname(case.rstrip("/")) in msg
            out = {"outcome": "error" if named and "\n" not in msg else "bug",
                   "message": msg if named else f"error message names no file of the case: {msg}"}
        except BaseException as e:  # noqa: BLE001  everything else is what the fuzzer looks for
            out = {"outcome": "bug", "message": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(json.dumps({"i": i, **out, **_within_bounds(out, time.monotonic() - t0)}), flush=True)


def _peak_bytes() -> int:
    """The largest resident set this worker, or any child it has waited for, has had
    (Linux reports KiB); a high-water mark, so a case that breaks the bound is the first one
    after which it is above."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def _within_bounds(out: dict, seconds: float) -> dict:
    """The case's figures, and a bug outcome if it passed the memory or time bound."""
    peak = _peak_bytes()
    figures = {"seconds": round(seconds, 3), "peak_mib": peak >> 20}
    if out["outcome"] != "bug" and (peak > CASE_MEMORY or seconds > CASE_SECONDS):
        figures.update(outcome="bug", message=f"beyond the bounds: {seconds:.1f} s (<= {CASE_SECONDS:g}), peak "
                       f"{peak >> 20} MiB (<= {CASE_MEMORY >> 20})")
    return figures


def run_batch(target: str, cases: list[str], timeout: float = BATCH_TIMEOUT) -> list[dict]:
    """Outcomes of cases (folders) read by the target's reader in one limited worker."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NPLLAMA_THREADS="1")
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", target, *cases],
                             stdout=out, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            _, err = p.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            hung = True
        out.seek(0)
        lines = [json.loads(line) for line in out if line.strip()]
    results = [dict(r, case=cases[r["i"]]) for r in lines if "outcome" in r]
    started = [r["i"] for r in lines if r.get("start")]
    if len(results) < len(cases):
        i = started[-1] if started else 0
        why = "hang (timeout)" if hung else (f"crash (signal {-p.returncode})" if p.returncode < 0 else
                                              f"worker died (exit {p.returncode}): {err.strip()[-500:]}")
        results.append({"i": i, "case": cases[i], "outcome": "crash", "message": why})
    return results


# --- a campaign ---------------------------------------------------------------------------

def random_mutations(rng: random.Random, kinds: tuple = KINDS) -> list[tuple[str, int]]:
    return [(rng.choice(kinds or KINDS), rng.randrange(2**32)) for _ in range(rng.choice([1, 1, 2, 3]))]


def campaign(minutes: float, targets: list[str], keep: str | None, batch: int = 40, seed: int | None = None) -> int:
    rng = random.Random(seed)
    counts = {t: {"ok": 0, "error": 0, "bug": 0, "crash": 0, "max_s": 0.0, "max_peak_mib": 0} for t in targets}
    failures = 0
    t_end = time.time() + 60 * minutes
    with tempfile.TemporaryDirectory() as root:
        seeds = {t: write_seed(t, root) for t in targets}
        n = 0
        while time.time() < t_end:
            target = targets[n % len(targets)]
            n += 1
            batch_dir = os.path.join(root, f"batch-{n}")
            os.makedirs(batch_dir)
            plans = [random_mutations(rng, TARGETS[target].kinds) for _ in range(min(batch, TARGETS[target].batch))]
            cases = []
            for i, plan in enumerate(plans):
                case = os.path.join(batch_dir, f"case-{i}")
                make_case(seeds[target], case, plan)
                cases.append(case)
            # a confined target's case may run to its limits: the batch gets CASE_SECONDS a case
            timeout = max(BATCH_TIMEOUT, CASE_SECONDS * len(cases)) if TARGETS[target].kinds else BATCH_TIMEOUT
            for r in run_batch(target, cases, timeout):
                c = counts[target]
                c[r["outcome"]] += 1
                c["max_s"], c["max_peak_mib"] = max(c["max_s"], r.get("seconds", 0)), max(c["max_peak_mib"],
                                                                                         r.get("peak_mib", 0))
                if r["outcome"] in ("bug", "crash"):
                    failures += 1
                    print(f"FAIL {target} {plans[r['i']]}: {r['message']}", flush=True)
                    if keep:
                        dest = os.path.join(keep, f"{target}-{n}-{r['i']}")
                        shutil.copytree(r["case"], dest, symlinks=True, ignore_dangling_symlinks=True,
                                        ignore=lambda d, names: [x for x in names if not (
                                            os.path.isfile(os.path.join(d, x)) or os.path.isdir(os.path.join(d, x)))])
                        with open(dest + ".json", "w") as f:
                            json.dump({"target": target, "mutations": plans[r["i"]], **r}, f, indent=1)
            shutil.rmtree(batch_dir, ignore_errors=True)
            total = sum(c[k] for c in counts.values() for k in ("ok", "error", "bug", "crash"))
            print(f"[{time.strftime('%H:%M:%S')}] {total} cases: " + "; ".join(
                f"{t} " + " ".join(f"{k} {v}" for k, v in c.items()) for t, c in counts.items()), flush=True)
    return failures


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return 0
    sys.path.insert(0, ROOT)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--keep", help="copy failing cases here")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    targets = a.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {unknown[0]}; choose from {', '.join(TARGETS)}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    failures = campaign(a.minutes, targets, a.keep, seed=a.seed)
    print(f"{failures} failing cases")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
