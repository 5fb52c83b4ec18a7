"""The oracle (compare, check_against_reference, the llama.cpp dump and saved-logits
adapters) against inputs crafted to make it pass what it must fail: each test builds its
input here and checks the comparison fails (or refuses the input in one line)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from npllama.cli import main
from npllama.errors import NpllamaError
from npllama.inspect import llamacpp, locate, logits, perplexity as pp, tracefile
from npllama.inspect.compare import compare
from npllama.model.model import Transformer
from npllama.testing import check_against_reference
from oracles import random_weights, small_args

T, D, V, H = 3, 6, 5, 2     # D at most 6: a dump prints 6 values of an axis, all of them


def trace_dict(seed: int = 0, **meta) -> dict:
    """A small trace in npllama's names: embeddings, one layer's masked scores and output,
    logits; float32 as npllama writes them."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((H, T, T)).astype(np.float32)
    scores[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf       # the causal mask
    return {"tokens": np.arange(T), "token_embeddings": rng.standard_normal((T, D)).astype(np.float32),
            "layers.0.scores": scores, "layers.0.out": rng.standard_normal((T, D)).astype(np.float32),
            "logits": rng.standard_normal((T, V)).astype(np.float32), "__meta__": dict(meta)}


def test_omits_excuse_only_what_a_hook_cannot_see():
    b = trace_dict()
    a = {k: v for k, v in b.items() if k not in ("logits", "layers.0.out")}
    a["__meta__"] = {"omits": ["logits", "out"]}          # names a hook sees: no excuse
    rep = compare(a, b)
    assert not rep.ok and set(rep.missing) == {"logits", "layers.0.out"} and not rep.declared
    a = {k: v for k, v in b.items() if k != "layers.0.scores"}
    a["__meta__"] = {"omits": ["scores"]}                   # what Meta's and HF's hooks cannot see
    assert compare(a, b).ok
    for bad in (5, "scores", [1]):
        a["__meta__"] = {"omits": bad}
        with pytest.raises(NpllamaError, match="omits"):
            compare(a, b)


def test_nan_and_unshared_infinities_never_agree():
    b = trace_dict()
    assert compare(b, dict(b)).ok          # the masked -inf of scores on both sides agrees
    for name, value in (("logits", np.nan), ("logits", np.inf), ("layers.0.out", -np.inf)):
        x = {**b, name: np.full_like(b[name], value)}
        rep = compare(x, x)                # the same NaN or inf on both sides is no agreement
        assert not rep.ok and rep.first == name
        row = next(r for r in rep.rows if r[0] == name)
        assert row[1]["notes"], row        # said why
    s = b["layers.0.scores"].copy()
    s[0, 0, 0] = np.inf
    x = {**b, "layers.0.scores": s}
    assert not compare(x, b).ok


def test_comparing_only_tokens_or_empty_arrays_is_compared_nothing():
    b = trace_dict()
    tokens_only = {"tokens": b["tokens"], "__meta__": {}}
    with pytest.raises(NpllamaError, match="compared nothing"):
        compare(tokens_only, tokens_only)
    empty = {"tokens": b["tokens"], "logits": np.zeros((0, V), np.float32), "__meta__": {}}
    out = io.StringIO()
    with pytest.raises(NpllamaError, match="compared nothing"):
        compare(empty, empty, out=out)
    assert "all within tolerance" not in out.getvalue()


def test_tolerances_must_be_finite_and_not_negative(tmp_path, capsys):
    b = trace_dict()
    a = {**b, "logits": b["logits"] + 1}
    for kw in ({"rtol": np.nan}, {"rtol": np.inf}, {"atol": np.inf}, {"rtol": -1.0}, {"ulps": np.nan},
               {"ulps": -1.0}):
        with pytest.raises(NpllamaError, match=next(iter(kw))):
            compare(a, b, **kw)
    path = str(tmp_path / "t.npz")
    tracefile.save(path, b)
    for flag in ("--rtol", "--atol", "--ulps"):
        with pytest.raises(SystemExit) as e:
            main(["compare", path, path, flag, "nan"])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_meta_of_the_wrong_types_is_one_error_not_a_traceback(tmp_path):
    b = trace_dict()
    for meta, field in (({"names": ["x"]}, "names"), ({"params": {"dim": 0, "n_heads": 0}}, "dim"),
                        ({"params": {"dim": 8, "n_heads": 2, "n_kv_heads": "x"}}, "n_kv_heads"),
                        ({"params": {"dim": 8, "n_heads": 2, "rope_theta": "a"}}, "rope_theta"),
                        ({"params": {"dim": 8, "n_heads": True}}, "n_heads")):
        with pytest.raises(NpllamaError, match=field):
            compare({**b, "__meta__": meta}, b)
        path = str(tmp_path / "m.npz")
        tracefile.save(path, {**b, "__meta__": meta})
        with pytest.raises(NpllamaError, match=field):
            tracefile.load(path)


def test_the_gqa_hint_is_only_for_what_query_heads_compute():
    # 4 query heads over 2 KV heads: heads 0 and 3 (h % 2 == h // 2) agree, as tile/repeat gives
    errors, limit = np.array([0.0, 1.0, 1.0, 0.0]), 0.5
    for name in ("layers.0.scores", "layers.0.probs", "layers.0.attention"):
        assert locate.gqa_hint(name, errors, limit, 2) is not None
    for name in ("layers.0.q", "layers.0.q_rotated", "layers.0.k", "layers.0.v"):
        assert locate.gqa_hint(name, errors, limit, 2) is None


# --- saved-logits files ------------------------------------------------------------------

N_CTX = 8       # scored positions 4..6 (perplexity.scored_rows)


def base_file(tmp_path, lg: np.ndarray, tokens: np.ndarray) -> str:
    path = str(tmp_path / "base.kld")
    with pp.base_writer(path, tokens[None], lg.shape[1]) as add:
        add(lg[N_CTX // 2:N_CTX // 2 + pp.scored_rows(N_CTX)])
    return path


def logits_trace(tmp_path, lg: np.ndarray, tokens: np.ndarray) -> str:
    path = str(tmp_path / "t.npz")
    tracefile.save(path, {"tokens": tokens, "logits": lg.astype(np.float32), "__meta__": {}})
    return path


def compare_files(a: str, b: str):
    return logits.compare_logits(logits.load_side(a), logits.load_side(b))


def test_a_saved_logits_row_whose_header_says_nothing_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    lg, tokens = rng.standard_normal((N_CTX, 16)).astype(np.float32), np.arange(N_CTX)
    path, trace = base_file(tmp_path, lg, tokens), logits_trace(tmp_path, lg, tokens)
    assert compare_files(trace, path).ok
    rows_at = pp.HEADER.size + 4 * N_CTX
    for scale, low in ((0.0, 0.0), (0.0, -1e-3), (1e-6, 1.0), (1e-6, -40.0)):
        rows = np.memmap(path, "<u2", "r+", offset=rows_at, shape=(pp.scored_rows(N_CTX), pp.row_width(16)))
        rows[:, :4] = np.array([scale, low], "<f4").view("<u2")     # every row: all log p read as ~low
        rows.flush()
        del rows
        with pytest.raises(NpllamaError, match="not what llama-perplexity writes"):
            compare_files(trace, path)


def test_a_difference_below_the_lowest_log_p_of_an_exact_row_is_not_clipped_away(tmp_path):
    # rows spanning less than 16 nats are exact to their lowest entry: nothing is below a floor
    rng = np.random.default_rng(2)
    lg, tokens = rng.standard_normal((N_CTX, 16)).astype(np.float32), np.arange(N_CTX)
    low = int(np.argmin(lg[5]))
    lg[5, low] = lg[5].max() - 15             # 15 nats below the top: p ~ 3e-7, exact in the file
    path = base_file(tmp_path, lg, tokens)
    wrong = lg.copy()
    wrong[5, low] -= 3.0    # 3 nats lower there; the other log p move by ~3e-7, within tolerance
    rep = compare_files(logits_trace(tmp_path, wrong, tokens), path)
    assert not rep.ok and rep.first_position == 5


# --- llama-eval-callback dumps -----------------------------------------------------------

def dump_node(name: str, x: np.ndarray) -> list[str]:
    """One node as llama-eval-callback prints it (x (rows, cols) small enough to print whole)."""
    rows, cols = x.shape
    lines = [f"common_debug_cb_eval: {name:>24} = (f32)   ADD(a{{{cols}, {rows}, 1, 1}}, b}}) = "
             f"{{{cols}, {rows}, 1, 1}}", "    [", "        ["]
    lines += ["            [" + ", ".join(f"{v:12.4f}" for v in row) + "],"  for row in x]
    return lines + ["        ],", "    ]", f"    sum = {float(x.astype(np.float64).sum()):.6f}"]


def dump_of(tr: dict, nodes: dict) -> dict:
    return llamacpp.parse("\n".join(line for name, t in nodes.items() for line in dump_node(name, tr[t])) + "\n")


def dump_trace() -> dict:
    """trace_dict without logits (a dump of them would need the whole vocabulary printed)."""
    return {k: v for k, v in trace_dict().items() if k != "logits"}


def test_dump_coverage_and_names_are_strict_whichever_side_it_is_on():
    tr = dump_trace()
    full = dump_of(tr, {"embd": "token_embeddings", "l_out-0": "layers.0.out"})
    assert llamacpp.compare_dump(full, tr, 1e-3)[0]
    part = dump_of(tr, {"embd": "token_embeddings"})        # the dump lacks the trace's layers.0.out
    assert not llamacpp.compare_dump(part, tr, 1e-3)[0]
    assert llamacpp.compare_dump(part, tr, 1e-3, allow_missing=True)[0]
    unknown = dump_of(tr, {"embd": "token_embeddings", "l_out-0": "layers.0.out", "zz_out-0": "layers.0.out"})
    out = io.StringIO()
    assert not llamacpp.compare_dump(unknown, tr, 1e-3, out=out)[0] and "zz_out-0" in out.getvalue()
    assert llamacpp.compare_dump(unknown, tr, 1e-3, allow_unknown=True)[0]
    nan = {**tr, "layers.0.out": np.full_like(tr["layers.0.out"], np.nan)}
    assert not llamacpp.compare_dump(dump_of(nan, {"embd": "token_embeddings", "l_out-0": "layers.0.out"}), nan,
                                     1e-3)[0]


def test_the_dump_path_honours_atol_and_refuses_what_it_cannot_honour(tmp_path, capsys):
    tr = dump_trace()
    off = {**tr, "layers.0.out": tr["layers.0.out"] + 0.01}
    dump = dump_of(off, {"embd": "token_embeddings", "l_out-0": "layers.0.out"})
    assert not llamacpp.compare_dump(dump, tr, 0.0)[0]
    assert llamacpp.compare_dump(dump, tr, 0.0, atol=0.02)[0]
    with pytest.raises(NpllamaError, match="rtol"):
        llamacpp.compare_dump(dump, tr, np.nan)
    path, dump_path = str(tmp_path / "t.npz"), str(tmp_path / "d.txt")
    tracefile.save(path, tr)
    with open(dump_path, "w") as f:
        f.write("\n".join(dump_node("embd", tr["token_embeddings"])) + "\n")
    for extra, says in ((["--ulps", "1"], "relative error"), (["--names-a", "hf"], "llama.cpp"),
                        ([], "saved-logits")):
        b = base_file(tmp_path, np.zeros((N_CTX, 4), np.float32), np.arange(N_CTX)) if not extra else path
        assert main(["compare", dump_path, b, *extra]) == 1
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


# --- check_against_reference -------------------------------------------------------------

def test_check_against_reference_refuses_tolerances_and_schedules_it_cannot_use():
    args = small_args(n_layers=1)
    w = random_weights(args)
    for rtol in (np.nan, np.inf, -1.0):
        with pytest.raises(NpllamaError, match="rtol"):
            check_against_reference(lambda t: None, args, w, [1, 2], rtol=rtol)
    for chunks in (3, [True], (2.5,), "3"):
        with pytest.raises(NpllamaError, match="chunks"):
            check_against_reference(lambda t, s: None, args, w, [1, 2], chunks=chunks)


def test_a_hook_recording_that_cannot_be_stitched_leaves_the_logits_failure_standing():
    args = small_args(n_layers=1)
    w = random_weights(args)
    tokens = np.array([1, 2, 3])
    ref = tracefile.trace(Transformer(args, w), tokens, scores=False)["logits"]

    def forward(part, start):          # wrong logits: the failure to report
        return 1.5 * ref[start:start + len(part)]

    calls = []

    def wide_hook():                    # a key axis wider than the run's 3 tokens
        calls.append(1)
        return {"layers.0.scores": np.zeros((args.n_heads, 2 if len(calls) == 1 else 1, 16), np.float32)}

    with pytest.raises(AssertionError, match="could not be used"):
        check_against_reference(forward, args, w, tokens, chunks=(2, 1), trace_hook=wide_hook)

    def partial_hook():                 # a tensor recorded in the first call only
        calls.append(1)
        return {"layers.0.out": np.zeros((2, args.dim), np.float32)} if len(calls) % 2 else {}

    calls.clear()
    with pytest.raises(AssertionError, match="could not be used"):
        check_against_reference(forward, args, w, tokens, chunks=(2, 1), trace_hook=partial_hook)


def test_a_golden_bundle_reduced_to_tokens_compares_nothing(tmp_path):
    bundle = tmp_path / "gold"
    bundle.mkdir()
    np.save(bundle / "tokens.npy", np.arange(T))
    (bundle / "golden.json").write_text('{"files": {"tokens.npy": {}}}')
    tracefile.save(str(tmp_path / "t.npz"), trace_dict())
    with pytest.raises(NpllamaError, match="logits.npy"):     # refused before it compares nothing
        compare(tracefile.load(str(tmp_path / "t.npz")), tracefile.load(str(bundle)))


def test_an_edited_golden_bundle_is_refused_naming_its_folder(tmp_path):
    bundle = tmp_path / "gold"
    bundle.mkdir()
    tr = trace_dict()
    for name in ("tokens", "logits", "layers.0.out"):
        np.save(bundle / f"{name}.npy", tr[name])
    files = '{"tokens.npy": {}, "logits.npy": {}, "layers.0.out.npy": {}}'
    (bundle / "golden.json").write_text('{"tokens": [0, 1, 2], "files": %s}' % files)
    assert set(tracefile.load(str(bundle))) >= {"tokens", "logits", "layers.0.out"}      # the whole bundle reads
    for tokens, listed in (("[0, 1, 2]", '{"tokens.npy": {}, "layers.0.out.npy": {}}'),   # logits left out
                           ("[2, 1, 0]", files), ("[0, 1]", files), ('"012"', files), ("[0, 1, 2.5]", files)):
        (bundle / "golden.json").write_text('{"tokens": %s, "files": %s}' % (tokens, listed))
        with pytest.raises(NpllamaError, match=str(bundle)):
            tracefile.load(str(bundle))


def test_check_against_reference_refuses_unknown_dtypes_and_non_real_logits():
    args = small_args(n_layers=1)
    w = random_weights(args)
    tokens = np.array([1, 2, 3])
    ref = tracefile.trace(Transformer(args, w), tokens, scores=False)["logits"]
    with pytest.raises(NpllamaError, match="float32, bfloat16"):
        check_against_reference(lambda t: ref, args, w, tokens, dtype="float64")
    for dtype in (np.complex128, bool, object):        # cast, these would pass or warn
        with pytest.raises(NpllamaError, match="call 1 of 1"):
            check_against_reference(lambda t, d=dtype: ref.astype(d), args, w, tokens)


def test_a_port_reusing_its_buffers_is_judged_on_what_each_call_returned():
    args = small_args(n_layers=1)
    w = random_weights(args)
    tokens = np.array([1, 2, 3])
    tr = tracefile.trace(Transformer(args, w), tokens)
    buf = np.zeros((len(tokens), args.vocab_size))

    def lazy(part, start):              # returns zeros now, writes the right rows later
        buf[:start + len(part)] = tr["logits"][:start + len(part)] if start else 0.0
        return buf[start:start + len(part)]

    with pytest.raises(AssertionError, match="position 0"):
        check_against_reference(lazy, args, w, tokens, chunks=(2, 1))

    calls, first = [], np.zeros((2, args.dim), np.float32)   # call 1's recording: wrong (zeros)

    def reuse(part, start):            # wrong logits; call 2 fixes call 1's recording in its buffer
        calls.append(start)
        if len(calls) == 2:
            first[:] = tr["layers.0.out"][:2]
        return 1.5 * tr["logits"][start:start + len(part)]

    with pytest.raises(AssertionError, match="first diverging tensor: layers.0.out"):
        check_against_reference(reuse, args, w, tokens, chunks=(2, 1), trace_hook=lambda: {"layers.0.out": first}
                                if len(calls) == 1 else {"layers.0.out": tr["layers.0.out"][2:]})


def test_a_dump_with_two_nodes_for_one_tensor_is_refused_naming_both():
    tr = dump_trace()
    wrong = {**tr, "bad": tr["layers.0.out"] + 50.0}
    text = lambda nodes: "\n".join(line for name, t in nodes for line in dump_node(name, wrong[t])) + "\n"
    good = [("embd", "token_embeddings"), ("l_out-0", "layers.0.out")]
    for nodes in ([("l_out-0", "bad"), *good], [*good, ("l_out-0", "bad")]):   # printed twice, either order
        with pytest.raises(NpllamaError, match=r"layers\.0\.out is both node l_out-0\[ADD\] and node l_out-0\[ADD\]#2"):
            llamacpp.compare_dump(llamacpp.parse(text(nodes)), tr, 1e-3)
    # two names that map to one tensor (a block relabelled onto another's trace name)
    with pytest.raises(NpllamaError, match="one forward pass"):
        llamacpp.trace_names({"l_out-0[ADD]": {}, "l_out-0": {}})


def test_q_without_an_even_head_dimension_or_without_positions_is_no_traceback():
    for shape in ((), (T, 63), (T, H, 63), (0, H, 4), (H, 0, 0)):   # 0-D, odd last axis, T = 0
        x = np.ones(shape, np.float32)
        for name in ("layers.0.q", "layers.0.scores"):
            a, b = {"tokens": np.arange(T), name: x + 1}, {"tokens": np.arange(T), name: x}
            try:
                assert not compare(a, b).ok          # a layout hint needs an even head dim: skipped
            except NpllamaError as e:
                assert "compared nothing" in str(e)  # nothing but empty arrays


def test_a_reference_with_a_finite_mask_scales_errors_by_the_unmasked_scores():
    b = trace_dict()
    mask = np.isneginf(b["layers.0.scores"])
    fm = {**b, "layers.0.scores": np.where(mask, np.finfo(np.float32).min, b["layers.0.scores"])}
    assert compare(fm, b).ok and compare(b, fm).ok and compare(fm, fm).ok     # the same mask, two constants
    off = {**fm, "layers.0.scores": np.where(mask, fm["layers.0.scores"], fm["layers.0.scores"] + 100.0)}
    for a, ref in ((off, fm), (off, b)):
        rep = compare(a, ref)        # finfo.min's 3.4e38 as the scale excused any error
        assert not rep.ok and rep.first == "layers.0.scores"
    one_side = {**fm, "layers.0.scores": np.where(mask, 0.0, fm["layers.0.scores"]).astype(np.float32)}
    assert not compare(one_side, fm).ok                                        # masked on B's side only
