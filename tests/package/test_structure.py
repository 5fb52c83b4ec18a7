"""The package's structure: no import cycles, nothing reaching outside the package, no torch
on any normal path; the forward pass's pieces (embed, forward_layers, head) compose, and
tracing is an observer the model reports to."""
import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import npllama
from npllama.model import model as model_module, ops
from npllama.inspect import tracefile as tracing
from npllama.model import observer
from npllama.errors import UsageError
from npllama.model.model import Transformer
from oracles import ROOT, hf_model, llama3_tokenizer_path, random_weights, small_args, write_random_model

pytestmark = pytest.mark.torch

PACKAGE = os.path.dirname(os.path.abspath(npllama.__file__))


# The layers, bottom first: a module may import its own layer and those below it, never one
# above. errors, version, progress and untrusted (the one hardened file-reading layer, which the
# tokenizers use as much as the checkpoint readers) are the base; the top-level facade
# (__init__, __main__, testing) may import anything. serve is the HTTP server over run.
LAYERS = ["base", "model", "text", "io", "run", "inspect", "bench", "serve", "cli", "facade"]
BASE, FACADE = {"errors", "version", "progress", "untrusted"}, {"__init__", "__main__", "testing"}


def layer_of(module: str) -> str:
    """npllama.model.ops -> "model"; npllama.errors -> "base"; npllama.testing -> "facade"."""
    parts = module.split(".")[1:] or ["__init__"]
    if parts[-1] == "cli":
        return "cli"   # a command group's own parser and runner (npllama.serve.cli) is CLI
    if len(parts) == 1:
        return "base" if parts[0] in BASE else "cli" if parts[0] == "cli" else "facade"
    return parts[0]


def package_modules() -> dict[str, str]:
    """dotted module name -> its source file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside a function), read from
    the source. `from X import y` names module X.y when it exists, else X."""
    modules = package_modules()
    graph = {}
    for m, path in modules.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "npllama"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif (node.module or "").split(".")[0] == "npllama":
                    target = node.module
                else:
                    continue
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        graph[m] = {d for d in deps if d in modules} - {m}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in sorted(graph.items())
            for d in sorted(deps) if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))]


def test_every_import_points_down_the_layers():
    graph = package_imports()
    assert set(map(layer_of, graph)) <= set(LAYERS)
    assert "npllama.model.model" in graph and "npllama.errors" in graph["npllama.model.model"]
    # the command line is a package, one module per command group, all of it the cli layer
    # (npllama.cli.inspect too, though its last name is a layer's)
    cli = {m for m in graph if m.startswith("npllama.cli")}
    assert {"npllama.cli", "npllama.cli.common", "npllama.cli.inspect"} <= cli and set(map(layer_of, cli)) == {"cli"}
    assert upward_imports(graph) == []
    # the check can fail: the model reading a checkpoint is found
    graph["npllama.model.model"].add("npllama.io.checkpoint")
    assert upward_imports(graph) == ["npllama.model.model (model) imports npllama.io.checkpoint (io)"]


def test_the_model_core_imports_nothing_of_npllama_but_errors_and_itself():
    graph = package_imports()
    # config's ModelArgs.from_json reads params.json through untrusted (a function-local import)
    allowed = {"npllama.errors", "npllama.untrusted"}
    for m, deps in graph.items():
        if layer_of(m) == "model":
            assert {d for d in deps if layer_of(d) != "model"} <= allowed, m


MAX_FUNCTION_LINES = 50
# Imported inside the function that needs them, so that npllama runs without them; and two
# runtime libraries a start need not pay for (gguf with yaml, tiktoken: together ~0.1 s of
# `import npllama.cli`), imported where a GGUF is read or a tokenizer built.
OPTIONAL_EXTRAS = ("torch", "ray", "fastapi", "uvicorn", "starlette", "matplotlib", "hypothesis", "threadpoolctl",
                   "gguf", "tiktoken")
# Package modules whose own top imports an optional extra (FastAPI), imported where used.
OPTIONAL_MODULES = ("npllama.serve.http",)


PACKAGES = {m for m, p in package_modules().items() if p.endswith("__init__.py")}


def package_functions():
    """(module, function node) for every function and method of the package."""
    for m, path in sorted(package_modules().items()):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield m, node


def test_no_function_is_longer_than_fifty_lines():
    long = [f"{m}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for m, f in package_functions()
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_functions_import_only_optional_extras():
    """Every other import is at the top of its module, where a reader sees what it depends on."""
    inner = []
    for m, f in package_functions():
        for node in ast.walk(f):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                pkg = m.split(".")[:len(m.split(".")) - node.level + (m in PACKAGES)]
                names = [".".join(pkg + ([node.module] if node.module else []))]
                names = [] if names[0] in OPTIONAL_MODULES else names
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            inner += [f"{m}.{f.name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] not in OPTIONAL_EXTRAS]
    assert inner == []


def layout_table_modules(readme: str) -> set[str]:
    """The module files the README's "How the code is laid out" table names: a cell's first
    path has its folder (`model/bf16.py`), later ones in the cell share it (`tiled.py`)."""
    section = readme.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in section.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not cells[2].strip().startswith("`"):
            continue
        folder = ""
        for path in re.findall(r"`([\w/]+\.py)`", cells[2]):
            folder = os.path.dirname(path) or folder if "/" in path else folder
            named.add(path if "/" in path else os.path.join(folder, path))
    return named


def test_the_readme_layout_table_names_every_module():
    with open(os.path.join(ROOT, "README.md")) as f:
        named = layout_table_modules(f.read())
    modules = {os.path.relpath(p, PACKAGE) for p in package_modules().values()}
    listed_inits = {"__init__.py", "cli/__init__.py"}
    expected = {p for p in modules if not p.endswith("__init__.py")} | listed_inits
    assert sorted(expected - named) == [] and sorted(named - modules) == []


def test_package_imports_have_no_cycles():
    graph = package_imports()
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # the check can fail: a cycle put in by hand is found
    graph["npllama.inspect.tracefile"].add("npllama")
    done.clear()
    with pytest.raises(AssertionError, match="import cycle"):
        visit("npllama")


def test_no_package_code_edits_sys_path_or_reaches_into_tools():
    def reaches_into_tools(node) -> bool:
        # "tools/x.py" or os.path.join(..., "tools", ...): a path only a source checkout has. The
        # word alone is fine (a chat template's `tools`), and so is running the torch peer by
        # module name (`python -m tools.bench_torch`, from a checkout, in its own process).
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return re.match(r"tools/", node.value) is not None
        return isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "join" and \
            any(isinstance(a, ast.Constant) and a.value == "tools" for a in node.args)

    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), PACKAGE)
            with open(os.path.join(root, f)) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                    pytest.fail(f"npllama/{rel}:{node.lineno} uses sys.path")
                if reaches_into_tools(node):
                    pytest.fail(f"npllama/{rel}:{node.lineno} builds a path into tools/")


# Run in a fresh interpreter: `import npllama`, then each command through npllama.cli.main,
# noting after each which heavy modules are loaded.
PROBE = """
import io, json, sys
HEAVY = ("torch", "transformers", "llama_models")
heavy = lambda: sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
out = {}
import npllama
out["import npllama"] = [0, heavy()]
from npllama import cli
real_stdout = sys.stdout
for name, argv, stdin in json.loads(sys.argv[2]):
    sys.stdin, sys.stdout = io.StringIO(stdin or ""), io.StringIO()
    rc = cli.main(argv)
    sys.stdout = real_stdout
    out[name] = [rc, heavy()]
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def test_jinja2_is_loaded_only_by_the_template_worker():
    # Templates compile and render in the confined worker (text/template_sandbox.py): the
    # command line's process, rendering one, never loads jinja2; nor gguf unless it reads one.
    probe = ("import sys, npllama.cli\n"
             "start = sorted({m.split('.')[0] for m in sys.modules} & {'jinja2', 'gguf', 'yaml'})\n"
             "from npllama.text.chat_template import ChatTemplate\n"
             "from oracles import byte_tokenizer\n"
             "ids = ChatTemplate(byte_tokenizer(), '{{ messages[0].content }}').encode_dialog_prompt("
             "[{'role': 'user', 'content': 'hi'}])\n"
             "print(len(ids), start, 'jinja2' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["2", "[]", "False"]


def test_normal_paths_import_no_torch(tmp_path):
    """torch, transformers and llama-models are cross-check oracles: importing npllama and
    running every command (bench without --vs torch) must not load them."""
    hf_dir = str(tmp_path / "hf")
    hf_model(small_args(), random_weights(small_args())).save_pretrained(hf_dir)  # a source to convert
    args = small_args(vocab_size=128256, max_seq_len=128)                         # Llama 3's tokenizer
    model = write_random_model(str(tmp_path / "m"), args, llama3_tokenizer_path())
    t = str(tmp_path / "t.npz")
    commands = [
        ("convert", ["convert", hf_dir, str(tmp_path / "c"), "--quiet"], None),
        ("info", ["info", str(tmp_path / "c"), "--verify"], None),
        ("generate", ["generate", "-m", model, "Hello", "--max-new-tokens", "3"], None),
        ("chat", ["chat", "-m", model, "--max-new-tokens", "3"], "Hi\n"),
        ("trace", ["trace", "-m", model, "Hello", "-o", t], None),
        ("compare", ["compare", t, t], None),
        ("golden", ["golden", "-m", model, "-o", str(tmp_path / "g"), "--max-new-tokens", "3"], None),
        ("bench", ["bench", "--shape", "tiny", "--reps", "1", "--workdir", str(tmp_path / "b"), "--quiet"], None),
    ]
    result = tmp_path / "result.json"
    r = subprocess.run([sys.executable, "-c", PROBE, str(result), json.dumps(commands)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(result.read_text())
    assert list(got) == ["import npllama"] + [c[0] for c in commands]
    assert {name: rc for name, (rc, _) in got.items()} == dict.fromkeys(got, 0), r.stderr
    assert {name: heavy for name, (_, heavy) in got.items() if heavy} == {}


# --- the forward pass's pieces ------------------------------------------------------------

ARGS = small_args(dim=128, n_heads=8, n_kv_heads=2, n_layers=3, vocab_size=300)
TOKENS = np.random.default_rng(0).integers(0, 300, 12)


@pytest.fixture(scope="module")
def weights():
    return random_weights(ARGS, seed=5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("split", range(ARGS.n_layers + 1))
def test_stages_over_layer_ranges_equal_forward(weights, dtype, split):
    # Two models, as two pipeline stages would be: the first embeds and runs layers
    # [0, split), the second runs [split, n_layers) and the head, each with its own KV cache.
    # The same numpy operations on the same data: bit-identical logits, for a prefill and
    # then a decode step.
    whole = Transformer(ARGS, weights, dtype=dtype)
    first, last = Transformer(ARGS, weights, dtype=dtype), Transformer(ARGS, weights, dtype=dtype)
    for tokens, pos in ((TOKENS[:-1], 0), (TOKENS[-1:], len(TOKENS) - 1)):
        h = first.forward_layers(first.embed(tokens[None]), pos, 0, split)
        logits = last.head(last.forward_layers(h, pos, split, None))
        assert np.array_equal(logits[0], whole.forward(tokens, start_pos=pos))
    # ...and a stage that skipped a layer would not be
    skipped = last.head(last.forward_layers(first.embed(TOKENS[None]), 0, 1, None))
    assert not np.allclose(skipped[0], Transformer(ARGS, weights, dtype=dtype).forward(TOKENS))


def test_forward_layers_checks_positions(weights):
    m = Transformer(ARGS, weights, max_seq_len=8)
    with pytest.raises(UsageError, match="positions 4..8 exceed the context of 8 tokens"):
        m.forward_layers(np.zeros((1, 5, ARGS.dim), np.float32), 4)


def test_attention_keeps_intermediates_only_for_recorded_layers(weights, monkeypatch):
    # The attention gets trace=None unless its layer is recorded, so it can keep no (T, S)
    # tensors; the recorded layer's scores and probs arrive under their trace names.
    seen = []

    def spy(xq, keys, values, start_pos, rnd, trace):
        seen.append(trace)
        return ops.blocked_attention(xq, keys, values, start_pos, rnd, trace)

    monkeypatch.setattr(model_module, "blocked_attention", spy)
    Transformer(ARGS, weights).forward(TOKENS)
    assert seen == [None] * ARGS.n_layers
    seen.clear()
    tr = npllama.trace(Transformer(ARGS, weights), TOKENS, layers=[1])
    assert seen[0] is None and seen[2] is None and isinstance(seen[1], observer.Recorder)
    assert tr["layers.1.scores"].shape == (ARGS.n_heads, len(TOKENS), len(TOKENS))
    assert not any(k.startswith(("layers.0.", "layers.2.")) for k in tr)


def test_trace_dict_of_a_batch_keeps_the_batch_axis(weights):
    batch = np.stack([TOKENS, TOKENS[::-1]])
    tr = {}
    Transformer(ARGS, weights, max_batch_size=2).forward(batch, trace=tr)
    assert tr["layers.2.out"].shape == (2, len(TOKENS), ARGS.dim)
    assert tr["layers.0.probs"].shape == (2, ARGS.n_heads, len(TOKENS), len(TOKENS))
    row = npllama.trace(Transformer(ARGS, weights), TOKENS[::-1])
    for name in ("layers.0.q_rotated", "layers.2.w1", "logits"):
        # a batch's GEMMs may sum in another order than one row's: float32 rounding only
        np.testing.assert_allclose(tr[name][1], row[name], rtol=0, atol=1e-5 * np.abs(row[name]).max())
