"""npllama.parallel: numpy work on threads of ours with BLAS held to one thread each, for
both its callers (tiled bf16 decode, blocked attention's KV-head groups). threadpoolctl (a
test extra) is the independent view of BLAS's thread count."""
import os
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from npllama.model import parallel, tiled
from npllama.errors import UsageError


def blas_threads() -> int:
    return next(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


def openblas_pthreads() -> bool:
    return any(p["internal_api"] == "openblas" and p.get("threading_layer") in ("pthreads", "disabled")
               for p in threadpool_info())


def test_numpy_openblas_is_found_and_held_to_one_thread_per_call(monkeypatch):
    if not openblas_pthreads():
        assert not parallel.openblas()      # nothing else is taken for OpenBLAS's setter
        return
    assert parallel.openblas()
    monkeypatch.setenv("NPLLAMA_THREADS", "2")
    seen = []

    def job(i):
        seen.append((i, blas_threads(), threading.current_thread().name))
    with threadpool_limits(2):
        parallel.run([lambda i=i: job(i) for i in range(4)])
        assert blas_threads() == 2           # restored
    assert sorted(i for i, _, _ in seen) == [0, 1, 2, 3]
    assert all(n == 1 for _, n, _ in seen)
    assert all(name.startswith("npllama") for _, _, name in seen)


def test_run_gives_what_one_call_gives_and_restores_on_error(monkeypatch):
    monkeypatch.setenv("NPLLAMA_THREADS", "3")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 300), dtype=np.float32)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    out = np.full((1, 300), np.nan, np.float32)
    parallel.run([lambda c=c: np.matmul(x, w[:, c:c + 100], out=out[:, c:c + 100]) for c in range(0, 300, 100)])
    # each output is one dot product, summed by the same kernel either way: within fp32 rounding
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5 * np.abs(x @ w).max())
    before = blas_threads()

    def fail(i):
        if i == 1:
            raise RuntimeError("job 1")
    with pytest.raises(RuntimeError, match="job 1"):
        parallel.run([lambda i=i: fail(i) for i in range(3)])
    assert blas_threads() == before


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("NPLLAMA_THREADS", "3")
    assert parallel.threads() == 3
    monkeypatch.delenv("NPLLAMA_THREADS")
    assert parallel.threads() == (os.cpu_count() or 1)
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("NPLLAMA_THREADS", bad)
        with pytest.raises(UsageError, match="NPLLAMA_THREADS must be a positive integer"):
            parallel.threads()
    monkeypatch.setenv("NPLLAMA_THREADS", "1")
    seen = []
    parallel.run([lambda: seen.append(threading.current_thread().name)] * 2)
    assert seen == [threading.main_thread().name] * 2      # one thread: no pool, in turn


@pytest.mark.parametrize("n_threads", ["1", "2", "3"])
def test_tiled_decode_on_threads_is_the_float32_product(monkeypatch, n_threads):
    # tiled.matmul splits each weight's rows between the threads (uneven splits with 3):
    # against float64 products of the exactly widened weights.
    monkeypatch.setenv("NPLLAMA_THREADS", n_threads)
    rng = np.random.default_rng(1)
    from npllama.model import bf16
    ws = [bf16.to_bits(rng.standard_normal((n, 96), dtype=np.float32)) for n in (50, 7)]
    x = rng.standard_normal((1, 96), dtype=np.float32)
    want = x.astype(np.float64) @ np.concatenate([bf16.from_bits(w) for w in ws]).T.astype(np.float64)
    got = tiled.matmul(x, ws)
    # float32 dot products of 96 terms: within 96 * eps32 of the sum of |terms|
    bound = 96 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(np.concatenate([bf16.from_bits(w) for w in ws])).T)
    assert np.all(np.abs(got - want) <= bound)
