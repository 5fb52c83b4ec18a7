"""Plots: attention heatmaps of a trace and a comparison's errors along the layers are written
as real, non-blank images; without matplotlib the message says how to get it."""
import re
import subprocess
import sys

import numpy as np
import pytest

import npllama
from npllama.inspect import plot, tracefile as tracing
from npllama.inspect import compare as comparing
from npllama.errors import MissingDependencyError, UsageError
from oracles import random_weights, small_args

ARGS = small_args(dim=64, n_heads=4, n_kv_heads=2, n_layers=3, vocab_size=300)
TOKENS = np.random.default_rng(0).integers(0, 300, 12)


@pytest.fixture(scope="module")
def traces():
    a = npllama.trace(npllama.Transformer(ARGS, random_weights(ARGS, seed=1)), TOKENS)
    a["__meta__"]["pieces"] = [f"tok{t}\n" for t in TOKENS]
    b = {k: (v if k in ("__meta__", "tokens") else v * np.float32(1 + 1e-3 * (i % 5)))
         for i, (k, v) in enumerate(a.items())}
    return a, b


def assert_real_png(path):
    """A PNG that decodes, at a useful size, with more than one colour in it."""
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= 200
    assert img[..., :3].std() > 0.05            # not a blank canvas
    return img


def test_attention_heatmaps(traces, tmp_path):
    a, _ = traces
    plot.attention(a, 1, str(tmp_path / "all.png"))
    grid = assert_real_png(tmp_path / "all.png")
    plot.attention(a, 2, str(tmp_path / "one.png"), head=3, what="scores")
    assert_real_png(tmp_path / "one.png")
    assert grid.shape != matplotlib_shape(tmp_path / "one.png")      # a grid of 4 heads is a different picture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.png", "one.png"]   # no partial files left
    plot.attention(a, 0, str(tmp_path / "a.svg"))
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert plot.token_labels(a)[0] == f"tok{TOKENS[0]}\\n"           # newlines shown escaped
    assert plot.token_labels({"tokens": TOKENS})[:2] == [str(TOKENS[0]), str(TOKENS[1])]


def matplotlib_shape(path):
    import matplotlib.image
    return matplotlib.image.imread(path).shape


def test_comparison_plot(traces, tmp_path):
    a, b = traces
    ok, first, rows = comparing.compare(a, b)
    assert not ok
    plot.comparison(rows, str(tmp_path / "c.png"), rtol=1e-4)
    assert_real_png(tmp_path / "c.png")


def test_bad_requests_name_the_problem(traces, tmp_path):
    a, _ = traces
    only = {k: v for k, v in a.items() if not k.startswith("layers.0.")}
    with pytest.raises(UsageError, match=r"t.npz: no layers.0.probs \(layers traced: 1, 2\)"):
        plot.attention(only, 0, str(tmp_path / "x.png"), source="t.npz")
    with pytest.raises(UsageError, match=r"--head 4: layer 1 has heads 0..3"):
        plot.attention(a, 1, str(tmp_path / "x.png"), head=4)
    with pytest.raises(UsageError, match=r"cannot write .xyz images"):
        plot.attention(a, 1, str(tmp_path / "x.xyz"))
    assert list(tmp_path.iterdir()) == []


def test_without_matplotlib_the_message_says_how_to_get_it(traces, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'npllama[plot]'")):
        plot.attention(traces[0], 1, str(tmp_path / "x.png"))


def run_cli(*argv, pre="pass"):
    code = f"import sys; {pre}; from npllama.cli import main; sys.exit(main({list(argv)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_cli_plot_and_compare_plot(traces, tmp_path):
    a, b = traces
    tracing.save(str(tmp_path / "a.npz"), a)
    tracing.save(str(tmp_path / "b.npz"), b)
    r = run_cli("plot", str(tmp_path / "a.npz"), "--layer", "2", "--head", "0", "-o", str(tmp_path / "p.png"))
    assert r.returncode == 0 and "wrote" in r.stderr, r.stderr
    assert_real_png(tmp_path / "p.png")
    r = run_cli("compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--plot", str(tmp_path / "c.png"))
    assert r.returncode == 1 and "first outside tolerance" in r.stdout   # the verdict is unchanged by --plot
    assert_real_png(tmp_path / "c.png")
    r = run_cli("plot", str(tmp_path / "a.npz"), "--layer", "1", "-o", str(tmp_path / "q.png"),
                pre="sys.modules['matplotlib'] = None")
    assert r.returncode == 1 and r.stderr.strip() == ("npllama: plotting needs matplotlib: "
                                                      "pip install 'npllama[plot]'")
