"""Issue 24, class 2: allocations derived from a header are the memory model's. A GGUF whose
context_length is 2**26 runs at the default context the memory model chooses, and what
loading it allocates (the RoPE table, whose float64 temporaries were not counted) stays
within what the model counted; a KL base file whose header claims 2**30 positions (its size
matching, sparse) is refused from the header before a byte of it is read. Both fail on main
c1182df (checked: the RoPE table's temporaries triple the table; the base file's 4 GiB of
token ids are read, MemoryError under the worker's limit)."""
import json
import os
import resource
import subprocess
import sys

import gguf
import pytest

from npllama.inspect import perplexity as pp
from tools import fuzz

GIB = 1024**3

LOAD = r"""
import json, resource, sys
import npllama.model.memory as m
m.available_memory = lambda: int(sys.argv[2])       # this machine's memory, as the test states it
from npllama.io.checkpoint import load
from npllama.model import memory
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
need = memory.needed_bytes(model.args, model.max_seq_len, weights_mode=model.weights_mode)
print(json.dumps({"ctx": model.max_seq_len, "trained": model.args.max_seq_len, "grew": after - before, **need}))
"""


def test_a_2_26_context_length_runs_at_the_context_the_memory_model_allows(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf.GGUFWriter, "add_context_length",
                        lambda self, n: gguf.GGUFWriter.add_uint32(self, "llama.context_length", 2**26))
    fuzz.seed_gguf(str(tmp_path))
    monkeypatch.undo()
    r = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "model.gguf"), str(int(1.5 * GIB))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["trained"] == 2**26 and 2**20 < got["ctx"] < 2**26   # cut to what fits in 1.5 GiB
    # What the load made resident: the RoPE table (counted at 8 bytes a position and pair) and
    # the small weights; the KV cache is np.zeros, untouched. 64 MiB covers the weights, the
    # table's block temporaries (ops.ROPE_BLOCK positions) and the allocator's slack; the
    # uncounted float64 temporaries of one whole-table computation were 2-3 times the table.
    assert got["grew"] <= got["rope"] + 64 * 1024**2, got


BASE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]),) * 2)
from npllama.errors import NpllamaError
from npllama.inspect import perplexity as pp
try:
    pp.BaseFile.open(sys.argv[1])
except NpllamaError as e:
    print(e)
    sys.exit(3)
"""


@pytest.mark.parametrize("n_chunk", [2**22, 2**24])     # x 256 positions: 2**30 and 2**32
def test_a_base_file_claiming_2_30_positions_is_refused_from_its_header(tmp_path, n_chunk):
    n_ctx, n_vocab = 256, 11
    path = tmp_path / "huge.kld"
    size = pp.HEADER.size + 4 * n_chunk * n_ctx + 2 * n_chunk * pp.scored_rows(n_ctx) * pp.row_width(n_vocab)
    with open(path, "wb") as f:
        f.write(pp.HEADER.pack(pp.MAGIC, n_ctx, n_vocab, n_chunk))
        f.truncate(size)                            # sparse: its size is what the header makes
    r = subprocess.run([sys.executable, "-c", BASE, str(path), str(2 * GIB)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3 and "positions" in r.stdout and "huge.kld" in r.stdout, (r.stdout, r.stderr[-2000:])
