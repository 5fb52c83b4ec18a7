"""Issue 24, printable text: file-derived names reach the terminal through
errors.printable() also outside error messages: `info`'s lines (the tokenizer's stop-token
names), convert's progress lines (tensor names) and compare's rows. A name holding ESC, BEL
or a newline shows escaped; none forges an "npllama: ..." line. Fails on main c1182df
(checked: the raw ESC sequences were printed)."""
import base64
import io
import os

import numpy as np

from npllama import cli
from npllama.inspect.compare import compare
from npllama.text.tokenizer import spec_json
from oracles import small_args, write_random_model

HOSTILE = "<|x\x1b[2J\x07\nnpllama: all good|>"


def test_info_prints_hostile_token_names_escaped(tmp_path, capsys):
    path = write_random_model(str(tmp_path / "m"), small_args(dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                                              vocab_size=260, multiple_of=32))
    spec = {"tokens": [base64.b64encode(bytes([i])).decode() for i in range(256)] + [None] * 4,
            "pre_tokenizer": "gpt2", "special_tokens": {"<s>": 256, HOSTILE: 257, "<a>": 258, "<b>": 259},
            "bos": "<s>", "eos": HOSTILE, "stop": [HOSTILE], "chat_format": None, "add_bos": True}
    with open(os.path.join(path, "tokenizer.json"), "wb") as f:
        f.write(spec_json(spec))
    assert cli.main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out
    assert not any(line.startswith("npllama:") for line in out.splitlines())


def test_compare_rows_escape_tensor_names():
    logits = np.ones((2, 4), np.float32)     # something to compare, so the report is printed
    a = {"tokens": np.array([1, 2]), "logits": logits, HOSTILE: np.ones(3, np.float32), "__meta__": {}}
    b = {"tokens": np.array([1, 2]), "logits": logits, HOSTILE: np.ones(3, np.float32) * 2, "__meta__": {}}
    out = io.StringIO()
    compare(a, b, out=out, allow_unknown=True)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert not any(line.startswith("npllama:") for line in out.getvalue().splitlines())
